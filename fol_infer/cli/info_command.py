"""`fol-infer info`: what a bundle or a checkpoint is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fol_infer.bundle import Bundle
from fol_infer.cli.app import app, friendly_errors, stdout, untrained_banner


@app.command()
@friendly_errors
def info(
    path: Annotated[Path, typer.Argument(help="A bundle folder or a checkpoint file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say what a bundle or checkpoint is: architecture, resolution, sizes, checksums."""
    if path.is_dir():
        bundle = Bundle.open(path, verify="sizes")
        data = bundle.manifest.to_dict()
    else:
        from fol_infer.model.checkpoint import describe_checkpoint

        data = describe_checkpoint(path)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    untrained_banner(bool(data.get("trained", True)))
    table = Table(show_header=False, title=str(path))
    for key, value in data.items():
        if isinstance(value, dict):
            value = (
                json.dumps(value, indent=1) if len(json.dumps(value)) > 60 else json.dumps(value)
            )
        table.add_row(key, str(value))
    stdout.print(table)
