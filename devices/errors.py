"""The devices package's error family: one base for frames, serial links, boards, meters and the fleet."""

from testbed.core.errors import TestbedError


class DeviceError(TestbedError):
    """A device-side failure the user can act on (a malformed frame, a port gone, a meter unreadable, ...)."""
