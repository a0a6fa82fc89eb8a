"""Small helpers for the words mauctl prints."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``, ``1,000 images``; ``many`` for an irregular plural."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
