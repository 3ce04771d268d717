"""The one exception users see: a problem they can fix, with a message that says how."""


class OjaKVError(Exception):
    """A user-facing error. The message is one line that names the fix; the CLI prints it without a traceback."""
