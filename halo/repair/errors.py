"""The one error a repair model that cannot be used raises, before anything is fed."""

from __future__ import annotations


class RepairModelError(ValueError):
    """A repair model cannot be used: its message is one line naming the model and why.

    Raised for a model not found offline, a model that is not a masked LM, a masked LM whose tokenizer cannot be
    loaded or has no mask token, and a vocabulary with no bridge to the host tokenizer.
    """

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"repair model {model!r}: {self.reason}")


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
