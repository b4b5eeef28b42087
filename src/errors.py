"""The one exception type for bad user input.

Anything raised as ``UserError`` reaches the user as a single line and exit status 2
(see ``src/cli.py``); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: the message says what was wrong and what to do."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s text (its type's name when it has none), at most 200
    characters: the cause quoted in a one-line message."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
