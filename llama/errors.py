"""The one error type the CLI turns into a one-line message instead of a traceback."""


class PipelineError(Exception):
    """A problem with the user's input or environment, described in one line."""
