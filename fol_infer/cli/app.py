"""The typer app, its error handling and console; commands live in sibling modules."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fol_infer import __version__
from fol_infer.errors import FolInferError
from fol_infer.files.names import printable
from fol_infer.progress import Progress

if TYPE_CHECKING:
    from pathlib import Path

    from fol_infer.positions import PositionTable

_PLACEHOLDERS = {int: "N", float: "FLOAT", str: "TEXT"}


class Group(TyperGroup):
    """Typer's group, with every placeholder upper-case: an argument shows its name (BUNDLE),
    an option its kind (PATH, N, FLOAT, TEXT), wherever the command does not name it."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        for param in getattr(command, "params", ()):
            if param.metavar is not None or getattr(param, "is_flag", False):
                continue
            if param.param_type_name == "argument":
                param.metavar = (param.name or "").upper()
                continue
            kind = getattr(param, "type_descriptor", None)
            if kind is not None and kind.is_path:
                param.metavar = "PATH"
            elif kind is not None:
                param.metavar = _PLACEHOLDERS.get(kind.annotation, "TEXT")
        return command


app = typer.Typer(
    name="fol-infer",
    help="FoL visual place recognition: export engines, encode, index, query, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)
console = Console(stderr=True)  # progress, notices, errors
stdout = Console()  # results
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn the toolkit's own errors into one line on stderr and their exit code."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FolInferError as exc:
            message = escape(printable(str(exc)))
            console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def status(label: str) -> Iterator[Progress]:
    """A spinner on stderr; the `Progress` it yields replaces its text (long library steps)."""
    with console.status(label) as spinner:
        yield lambda message: spinner.update(message)


def untrained_banner(trained: bool) -> None:
    if not trained:
        console.print(
            "[bold yellow]UNTRAINED[/bold yellow] random weights (fol-infer make-checkpoint): "
            "outputs exercise the pipeline but say nothing about FoL's accuracy"
        )


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at emit time (a test runner may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break the command
            self.handleError(record)


class _PlainFormatter(logging.Formatter):
    """'note: ...' and 'warning: ...', without logger names: they speak to the user."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        return f"{prefix}: {record.getMessage()}"


def configure_logging(verbose: bool) -> None:
    """Quiet by default: the toolkit's notes and warnings, other libraries' warnings only.
    ``--verbose``: everything at debug level, every library, with logger names."""
    ours = logging.getLogger("fol_infer")
    ours.handlers = [h for h in ours.handlers if not isinstance(h, _StderrHandler)]
    if verbose:
        ours.setLevel(logging.NOTSET)
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger().setLevel(logging.DEBUG)
        return
    handler = _StderrHandler()
    handler.setFormatter(_PlainFormatter())
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Debug logging, with other libraries' messages."),
    ] = False,
) -> None:
    for stream in (sys.stdout, sys.stderr):  # a name no codec can print must not end a run
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    configure_logging(verbose)


@app.command()
def version() -> None:
    """Print the toolkit version."""
    print(__version__)


def unmatched_note(table: PositionTable, images: list[Path]) -> None:
    """Say which rows of a positions CSV match none of the `images` it was applied to."""
    note = table.unmatched_note(images)
    if note is not None:
        console.print(f"note: {escape(printable(note))}", highlight=False, soft_wrap=True)
