"""The one exception type the CLI turns into a single line on stderr."""


class CharlmError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
