"""The one error type of the training data: what a reader or a check reports about a dataset."""


class DataError(ValueError):
    """A dataset that is missing, malformed, or does not match the options."""
