"""The one exception type users see.

Every stage raises `ScratchLMError` for bad input (a missing file, a corrupt directory,
an invalid config field). The CLI prints its message as a single line and exits non-zero;
anything else escaping is a bug and keeps its traceback.
"""


class ScratchLMError(Exception):
    """A problem with the user's input, described in one line naming the file/field at fault."""
