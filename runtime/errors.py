"""The one exception type users see: its message names the problem and the fix."""


class PocketLMError(Exception):
    """A user-facing error; the CLI prints its message without a traceback and exits with 2."""
