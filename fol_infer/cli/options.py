"""Typer options shared by several commands, and the one way a choice list becomes an option.

`choice` builds an option from an enum of `fol_infer.choices`: typer converts and validates
the word, the help lists the enum's values, and a wrong word is refused with those values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fol_infer.choices import Choice, EncoderBackend, RerankBackend, TokenFormat
from fol_infer.rerank.settings import DEFAULT_THRESHOLD

C = TypeVar("C", bound=Choice)


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
    typer.Option(
        help="Re-ranking threshold: a token pair matches when its cosine similarity is above it "
        f"(the published value is {DEFAULT_THRESHOLD})."
    ),
]
BatchOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]
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
    typer.Option(help="A database image within this many metres of a query is a positive."),
]
