"""The `fol-infer` command line: a thin typer layer; heavy imports stay inside commands."""

from __future__ import annotations

from fol_infer.cli import (  # noqa: F401  (importing registers the commands)
    bench_command,
    build_trt_command,
    encode_command,
    export_command,
    index_command,
    info_command,
    make_checkpoint_command,
    make_dataset_command,
    query_command,
    repair_command,
    show_command,
    verify_command,
)
from fol_infer.cli.app import app


def main() -> None:
    app(prog_name="fol-infer")


__all__ = ["app", "main"]
