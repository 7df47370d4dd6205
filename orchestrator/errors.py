"""The job's own error, raised by its parts (inputs, editors) and caught by the command line."""


class JobError(RuntimeError):
    """The job cannot start or continue (missing input, unusable model, too many editor failures)."""
