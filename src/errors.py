"""The one exception type for bad user input.

Anything raised as ``UserError`` reaches the user as a single line and exit status 2
(see ``src/cli.py``); everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: the message says what was wrong and what to do."""
