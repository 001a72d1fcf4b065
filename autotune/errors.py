"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the CLI prints the message and exits with code 2.

    The message should say what is wrong, where (file, key, line) and how to fix it.
    """

    exit_code = 2
