"""The orchestration's error family: what can stop a run, a report, a push or the embedded broker."""

from testbed.core.errors import TestbedError


class OrchestrationError(TestbedError):
    """Base of RunError, ReportError, PushError and BrokerError."""
