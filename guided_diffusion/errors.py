"""
Exceptions that mean "the user must change an input", shared by the library and the scripts, so
that modules low in the import order can raise them without importing the scripts' toolkit.
"""


class ScriptError(ValueError):
    """Bad input to a script; the message says what to change."""
