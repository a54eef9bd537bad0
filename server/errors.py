"""The server package's one error type: a data, model or strategy setting that cannot work."""

from __future__ import annotations

from testbed.core.errors import TestbedError


class ServerError(TestbedError):
    """Raised when the server cannot do what the scenario asks; the message says what and why."""
