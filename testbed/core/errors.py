"""The root of every error family of edge-testbed: the CLI catches TestbedError and prints one line."""


class TestbedError(Exception):
    """Base of each package's own error family (ScenarioError, WireError, ChannelError, ServerError, DeviceError, …).

    A TestbedError is something the user can act on (a bad file, a busy port, a board that went away);
    anything else escaping to the CLI is a bug and keeps its traceback.
    """

    __test__ = False  # not a pytest test class, despite the name
