"""MoelocalError: anything the user should see as one line, naming the value and the next step;
reason(): an OSError's part of such a line."""


class MoelocalError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 1."""


def printable(text) -> str:
    """Text from a model's files or the user, safe for a terminal and one line: control
    characters (escape sequences, newlines) are shown as escapes, never sent."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def reason(e: OSError) -> str:
    """What an OSError says, in the lower case of moelocal's messages: "no space left on device"."""
    return (e.strerror or str(e)).lower()
