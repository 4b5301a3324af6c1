"""User-facing errors: one clear line naming the problem and the expected form."""


class ChipError(ValueError):
    """A problem with the user's input (not a bug in chip).

    The CLI prints ``chip: error: <message>`` and exits with code 2, without a traceback.
    Messages are a single line that names what was wrong and what was expected.
    """


class ChipWarning(UserWarning):
    """Something chip did differently from what was asked, on purpose (e.g. a channel group it
    keeps whole because it cannot prune it correctly); the message names the layer and why."""
