"""The error raised for bad data input (files, formats, labels, tokenizers, loader state)."""


class DataError(ValueError):
    """Bad data input; the message names what was wrong and what to do."""
