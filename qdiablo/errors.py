"""The one exception type for user mistakes: the CLI prints it as one line plus a hint."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix (bad path, bad flag, bad file). Carries an optional hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
