"""`fol-infer index`: build, resume or extend an index, or a map of shards (here or on Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend, IndexMode, TokenFormat
from fol_infer.cli.app import app, console, friendly_errors, unmatched_note, untrained_banner
from fol_infer.cli.options import (
    BackendOption,
    CheckpointOption,
    PositionsOption,
    RayOption,
    tokens_option,
)
from fol_infer.cli.progress import progress_bar
from fol_infer.errors import UsageError
from fol_infer.files.names import printable
from fol_infer.index.build import BuildSettings
from fol_infer.index.map_build import LocalRunner, MapMode, ShardRunner, build_map
from fol_infer.positions import PositionTable, missing_note, read_positions_csv

if TYPE_CHECKING:
    pass


@app.command()
@friendly_errors
def index(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    db_folder: Annotated[Path, typer.Argument(help="Folder of database images (recursive).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder.")],
    backend: BackendOption = EncoderBackend.ONNX,
    checkpoint: CheckpointOption = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per forward pass and per commit.")] = 8,
    tokens: Annotated[
        TokenFormat,
        tokens_option(
            "Token storage: fp16; int8 (+ a scale per token, 0.24x the published bytes, "
            "approximate counts); int8-exact (int8 scored, float32 kept on disk for the rows "
            "its error bound cannot decide: float32 counts)."
        ),
    ] = TokenFormat.FP16,
    faiss: Annotated[
        str,
        typer.Option(
            "--faiss", help='FAISS factory string, e.g. "Flat", "HNSW32", "IVF4096,PQ64".'
        ),
    ] = "Flat",
    append: Annotated[
        bool, typer.Option(help="Add the images not yet indexed to an existing index.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Rebuild an existing index (the old one stays until the new one is done). "
            "Replaces only a fol-infer index, never other files or a folder holding the input."
        ),
    ] = False,
    shards: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Build a sharded map of N ordinary indexes (with --append: N new shards).",
        ),
    ] = None,
    ray: RayOption = None,
    decode_threads: Annotated[
        int,
        typer.Option(min=1, help="Image-decoding threads per encoder (per Ray task with --ray)."),
    ] = 2,
    wait: Annotated[
        bool,
        typer.Option(help="If another process is writing this index, wait for it (default: stop)."),
    ] = False,
    positions: PositionsOption = None,
) -> None:
    """Index a database: global descriptors in FAISS, region tokens in a memory-mapped store.

    With --shards (or --ray, or when --out is a map) the index is a map of shards, built
    shard after shard here or one Ray task per shard. An interrupted build resumes when the
    same command is run again.
    """
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.index.build import BuildSettings, build_index

    if append and force:
        raise UsageError("--append and --force exclude each other")
    if not db_folder.is_dir():
        raise UsageError(f"database folder not found: {db_folder}")
    table = read_positions_csv(positions) if positions else None  # bad rows fail before work
    bundle = Bundle.open(bundle_dir)
    untrained_banner(bundle.manifest.trained)
    settings = BuildSettings(factory=faiss, tokens=tokens, batch=batch)
    mode: IndexMode = "append" if append else "force" if force else "new"
    if shards is not None or ray is not None or (out / "map.json").is_file():
        index_map(
            bundle,
            db_folder,
            out,
            settings,
            shards=shards,
            mode=mode,
            ray=ray,
            backend=backend,
            checkpoint=checkpoint,
            decode_threads=decode_threads,
            wait=wait,
        )
        if table is not None:
            _record_positions(out, table)
        return
    encoder = open_encoder(bundle, backend, checkpoint=checkpoint)

    def notice(message: str) -> None:
        console.print(printable(message), highlight=False, soft_wrap=True)

    try:
        with progress_bar(console, "indexing", total=0) as advance:
            report = build_index(
                bundle, encoder, db_folder, out, settings, mode, advance, wait, notice
            )
    finally:
        encoder.close()
    for path in report.retried:
        note = "failed before and changed since, tried again"
        console.print(f"[cyan]retried[/cyan] {printable(path)}: {note}", highlight=False)
    for path, reason in report.failures:
        console.print(
            f"[yellow]skipped[/yellow] {printable(path)}: {printable(reason)}",
            highlight=False,
            soft_wrap=True,
        )
    resumed = (
        f" (resumed after {report.resumed_from})" if report.resumed_from and mode == "new" else ""
    )
    retried = f", {len(report.retried)} retried" if report.retried else ""
    console.print(
        f"{printable(str(out))}: {report.total} images indexed, {report.added} added{resumed} at "
        f"{report.images_per_second:.1f} img/s, {len(report.failures)} skipped{retried}",
        highlight=False,
    )
    if table is not None:
        _record_positions(out, table)


def _record_positions(out: Path, table: PositionTable) -> None:
    """Keep the CSV's positions with the index or map; name the images that have none. After
    the build's commit: a run stopped in between writes them when run again."""
    from fol_infer.index.positions_store import record_positions
    from fol_infer.shard_set import indexed_paths

    names, root = indexed_paths(out)
    absolute = [root / name for name in names]
    missing = record_positions(out, names, absolute, table)
    source = printable(str(table.source))
    console.print(f"positions from {source}: {len(names) - len(missing)} of {len(names)}")
    if missing:
        console.print(
            f"[yellow]{missing_note(missing, len(names), 'database')}[/yellow]",
            highlight=False,
            soft_wrap=True,
        )
    unmatched_note(table, absolute)


def index_map(
    bundle: Bundle,
    db_folder: Path,
    out: Path,
    settings: BuildSettings,
    *,
    shards: int | None,
    mode: MapMode,
    ray: str | None,
    backend: str,
    checkpoint: Path | None,
    decode_threads: int,
    wait: bool,
) -> None:
    """Build, resume or extend the map at `out` and print what was done."""

    def notice(message: str) -> None:
        console.print(printable(message), highlight=False, soft_wrap=True)

    runner: ShardRunner
    if ray is not None:
        from fol_infer.distributed.build import RayRunner

        ray_runner = RayRunner(ray, backend, decode_threads=decode_threads, checkpoint=checkpoint)
        runner, close = ray_runner, ray_runner.close
    else:
        from fol_infer.backends import open_encoder

        encoder = open_encoder(bundle, backend, checkpoint=checkpoint)
        runner, close = LocalRunner(encoder), encoder.close
    try:
        with progress_bar(console, "indexing", total=0) as advance:
            report = build_map(
                bundle, db_folder, out, runner, settings, shards, mode, advance, wait, notice
            )
    finally:
        close()
    for path, reason in report.failures:
        console.print(
            f"[yellow]skipped[/yellow] {printable(path)}: {printable(reason)}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"{out}: map of {report.shards} shards, {report.total} images, {report.added} added at "
        f"{report.images_per_second:.1f} img/s, {len(report.failures)} skipped"
    )
    if report.approximate:
        console.print(
            "[yellow]approximate[/yellow]: each shard has its own search graph, so a map's "
            "global hits can differ from a single HNSW index's (Flat, IVF and PQ are exact)"
        )
