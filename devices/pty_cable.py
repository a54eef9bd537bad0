"""A null-modem cable of two real ptys, relayed by a thread: try boards in the loop without hardware, unplug it, add noise."""

from __future__ import annotations

import os
import select
import threading
import tty
from collections.abc import Callable

READ_BYTES = 4096


class PtyCable:
    """`host_path` and `board_path` are /dev/pts/N device paths joined like the two ends of a serial cable.

    The relay drops what the far end cannot take (a UART with nobody reading loses bytes too), so a dead
    board never blocks the host. `cut()` unplugs (bytes both ways are dropped), `restore()` plugs back in,
    `corrupt` (a function of (direction, bytes) -> bytes) lets a test mangle traffic in flight.
    """

    def __init__(self) -> None:
        self._host_master, self._host_slave = os.openpty()
        self._board_master, self._board_slave = os.openpty()
        for fd in (self._host_slave, self._board_slave):
            tty.setraw(fd)  # the slaves stay open here, so the masters never see a hang-up
        for fd in (self._host_master, self._board_master):
            os.set_blocking(fd, False)
        self.host_path = os.ttyname(self._host_slave)
        self.board_path = os.ttyname(self._board_slave)
        self.connected = True
        self.corrupt: Callable[[str, bytes], bytes] | None = None
        self.bytes_relayed = {"host>board": 0, "board>host": 0}
        self.bytes_dropped = {"host>board": 0, "board>host": 0}
        self._stop_read, self._stop_write = os.pipe()
        self._thread = threading.Thread(target=self._relay, name="pty-cable", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        self.connected = False

    def restore(self) -> None:
        self.connected = True

    def _relay(self) -> None:
        routes = {self._host_master: (self._board_master, "host>board"),
                  self._board_master: (self._host_master, "board>host")}
        while True:
            readable, _, _ = select.select([*routes, self._stop_read], [], [])
            if self._stop_read in readable:
                return
            for source in readable:
                target, direction = routes[source]
                try:
                    data = os.read(source, READ_BYTES)
                except (BlockingIOError, OSError):
                    continue
                if not self.connected:
                    self.bytes_dropped[direction] += len(data)
                    continue
                if self.corrupt is not None:
                    data = self.corrupt(direction, data)
                try:
                    written = os.write(target, data)
                except (BlockingIOError, OSError):
                    written = 0
                self.bytes_relayed[direction] += written
                self.bytes_dropped[direction] += len(data) - written

    def close(self) -> None:
        os.write(self._stop_write, b"x")
        self._thread.join(5)
        for fd in (self._host_master, self._host_slave, self._board_master, self._board_slave,
                   self._stop_read, self._stop_write):
            os.close(fd)


def main() -> int:
    """`python -m devices.pty_cable`: print both ends' paths and relay until Ctrl-C."""
    cable = PtyCable()
    print(f"host end:  {cable.host_path}\nboard end: {cable.board_path}\n(Ctrl-C to unplug)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cable.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
