"""`fol-infer query`: retrieve database images for query images, from an index or a map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fol_infer.choices import EncoderBackend, RerankBackend
from fol_infer.cli.app import app, console, friendly_errors, stdout, untrained_banner
from fol_infer.cli.options import (
    BackendOption,
    RayOption,
    RecordedBundleOption,
    RerankerOption,
    RerankKOption,
    ThresholdOption,
    bounded,
    float_option,
    refuse_rerank_options,
    refuse_unused,
    renamed,
)
from fol_infer.errors import ImageError, UsageError
from fol_infer.files.names import printable
from fol_infer.files.ownership import check_outputs
from fol_infer.rerank.settings import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from fol_infer.pipeline import QueryResult


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
    ctx: typer.Context,
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index or map folder.")],
    paths: Annotated[
        list[Path], typer.Argument(metavar="IMAGES...", help="Query images or folders.")
    ],
    bundle_dir: RecordedBundleOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="Results per query (of the final order).")] = 10,
    rerank_k: RerankKOption = 100,
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
        Path | None,
        typer.Option("--csv-out", help="Write one CSV row per (query, rank) here."),
    ] = None,
    csv_old: Annotated[Path | None, typer.Option("--csv", hidden=True)] = None,
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
    from fol_infer.pipeline import Retriever, open_shard_set
    from fol_infer.rerank.settings import RerankSettings
    from fol_infer.shard_set import recorded_bundle

    csv_out = renamed(csv_out, csv_old, "--csv", "--csv-out")
    if ray is None:
        refuse_unused(ctx, {"timeout": "applies to a map served on Ray: add --ray, or drop it"})
    refuse_rerank_options(ctx, no_rerank)
    if bundle_dir is None:
        bundle_dir = recorded_bundle(index_dir)
    files = find_images(paths)
    if not files:
        raise UsageError("no query images found")
    if pairs_out is not None or csv_out is not None:
        outputs = {"--pairs-out": pairs_out, "--csv-out": csv_out}
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
    shard_set = open_shard_set(index_dir, None, ray, timeout_s=timeout) if ray else index_dir
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
        stdout.print(escape(title), soft_wrap=True, highlight=False)  # whole, however long
        table = Table()
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
