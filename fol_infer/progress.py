"""The progress callbacks long library work reports through; the CLI draws them with rich.

Two shapes, one home: `Progress` says in words what a long step is doing now (export, engine
builds), `Advance` counts items done (encoding, indexing, drawing a dataset). The library
never prints: a caller that passes nothing gets `silent`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Progress = Callable[[str], None]


class Advance(Protocol):
    """``advance(n, total)``: n more items done; ``total``, when given, is the new total."""

    def __call__(self, n: int, total: int | None = None, /) -> None: ...


def silent(_message: str) -> None:
    """A `Progress` that reports nothing."""
