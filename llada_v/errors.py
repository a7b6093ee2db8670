"""The error every checkpoint reader raises, in a module of its own so that the layout modules can raise it
without importing the config they are read into."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or malformed."""
