"""The one exception type for user mistakes: the CLI prints its message, never a traceback."""


class UserError(Exception):
    """Bad input or configuration. The message names the problem and how to fix it."""
