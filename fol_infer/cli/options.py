"""Typer options shared by several commands, and the one way a choice list or a float becomes
an option.

`choice` builds an option from an enum of `fol_infer.choices`: typer converts and validates
the word, the help lists the enum's values, and a wrong word is refused with those values.
`float_option` builds every float option: text, NaN and infinities (typer takes ``nan``,
``inf`` and ``1e309`` as floats) and values its check refuses are typer's own usage error
(exit 2) naming the option; `bounded` is the check for a range. Counts use typer's ``min=``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fol_infer.choices import Choice, EncoderBackend, RerankBackend, TokenFormat
from fol_infer.cli.app import console
from fol_infer.errors import UsageError
from fol_infer.positions import check_radius
from fol_infer.rerank.settings import DEFAULT_THRESHOLD, check_threshold

C = TypeVar("C", bound=Choice)
T = TypeVar("T")


def choice(enum: type[C], help: str, *names: str, hidden: bool = False) -> Any:
    """A typer option taking one of ``enum``'s values, which its help shows."""

    def parse(value: str | C) -> C:
        try:
            return enum(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not one of {enum.listed()}") from None

    return typer.Option(
        *names,
        parser=parse,
        metavar="|".join(enum.values()),
        help=help,
        hidden=hidden,
    )


def float_option(
    help: str, check: Callable[[float], object], *names: str, metavar: str = "FLOAT"
) -> Any:
    """A typer option taking a float that `check` accepts (it raises `UsageError` otherwise)."""

    def parse(value: str | float) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"{value!r} is not a number") from None
        try:
            check(number)
        except UsageError as exc:
            raise typer.BadParameter(str(exc)) from None
        return number

    return typer.Option(*names, parser=parse, metavar=metavar, help=help)


def bounded(lo: float, hi: float = math.inf, above: bool = False) -> Callable[[float], None]:
    """A check refusing NaN, infinities and numbers outside [lo, hi] (with `above`: (lo, hi])."""

    def check(number: float) -> None:
        low_ok = number > lo if above else number >= lo
        if not (math.isfinite(number) and low_ok and number <= hi):
            low = f"> {lo:g}" if above else f">= {lo:g}"
            high = f" and <= {hi:g}" if math.isfinite(hi) else ""
            raise UsageError(f"must be a finite number {low}{high}, got {number:g}")

    return check


BackendOption = Annotated[
    EncoderBackend, choice(EncoderBackend, "Encoder backend.", "--backend", "-b")
]
CheckpointOption = Annotated[
    Path | None,
    typer.Option("--checkpoint", help="Checkpoint for the torch backend (default: the bundle's)."),
]
RerankerOption = Annotated[
    RerankBackend,
    choice(
        RerankBackend,
        "Re-ranker (auto: triton on a working GPU, else the bundle's rerank engine, else cpu).",
        "--reranker",
    ),
]
ThresholdOption = Annotated[
    float,
    float_option(
        "Re-ranking threshold in [-1, 1): a token pair matches when its cosine similarity is "
        f"above it (the published value is {DEFAULT_THRESHOLD}).",
        check_threshold,
    ),
]
BatchOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]
RecordedBundleOption = Annotated[
    Path | None,
    typer.Option("--bundle", help="Bundle folder (default: the one that built the index)."),
]
RerankKOption = Annotated[int, typer.Option(min=1, help="Global candidates to re-rank.")]
RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="auto|ADDRESS",
        help="Run on Ray: 'auto' (this machine's cluster, else a local one) or HEAD:PORT.",
    ),
]


def tokens_option(help: str) -> Any:
    """``--tokens``: the index's token format (the help differs between index and bench)."""
    return choice(TokenFormat, help, "--tokens")


PositionsOption = Annotated[
    Path | None,
    typer.Option(
        "--positions",
        help="CSV of image positions: path,easting,northing (UTM metres) or path,lat,lon "
        "(degrees); paths relative to the CSV's folder [the @east@north@ in file names].",
    ),
]
RadiusOption = Annotated[
    float,
    float_option(
        "A database image within this many metres (> 0) of a query is a positive.",
        check_radius,
        metavar="METRES",
    ),
]


def renamed(new_value: T | None, old_value: T | None, old: str, new: str) -> T | None:
    """An option's value under its new name, or under the old one still accepted for one
    release (with a note saying so); both at once is refused."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise UsageError(f"{old} and {new} are the same option: give {new} only")
    console.print(f"note: {old} is now {new}; {old} is accepted until the next release")
    return old_value


def refuse_unused(ctx: typer.Context, unused: dict[str, str]) -> None:
    """Refuse options the user gave that this invocation cannot use (parameter name -> why),
    rather than dropping them without a word; defaults left alone pass."""
    for name, why in unused.items():
        source = ctx.get_parameter_source(name)
        if source is None or source.name == "DEFAULT":
            continue
        flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
        raise UsageError(f"{flag} {why}")


def refuse_rerank_options(ctx: typer.Context, no_rerank: bool) -> None:
    """With --no-rerank, the re-ranking options given are refused, not dropped."""
    if no_rerank:
        why = "has no effect with --no-rerank: drop one of the two"
        refuse_unused(ctx, {"rerank_k": why, "reranker": why, "threshold": why})
