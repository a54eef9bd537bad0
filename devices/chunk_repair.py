"""When a device asks for a repair: a chunk it was sent failed its digest, and no chunk has come since for a while.

A chunk refused by its digest may be a forgery racing the genuine one (which still comes: nothing to ask) or
the genuine chunk damaged on the way (it never comes again: the update would wait forever). The device cannot
tell them apart when the chunk arrives, so it waits: once an update is still in flight and the chunks have
stopped coming for a quiet time, it asks the run for a catch-up (a nack) — once per damage. An update applied
meanwhile clears the damage, so a forged chunk followed by the genuine update costs no traffic. Pure: the agent
passes the time.
"""

from __future__ import annotations

from devices.energy import radio_seconds

REPAIR_QUIET_MIN_S = 2.0
"""No chunk for this long after a damaged one, with an update still in flight: ask for a repair;"""
REPAIR_QUIET_CHUNK_TIMES = 4
"""or for this many chunk airtimes at the downlink rate, when that is longer."""


class DamagedTransfer:
    """Whether (``repair_due``) and when (``next_check_s``) a device with a refused chunk asks for a repair."""

    def __init__(self, downlink_rate_bps: float | None = None) -> None:
        self.downlink_rate_bps = downlink_rate_bps
        self.damaged = False
        self._last_chunk_s = 0.0
        self._quiet_s = REPAIR_QUIET_MIN_S
        self.repairs_asked = 0
        """Repairs asked so far; the device's nacks carry it (DeviceNack.repair), so the run tells a repair asked
        again (the catch-up that answered the last one came damaged too) from the same one asked twice."""

    def chunk_arrived(self, now_s: float, chunk_bytes: int) -> None:
        """A chunk came in (good or not): the transfer is still moving."""
        self._last_chunk_s = now_s
        self._quiet_s = max(REPAIR_QUIET_MIN_S,
                            REPAIR_QUIET_CHUNK_TIMES * radio_seconds(chunk_bytes, self.downlink_rate_bps))

    def chunk_refused(self) -> None:
        """A chunk failed its digest."""
        self.damaged = True

    def update_applied(self) -> None:
        """An update completed and was applied: whatever was refused before did not keep it from coming."""
        self.damaged = False

    def next_check_s(self) -> float | None:
        """When to ask ``repair_due`` if no chunk comes before (None: nothing is damaged)."""
        return self._last_chunk_s + self._quiet_s if self.damaged else None

    def repair_due(self, now_s: float, in_flight: bool) -> bool:
        """Whether to ask for a repair now (then not again for this damage): damaged, still ``in_flight``, quiet."""
        if not self.damaged:
            return False
        if not in_flight:
            self.damaged = False  # nothing waits for the refused chunk any more
            return False
        if now_s < self._last_chunk_s + self._quiet_s:
            return False
        self.damaged = False
        self.repairs_asked += 1
        return True
