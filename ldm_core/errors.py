"""The one exception type users see: its message says what is wrong and where."""


class LdmError(Exception):
    """A failure with a reason a user can act on (bad file, bad field, failed job).

    The CLI prints ``str(error)`` as one line and exits non-zero; any other exception is
    a bug and is reported the same way, with the traceback behind ``--debug``.
    """
