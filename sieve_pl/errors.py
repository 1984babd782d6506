"""One exception type for bad user input: the CLI prints its message as a single line."""


class SieveError(ValueError):
    """A problem with the user's configuration or data, reported before heavy work starts."""
