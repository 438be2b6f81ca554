"""One progress bar style for long work: count, rate, ETA."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fol_infer.progress import Advance


@contextmanager
def progress_bar(console: Console, label: str, total: int, unit: str = "img") -> Iterator[Advance]:
    """Yields `advance(n, total=None)`; shows images/s and the time left."""
    columns = (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total, rate="")

        def advance(n: int, new_total: int | None = None) -> None:
            if new_total is not None:
                progress.update(task, total=new_total)
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f} {unit}/s" if speed else "")

        yield advance


@contextmanager
def progress_when_needed(console: Console, label: str) -> Iterator[Advance]:
    """A `progress_bar` drawn from the first advance on: work that turns out to need no
    encoding (a repair with nothing damaged) shows no empty bar."""
    with ExitStack() as stack:
        bars: list[Advance] = []

        def advance(n: int, new_total: int | None = None) -> None:
            if not bars:
                bars.append(stack.enter_context(progress_bar(console, label, new_total or 0)))
            bars[0](n, new_total)

        yield advance
