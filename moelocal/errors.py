"""MoelocalError: anything the user should see as one line, naming the value and the next step;
reason(): an OSError's part of such a line."""


class MoelocalError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 1."""


def reason(e: OSError) -> str:
    """What an OSError says, in the lower case of moelocal's messages: "no space left on device"."""
    return (e.strerror or str(e)).lower()
