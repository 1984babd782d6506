"""One exception type for bad user input: the CLI prints its message as a single line."""
import errno
import os

# a write the user can fix: disk full, quota, read-only filesystem, permissions
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class SieveError(ValueError):
    """A problem with the user's configuration or data, reported before heavy work starts."""


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an exception, for a one-line message about what failed."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def write_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed write of :data:`WRITE_ERRORS`: an ``OSError`` with such an
    errno, or safetensors' ``SafetensorError``, which carries the OS error as text only."""
    if isinstance(err, OSError):
        return err.errno in WRITE_ERRORS
    return (type(err).__name__ == "SafetensorError"
            and any(os.strerror(code) in str(err) for code in WRITE_ERRORS))
