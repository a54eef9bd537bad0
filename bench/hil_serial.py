"""Benchmark: scenarios/hil-serial.yaml with a board agent on a pty cable; update delivery to the board vs the serial line's floor."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from devices.pty_cable import PtyCable
from devices.serial_framing import framing_overhead_bytes
from devices.serial_link import line_rate_bytes_per_s

REPO = Path(__file__).resolve().parents[1]
BOARD = "bench-pi"
FRAME_LINE = re.compile(r" host>board (MANIFEST|UPDATE_CHUNK) seq=\d+ len=(\d+) (.*)$")
MANIFEST_KEY = re.compile(r'"key": "([^"]+)"')


def frames_on_the_line(serial_log: str) -> dict[str, int]:
    """Bytes on the line (payload + framing) of each update's manifest and chunk frames, first sends only."""
    per_key: dict[str, int] = defaultdict(int)
    for line in serial_log.splitlines():
        match = FRAME_LINE.search(line)
        if match is None or "(sent again)" in line:
            continue
        kind, length, rest = match.group(1), int(match.group(2)), match.group(3)
        key = rest.split()[0].removeprefix("key=") if kind == "UPDATE_CHUNK" else MANIFEST_KEY.search(rest).group(1)
        per_key[key] += length + framing_overhead_bytes(length)
    return dict(per_key)


def link_effort(serial_log: str) -> tuple[int, int]:
    """Frames the reliable link sent again (both ways) and link control frames (SYNC, ACK, NACK) on the line."""
    again = sum(1 for line in serial_log.splitlines() if "(sent again)" in line)
    control = sum(1 for line in serial_log.splitlines() if re.search(r" (SYNC|ACK|NACK) seq=", line))
    return again, control


def run_scenario(out: Path, rounds: int, baud: int) -> tuple[float, list[dict[str, Any]], str]:
    """`testbed run` (the real CLI) with the board agent in another process, joined by a pty cable."""
    cable = PtyCable()
    board = subprocess.Popen([sys.executable, "-m", "testbed", "board", "--port", cable.board_path, "--name", BOARD,
                              "--energy", "model", "--baud", str(baud), "--state-dir", str(out / "board-state")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "testbed", "run", str(REPO / "scenarios" / "hil-serial.yaml"),
                        "--out", str(out / "run"), "--set", f"devices.0.serial={cable.host_path}",
                        "--set", f"devices.0.baud={baud}", "--set", f"rounds={rounds}", "--set", "metrics.port=0"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - started
    finally:
        board.kill()
        board.wait(10)
        cable.close()
    records = [json.loads(line) for line in (out / "run" / "results.jsonl").read_text().splitlines()]
    return seconds, records, (out / "run" / "serial" / f"{BOARD}.log").read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baud", type=int, default=115200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        seconds, records, serial_log = run_scenario(Path(folder), args.rounds, args.baud)
    line_rate = line_rate_bytes_per_s(args.baud)
    on_line = frames_on_the_line(serial_log)
    print(f"# bench/hil_serial.py: scenarios/hil-serial.yaml, {args.rounds} rounds, board agent on a pty cable at "
          f"{args.baud} baud (model energy reader), {seconds:.1f} s wall")
    print(f"# rerun: python bench/hil_serial.py --rounds {args.rounds} --baud {args.baud}")
    print("# floor: the update's frames on the serial line (payload + COBS/CRC/header framing) / line rate "
          f"({line_rate:.0f} B/s); delivery: publish -> the board holds every chunk (the emulated link to the bridge")
    print("#   runs in parallel); emulated: the two emulated rpi4 devices of the same run (their 200 kbit/s link only)")
    print("| round | update B | on the line B | board delivery s | serial floor s | delivery/floor | emulated delivery s "
          "| board J (measured) | emulated J (modelled) |")
    print("|---|---|---|---|---|---|---|---|---|")
    by_round: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("delivered"):
            by_round[record["round"]].append(record)
    for round_index, round_records in sorted(by_round.items()):
        board = next(record for record in round_records if record["device"] == BOARD)
        emulated = [record for record in round_records if record["device"] != BOARD]
        # the broadcast update `V`, plus any catch-up `V-from-B` the board needed
        line_bytes = sum(size for key, size in on_line.items() if key.split("-")[0] == str(board["version"]))
        floor = line_bytes / line_rate
        ratio = board["delivery_seconds"] / floor if floor else float("nan")
        emulated_delivery = ", ".join(f"{record['delivery_seconds']:.2f}" for record in emulated)
        emulated_energy = ", ".join(f"{record['energy_joules']:.2f}" for record in emulated)
        print(f"| {round_index} | {board['update_bytes']} | {line_bytes} | {board['delivery_seconds']:.2f} | {floor:.2f} "
              f"| {ratio:.3f} | {emulated_delivery} | {board['energy_joules']:.2f} | {emulated_energy} |")
    again, control = link_effort(serial_log)
    print(f"reliable link: {again} frames sent again, {control} link control frames (SYNC/ACK/NACK) on the line")
    all_final = len({record["weights_hash"] for record in by_round[max(by_round)]}) == 1
    print(f"all devices on the same final weights: {'yes' if all_final else 'NO'}")
    return 0 if all_final else 1


if __name__ == "__main__":
    raise SystemExit(main())
