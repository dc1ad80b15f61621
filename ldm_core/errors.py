"""The exception users see, LdmError (and the kinds several modules raise: storage, deploy):
its message says what is wrong and where."""


class LdmError(Exception):
    """A failure with a reason a user can act on (bad file, bad field, failed job).

    The CLI prints ``str(error)`` as one line and exits non-zero; any other exception is
    a bug and is reported the same way, with the traceback behind ``--debug``.
    """


class StorageError(LdmError):
    """A transfer failed; the message names the URI and the reason, never a credential.

    Raised by :mod:`ldm_core.storage` and the S3 client beneath it (:mod:`ldm_core.s3`).
    """


class DeployError(LdmError):
    """The model could not be brought up, or it did not answer the smoke inference."""
