"""MoelocalError: anything the user should see as one line, naming the value and the next step."""


class MoelocalError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 1."""
