"""`fol-infer repair`: check an index, a map or one shard, and repair what is damaged."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.choices import EncoderBackend
from fol_infer.cli.app import app, console, friendly_errors
from fol_infer.cli.options import BackendOption
from fol_infer.cli.progress import progress_when_needed
from fol_infer.files.names import printable


@app.command()
@friendly_errors
def repair(
    target: Annotated[Path, typer.Argument(help="Index, map, or a shard folder of a map.")],
    backend: BackendOption = EncoderBackend.ONNX,
    wait: Annotated[
        bool,
        typer.Option(help="If another process is writing it, wait for it (default: stop)."),
    ] = False,
) -> None:
    """Check every file (store checksums, global.faiss's sha256) and repair what is damaged:
    global.faiss and a map's quantizer are rebuilt from the stored descriptors; damaged
    stores, and missing or replaced shards, are encoded again from their database images."""
    from fol_infer.backends import open_encoder
    from fol_infer.index.repair import repair as repair_target

    with progress_when_needed(console, "encoding") as advance:
        report = repair_target(
            target, lambda bundle: open_encoder(bundle, backend), advance, wait=wait
        )
    for fix in report.repaired:
        console.print(f"[green]repaired[/green] {printable(fix)}", highlight=False, soft_wrap=True)
    what = f"{report.checked} {'folders' if report.checked > 1 else 'folder'} checked"
    done = f"{len(report.repaired)} repaired" if report.repaired else "nothing damaged"
    console.print(f"{printable(str(report.target))}: {what}, {done}", highlight=False)
