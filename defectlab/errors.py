"""The one user-facing error type: the CLI prints its message on one line and exits 2."""


class DefectlabError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message names the file or field."""
