"""The one exception type that the CLI turns into a short message and a non-zero exit."""


class OneboxError(Exception):
    """A problem the user can fix: the message says what is wrong and what to do."""
