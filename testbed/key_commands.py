"""`testbed keygen`: make the Ed25519 key pair a fleet keeps for signing updates across runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from testbed.core.signing import SigningKey, SigningKeyError

COMMANDS = ("keygen",)
EXIT_OK = 0
EXIT_BAD_ARGUMENTS = 2


def add_commands(commands: Any) -> None:
    """Register `keygen` on the `testbed` command's subparsers."""
    keygen = commands.add_parser(
        "keygen", help="make an update-signing key pair (for `testbed run --signing-key` and `testbed board --trust`)",
        description="Writes a new Ed25519 private key to FILE (PEM, mode 0600, never overwritten) and its public key "
                    "to FILE.pub, and prints the public key. Runs given the private key with --signing-key sign "
                    "their updates with it; boards started with --trust FILE.pub apply nothing else.")
    keygen.add_argument("file", type=Path, metavar="FILE", help="where to write the private key, e.g. fleet.key")


def run(args: argparse.Namespace) -> int:
    """Run `keygen`; returns the exit code."""
    public_file = args.file.with_name(args.file.name + ".pub")
    if public_file.exists():
        print(f"testbed keygen: error: {public_file} exists; not overwriting a key", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    key = SigningKey.generate()
    try:
        key.save(args.file)
        public_file.write_text(key.trusted_key.text + "\n", encoding="utf-8")
    except (SigningKeyError, OSError) as error:
        print(f"testbed keygen: error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    print(f"private key: {args.file} (keep it on the host that runs the server)")
    print(f"public key:  {public_file}: {key.trusted_key.text}")
    return EXIT_OK
