"""The one exception type that reaches the user as a message instead of a traceback."""

import re

# A message quotes what the user wrote, which can be any size (a 100 KB --set value; a 51 KB YAML file whose aliases
# repeat a 50,000-character string 400 times made a 20 MB message). Every message is held to these bounds where it is
# made, whichever check made it: a run of this many characters without a space is cut to its ends, and the whole
# message to its start and end.
MAX_WORD = 300
MAX_MESSAGE = 4000


def bounded(message: str) -> str:
    """`message` within MAX_WORD a word and MAX_MESSAGE in all, saying how much was left out where."""

    def cut(match: re.Match) -> str:
        word = match.group(0)
        return f"{word[:100]}...({len(word) - 140:,} characters left out)...{word[-40:]}"

    message = re.sub(rf"\S{{{MAX_WORD + 1},}}", cut, message)
    if len(message) > MAX_MESSAGE:
        head, tail = message[: MAX_MESSAGE - 1000], message[-800:]
        message = f"{head}\n...({len(message) - len(head) - len(tail):,} characters left out)...\n{tail}"
    return message


class UserError(Exception):
    """Bad input the user can fix: the CLI prints the message and exits with code 2.

    The message should say what is wrong, where (file, key, line) and how to fix it; it is bounded (`bounded`).
    """

    exit_code = 2

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(bounded(str(message)), *args)


def brief(value: object) -> str:
    """`value`'s repr for a message, bounded: a few items of a list or mapping, a few levels, the start of a long
    string. A message quotes what the user wrote, and what they wrote can be huge (a YAML alias bomb expands to
    millions of items): reprlib stops early instead of building the whole repr."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = 80, 80, 40
    return short.repr(value)
