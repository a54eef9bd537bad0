"""bench/link_fidelity.py's recovery comparison: the proxy-rto backend list and the lossy goodput-vs-tun target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/link_fidelity.py", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_an_unknown_backend_is_a_one_line_error() -> None:
    completed = bench("--backend", "proxy,sack")
    assert completed.returncode != 0
    assert completed.stderr.strip() == ("bench/link_fidelity.py: unknown backend 'sack': expected all or a "
                                         "comma-separated list of proxy, proxy-rto, tun")


def test_the_lossy_target_compares_each_lossy_grid_case_with_tun_both_ways() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import link_fidelity
    finally:
        sys.path.remove(str(ROOT / "bench"))

    def row(backend: str, case: str, loss: float, goodput: float) -> dict[str, object]:
        return {"backend": backend, "case": case, "profile": "custom", "configured_loss": loss, "goodput_bps": goodput}

    rows = [row("tun", "a", 0.01, 100.0), row("tun", "b", 0.01, 100.0), row("tun", "c", 0.0, 100.0),
            row("proxy", "a", 0.01, 95.0), row("proxy", "b", 0.01, 108.0), row("proxy", "c", 0.0, 50.0)]
    target = link_fidelity.lossy_goodput_vs_tun(rows, "proxy")
    assert target is not None and target["met"] and target["measured"].startswith("worst 1.080 of tun (b)")
    rows.append(row("proxy-rto", "a", 0.01, 120.0))  # above tun by more than 10% misses too
    missed = link_fidelity.lossy_goodput_vs_tun(rows, "proxy-rto")
    assert missed is not None and not missed["met"]
    assert link_fidelity.lossy_goodput_vs_tun(rows, "tun-less") is None
