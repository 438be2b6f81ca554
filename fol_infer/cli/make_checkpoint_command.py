"""`fol-infer make-checkpoint`: a seeded random checkpoint in the published layout, UNTRAINED."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.cli.app import app, console, friendly_errors, untrained_banner
from fol_infer.errors import UsageError
from fol_infer.files.ownership import check_outputs


@app.command("make-checkpoint")
@friendly_errors
def make_checkpoint(
    out: Annotated[Path, typer.Argument(help="Where to write the .pth file.")],
    arch: Annotated[str, typer.Option(help="vits14, vitb14, vitl14, vitg14 or tiny.")] = "vitb14",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same weights.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a seeded random checkpoint in the published layout, marked UNTRAINED."""
    from fol_infer.model.arch import get_arch
    from fol_infer.model.checkpoint import make_checkpoint as make

    get_arch(arch)
    check_outputs({"OUT": out})
    if out.exists() and not force:
        raise UsageError(f"{out} already exists: pass --force to overwrite it")
    make(arch, seed, out)
    untrained_banner(False)
    console.print(f"wrote {out} ({arch}, seed {seed}, {out.stat().st_size / 2**20:.1f} MiB)")
