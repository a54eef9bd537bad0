"""The channel package's single error family."""

from __future__ import annotations

from testbed.core.errors import TestbedError


class ChannelError(TestbedError):
    """A link or emulator was misconfigured or failed; the message says what and how to fix it."""
