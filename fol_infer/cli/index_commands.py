"""`fol-infer index` (build or extend a database index) and `fol-infer query`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fol_infer.choices import EncoderBackend, IndexMode, RerankBackend, TokenFormat
from fol_infer.cli.app import app, console, friendly_errors, stdout, untrained_banner
from fol_infer.cli.options import (
    BackendOption,
    CheckpointOption,
    PositionsOption,
    RayOption,
    RerankerOption,
    ThresholdOption,
    bounded,
    float_option,
    tokens_option,
)
from fol_infer.cli.progress import progress_bar
from fol_infer.errors import ImageError, UsageError
from fol_infer.files.names import printable
from fol_infer.files.ownership import check_outputs
from fol_infer.positions import PositionTable, missing_note, read_positions_csv
from fol_infer.rerank.settings import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from fol_infer.pipeline import QueryResult


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
        from fol_infer.cli.map_commands import index_map

        index_map(
            bundle, db_folder, out, settings, shards, mode, ray, backend, decode_threads, wait
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


def unmatched_note(table: PositionTable, images: list[Path]) -> None:
    """Say which rows of a positions CSV match none of the `images` it was applied to."""
    note = table.unmatched_note(images)
    if note is not None:
        console.print(f"note: {escape(printable(note))}", highlight=False, soft_wrap=True)


def query_inputs(
    index_dir: Path, bundle_dir: Path, given: list[Path], files: list[Path]
) -> list[tuple[str, Path]]:
    """What a query over an index reads, which no output may overwrite (`check_outputs`): the
    index or map, the bundle, the database folder it names, the query folders and images."""
    from fol_infer.index.shards import is_map
    from fol_infer.shard_set import read_manifest

    root = Path(read_manifest(index_dir, None).root)
    return [
        ("map" if is_map(index_dir) else "index", index_dir),
        ("bundle", bundle_dir),
        ("database folder", root),
        *((("query folder" if p.is_dir() else "query image"), p) for p in given),
        *(("query image", f) for f in files),
    ]


def _write_outputs(
    results: list[QueryResult],
    names: dict[str, str],
    pairs_out: Path | None,
    csv_out: Path | None,
    allow_partial: bool,
) -> None:
    """The files the next tool reads (`fol_infer.outputs`), all or none; skipped queries are
    left out. `names`: each query file's name in the pairs file."""
    from fol_infer.files.atomic import write_outputs
    from fol_infer.outputs import csv_text, pairs_text, text_bytes

    outputs: dict[Path, bytes] = {}
    if pairs_out is not None:
        pairs = pairs_text(results, [names[r.query] for r in results], allow_partial)
        outputs[pairs_out] = text_bytes(pairs)
    if csv_out is not None:
        outputs[csv_out] = text_bytes(csv_text(results))
    write_outputs(outputs)
    if pairs_out is not None:
        console.print(f"wrote {printable(str(pairs_out))} (hloc retrieval pairs)")
    if csv_out is not None:
        console.print(f"wrote {printable(str(csv_out))}")


@app.command()
@friendly_errors
def query(
    index_dir: Annotated[Path, typer.Argument(help="Index folder.")],
    paths: Annotated[list[Path], typer.Argument(help="Query images or folders.")],
    bundle_dir: Annotated[
        Path | None,
        typer.Option("--bundle", help="Bundle folder (default: the one that built the index)."),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Results per query (of the final order).")] = 10,
    rerank_k: Annotated[int, typer.Option(min=1, help="Global candidates to re-rank.")] = 100,
    no_rerank: Annotated[
        bool, typer.Option("--no-rerank", help="Global search only (skips the local branch).")
    ] = False,
    backend: BackendOption = EncoderBackend.ONNX,
    reranker: RerankerOption = RerankBackend.AUTO,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print JSON (each hit's path and its absolute file)."),
    ] = False,
    pairs_out: Annotated[
        Path | None,
        typer.Option(
            "--pairs-out",
            help="Write hloc retrieval pairs here: 'query database' per line, final order.",
        ),
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write one CSV row per (query, rank) here.")
    ] = None,
    ray: RayOption = None,
    allow_partial: Annotated[
        bool,
        typer.Option(
            help="Answer from the shards that answer when one is down; results say which not."
        ),
    ] = False,
    timeout: Annotated[
        float,
        float_option(
            "Seconds a shard may take to answer (--ray), 0.1 to 3600.",
            bounded(0.1, 3600.0),
            metavar="SECONDS",
        ),
    ] = 30.0,
) -> None:
    """Retrieve database images for each query (from an index or a map), re-ranked by
    region-token matches."""
    from fol_infer.images import find_images
    from fol_infer.outputs import check_pairs_name, partial_warning, query_names
    from fol_infer.pipeline import Retriever
    from fol_infer.rerank.settings import RerankSettings
    from fol_infer.shard_set import ShardSet, recorded_bundle

    if bundle_dir is None:
        bundle_dir = recorded_bundle(index_dir)
    files = find_images(paths)
    if not files:
        raise UsageError("no query images found")
    if pairs_out is not None or csv_out is not None:
        outputs = {"--pairs-out": pairs_out, "--csv": csv_out}
        check_outputs(outputs, query_inputs(index_dir, bundle_dir, paths, files))
    names: dict[str, str] = {}
    if pairs_out is not None:  # names that hloc cannot tell apart or read: refused now
        names = dict(zip(map(str, files), query_names(files, paths)))
        for name in names.values():
            check_pairs_name(name)
    rerank = RerankSettings(threshold, reranker)
    if not no_rerank and rerank_k < top_k:
        console.print(
            f"note: --rerank-k {rerank_k} < --top-k {top_k}: each query's first {rerank_k} "
            "results are re-ranked (with a match count), the rest follow in the global order",
            highlight=False,
            soft_wrap=True,
        )
    results = []
    shard_set = ShardSet.ray(index_dir, None, ray, timeout) if ray else index_dir
    with Retriever(
        bundle_dir, shard_set, backend=backend, rerank=rerank, allow_partial=allow_partial
    ) as retriever:
        if not as_json:
            untrained_banner(retriever.bundle.manifest.trained)
        for path in files:
            try:
                results.extend(retriever.query([path], top_k, rerank_k, rerank=not no_rerank))
            except ImageError as exc:  # one unreadable query must not lose the others
                message = printable(str(exc))
                console.print(
                    f"[yellow]skipped[/yellow] {message}", highlight=False, soft_wrap=True
                )
    _write_outputs(results, names, pairs_out, csv_out, allow_partial)
    warning = partial_warning(results)
    if warning is not None:  # whatever the format: stderr says it, every output marks it
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    if as_json:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return
    for r in results:
        title = printable(r.query)
        if r.partial:
            title += f" [PARTIAL: shards {', '.join(r.missing_shards)} did not answer]"
        table = Table(title=escape(title), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("global (score)")
        if r.reranked is not None:
            table.add_column(f"re-ranked (matches above {r.threshold})")
        for i, hit in enumerate(r.global_hits):
            row = [str(hit.rank), f"{printable(hit.path)} ({hit.score:.3f})"]
            if r.reranked is not None:
                rr = r.reranked[i] if i < len(r.reranked) else None
                row.append(f"{printable(rr.path)} ({rr.matches})" if rr else "")
            table.add_row(*row)
        stdout.print(table)
