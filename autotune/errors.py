"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the CLI prints the message and exits with code 2.

    The message should say what is wrong, where (file, key, line) and how to fix it.
    """

    exit_code = 2


def brief(value: object) -> str:
    """`value`'s repr for a message, bounded: a few items of a list or mapping, a few levels, the start of a long
    string. A message quotes what the user wrote, and what they wrote can be huge (a YAML alias bomb expands to
    millions of items): reprlib stops early instead of building the whole repr."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = 80, 80, 40
    return short.repr(value)
