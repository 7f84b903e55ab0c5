"""One error type for everything a user can fix: what is wrong, where, and how to fix it."""

from __future__ import annotations


class QvlError(Exception):
    """An error with a message for people. The CLI prints it without a traceback."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return "\n".join(parts)
