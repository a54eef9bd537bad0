"""The channel package's single error family."""

from __future__ import annotations


class ChannelError(Exception):
    """A link or emulator was misconfigured or failed; the message says what and how to fix it."""
