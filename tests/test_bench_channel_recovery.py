"""bench/link_fidelity.py's recovery comparison: the proxy-rto backend list and the lossy goodput-vs-tun target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
try:
    import link_fidelity
finally:
    sys.path.remove(str(ROOT / "bench"))


def bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/link_fidelity.py", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_an_unknown_backend_is_a_one_line_error() -> None:
    completed = bench("--backend", "proxy,sack")
    assert completed.returncode != 0
    assert completed.stderr.strip() == ("bench/link_fidelity.py: unknown backend 'sack': expected all or a "
                                         "comma-separated list of proxy, proxy-rto, tun")


def test_the_lossy_target_compares_each_lossy_grid_case_with_tun_both_ways() -> None:
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


def test_a_lossy_case_repeats_its_transfer_until_a_loss_is_expected_and_reports_the_mean_with_its_interval() -> None:
    from channel.link import LinkParameters

    slow = LinkParameters(rate_bps=10_000, delay_s=0.05, loss=0.01)  # 8 segments in 10 s: 0.08 losses a transfer
    assert link_fidelity.bulk_repeats(slow, 10.0) == 13
    assert link_fidelity.bulk_repeats(LinkParameters(rate_bps=10_000, loss=0.0), 10.0) == 1
    assert link_fidelity.bulk_repeats(LinkParameters(rate_bps=10_000_000, loss=0.01), 10.0) == 1
    assert link_fidelity.bulk_repeats(LinkParameters(rate_bps=1_000, loss=0.001), 10.0) == link_fidelity.MAX_BULK_REPEATS

    def transfer(goodput: float, model: float, lost: int) -> dict[str, object]:
        return {"bulk_bytes": 100, "bulk_seconds": 2.0, "goodput_bps": goodput, "model_goodput_bps": model,
                "release_lateness_p50_ms": 1.0, "release_lateness_p99_ms": 2.0 + lost,
                "segment_attempts": 10 + lost, "lost_segments": lost}

    pooled = link_fidelity.pooled_bulks([transfer(100.0, 100.0, 0), transfer(80.0, 100.0, 1),
                                         transfer(90.0, 90.0, 0)], configured_bps=100.0)
    assert pooled["goodput_bps"] == 90.0 and pooled["bulk_repeats"] == 3
    assert abs(pooled["goodput_bps"] / pooled["model_goodput_bps"] - (1.0 + 0.8 + 1.0) / 3) < 1e-12  # mean meas/model
    assert pooled["goodput_ratios"] == [1.0, 0.8, 0.9]
    low, high = pooled["goodput_ratio_ci"]
    assert low < 0.8 < 0.9 < high < 1.2  # t(0.975, 2) = 4.303: 0.9 ± 4.303 · 0.1 / √3
    assert abs(high - (0.9 + 4.302653 * 0.1 / 3 ** 0.5)) < 1e-5
    assert (pooled["lost_segments"], pooled["segment_attempts"], pooled["bulk_lost_per_repeat"]) == (1, 31, [0, 1, 0])
    assert pooled["release_lateness_p99_ms"] == 3.0 and pooled["bulk_seconds"] == 6.0
    single = link_fidelity.pooled_bulks([transfer(100.0, 100.0, 0)], configured_bps=100.0)
    assert single["bulk_repeats"] == 1 and "goodput_ratio_ci" not in single
    assert link_fidelity._repeats({**pooled, "bulk_repeats": 3}).startswith(" ×3 [")

    rows = [{"backend": "tun", "case": "a", "profile": "custom", "configured_loss": 0.01, "goodput_bps": 100.0,
             "bulk_repeats": 13},
            {"backend": "proxy", "case": "a", "profile": "custom", "configured_loss": 0.01, "goodput_bps": 104.0,
             "bulk_repeats": 13}]
    target = link_fidelity.lossy_goodput_vs_tun(rows, "proxy")
    assert target is not None and target["met"]
    assert target["measured"].startswith("worst 1.040 of tun (a, means of 13 transfers)")

    assert target["measured"].endswith("a: 1.040")
    rows[0]["goodput_bps"] = None  # a case without a figure on either side is not a case met
    unmeasured = link_fidelity.lossy_goodput_vs_tun(rows, "proxy")
    assert unmeasured is not None and not unmeasured["met"] and unmeasured["measured"] == "no goodput for a"


def test_a_transfer_whose_bytes_came_in_one_read_is_left_out_of_the_mean_and_counted() -> None:
    assert link_fidelity.goodput_first_to_last([(4.0, 3000)]) is None  # the first segment lost, the rest behind it

    def transfer(goodput: float | None) -> dict[str, object]:
        return {"bulk_bytes": 100, "bulk_seconds": 2.0, "goodput_bps": goodput, "model_goodput_bps": goodput,
                "release_lateness_p50_ms": None, "release_lateness_p99_ms": None, "segment_attempts": 10,
                "lost_segments": 0 if goodput else 1}

    pooled = link_fidelity.pooled_bulks([transfer(100.0), transfer(None), transfer(80.0)], configured_bps=100.0)
    assert (pooled["goodput_bps"], pooled["untimed"], pooled["bulk_repeats"]) == (90.0, 1, 3)
    assert pooled["goodput_ratios"] == [1.0, 0.8] and pooled["release_lateness_p99_ms"] is None
    assert link_fidelity._repeats(pooled).endswith(", 1 in one read")
    nothing = link_fidelity.pooled_bulks([transfer(None), transfer(None)], configured_bps=100.0)
    assert nothing["goodput_bps"] is None and nothing["untimed"] == 2 and "goodput_ratio_ci" not in nothing
