"""The one error type of the data readers."""


class DataError(ValueError):
    """A dataset that is missing, malformed, or does not match the options.

    Raised for every defect of a file's content (truncated, corrupt, out of range), with a
    message that names the file and, for record files, the record and its byte offset.
    """


class DataWarning(UserWarning):
    """Data that loads but is probably not what was meant (images resized to the model's size ...)."""
