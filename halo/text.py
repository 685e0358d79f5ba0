"""Embedded real text: the Python standard library's `pydoc_data.topics` (English documentation prose)."""

from __future__ import annotations


def embedded_text(max_chars: int | None = None) -> str:
    """The pydoc topics joined in sorted topic order, optionally cut to `max_chars` at a line boundary."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name].strip() + "\n" for name in sorted(topics))
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut + 1 if cut > 0 else max_chars]
    return text
