"""The `fol-infer` command line: a thin typer layer; heavy imports stay inside commands."""

from __future__ import annotations

from fol_infer.cli import encode_command, model_commands  # noqa: F401  (register commands)
from fol_infer.cli.app import app


def main() -> None:
    app(prog_name="fol-infer")


__all__ = ["app", "main"]
