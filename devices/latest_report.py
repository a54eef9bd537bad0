"""A device's latest report, kept to be sent again whenever the run may have missed it."""

from __future__ import annotations

import time
from collections.abc import Callable

from testbed.core.messages import DeviceReport, MessageError, ReportRequest

REQUEST_ANSWER_INTERVAL_S = 1.0
"""A device answers at most one report request a second: a flood of them costs its link at most one report a second."""


class LatestReport:
    """The last report a device sent, and when to send it again.

    A report the broker acknowledged can still be lost to the run: a broker that stops between acknowledging it
    and forwarding it, or a run whose own session was down. So the report is sent again on every reconnect of
    the device (`on_reconnect`), and in answer to the run's request after its session came back (`answer`).
    Between the two, every order of the device's and the run's reconnects ends with the run holding the report:
    a device subscribes before it sends again, and the run subscribes before it asks. The run keeps one report
    per device and round, so one it sees twice is still one record.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 min_interval_s: float = REQUEST_ANSWER_INTERVAL_S) -> None:
        self.clock = clock
        self.min_interval_s = min_interval_s
        self.report: DeviceReport | None = None
        self.answered_requests = 0
        self.ignored_requests = 0
        self._last_answer: float | None = None

    def keep(self, report: DeviceReport) -> None:
        """`report` is about to be sent: it is the one to send again."""
        self.report = report

    def on_reconnect(self) -> DeviceReport | None:
        """The report to send again on a new connection, if any."""
        return self.report

    def answer(self, payload: bytes) -> DeviceReport | None:
        """The report to send in answer to a report request, or None: not a request, another version, too soon."""
        try:
            request = ReportRequest.decode(payload)
        except MessageError:
            self.ignored_requests += 1
            return None
        now = self.clock()
        if (self.report is None or request.version != self.report.version
                or (self._last_answer is not None and now - self._last_answer < self.min_interval_s)):
            self.ignored_requests += 1
            return None
        self._last_answer = now
        self.answered_requests += 1
        return self.report
