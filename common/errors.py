"""The one user-facing error base class: the CLI and the plugin tools catch it and show its message
and hint; each package raises its own subclasses."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on: `str(error)` says what went wrong, `hint` what to do."""

    # Said before the message ("preset: …") when the message alone would not name the subject.
    topic: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def describe(self) -> str:
        """The message, with the topic in front when there is one."""
        return f"{self.topic}: {self}" if self.topic else str(self)
