"""The one user-facing error type: the CLI prints its message on one line and exits 2."""


class DefectlabError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message names the file or field."""


def first_line(err: BaseException) -> str:
    """An exception's first line (at most 300 characters), for one-line user errors."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
