"""`fol-infer show regions|matches|results`: figures of what FoL sees, matched and returned."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fol_infer.choices import EncoderBackend, RerankBackend
from fol_infer.cli.app import (
    Group,
    app,
    console,
    friendly_errors,
    unmatched_note,
    untrained_banner,
)
from fol_infer.cli.options import (
    BackendOption,
    PositionsOption,
    RadiusOption,
    RecordedBundleOption,
    RerankerOption,
    RerankKOption,
    ThresholdOption,
    refuse_rerank_options,
)
from fol_infer.cli.query_command import query_inputs
from fol_infer.errors import UsageError
from fol_infer.files.ownership import check_outputs
from fol_infer.positions import RADIUS_M
from fol_infer.rerank.settings import DEFAULT_THRESHOLD, RerankSettings

if TYPE_CHECKING:
    from fol_infer.viz.tokens import EncodedImage

show_app = typer.Typer(
    help="Figures (PNG or SVG by the --out suffix): regions, token matches, results.",
    no_args_is_help=True,
    cls=Group,
)
app.add_typer(show_app, name="show")

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Figure file: .png or .svg.")]


def _encode(
    bundle_dir: Path, images: list[Path], backend: EncoderBackend
) -> tuple[bool, list[EncodedImage]]:
    """Whether the bundle's weights are trained, and each image through both branches."""
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.viz.tokens import encode_image

    bundle = Bundle.open(bundle_dir)
    untrained_banner(bundle.manifest.trained)
    with open_encoder(bundle, backend) as encoder:
        return bundle.manifest.trained, [encode_image(encoder, bundle, p) for p in images]


@show_app.command("regions")
@friendly_errors
def regions(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    image: Annotated[Path, typer.Argument(help="An image.")],
    out: OutOption,
    backend: BackendOption = EncoderBackend.ONNX,
) -> None:
    """The image with the 225 regions the local branch keeps, coloured by confidence."""
    from fol_infer.viz.figure import check_out
    from fol_infer.viz.regions import draw_regions, region_figure

    check_out(out)
    check_outputs({"--out": out}, {"bundle": bundle_dir, "image": image})
    trained, (encoded,) = _encode(bundle_dir, [image], backend)
    data = region_figure(encoded)
    draw_regions(data, out, trained)
    console.print(f"wrote {out}: {len(data.boxes)} regions", soft_wrap=True)


@show_app.command("matches")
@friendly_errors
def matches(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    query: Annotated[Path, typer.Argument(help="Query image.")],
    candidate: Annotated[Path, typer.Argument(help="Candidate (database) image.")],
    out: OutOption,
    candidate_bundle: Annotated[
        Path | None,
        typer.Option(
            help="Bundle that encodes the candidate (default: the same); must match the first."
        ),
    ] = None,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    reranker: RerankerOption = RerankBackend.AUTO,
    max_lines: Annotated[
        int, typer.Option(min=0, help="Most match lines drawn (subsampled; 0: tokens only).")
    ] = 80,
    backend: BackendOption = EncoderBackend.ONNX,
) -> None:
    """Two images side by side, the token pairs re-ranking counts drawn as lines."""
    from fol_infer.viz.figure import check_out
    from fol_infer.viz.matches import draw_matches, match_figure

    check_out(out)
    inputs = [("bundle", bundle_dir), ("query image", query), ("candidate image", candidate)]
    if candidate_bundle is not None:
        inputs.append(("candidate bundle", candidate_bundle))
    check_outputs({"--out": out}, inputs)
    settings = RerankSettings(threshold, reranker)
    if candidate_bundle is None:
        trained, (q, c) = _encode(bundle_dir, [query, candidate], backend)
    else:
        trained, (q,) = _encode(bundle_dir, [query], backend)
        other_trained, (c,) = _encode(candidate_bundle, [candidate], backend)
        trained = trained and other_trained
    data = match_figure(q, c, settings, max_lines)
    draw_matches(data, out, trained)
    console.print(f"wrote {out}: {data.count} matches, {len(data.shown)} drawn", soft_wrap=True)


@show_app.command("results")
@friendly_errors
def results(
    ctx: typer.Context,
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index or map folder.")],
    queries: Annotated[list[Path], typer.Argument(help="Query images or folders.")],
    out: OutOption,
    bundle_dir: RecordedBundleOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="Results shown per query and list.")] = 5,
    rerank_k: RerankKOption = 100,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Global list only.")] = False,
    positions: PositionsOption = None,
    positive_radius: RadiusOption = RADIUS_M,
    reranker: RerankerOption = RerankBackend.AUTO,
    threshold: ThresholdOption = DEFAULT_THRESHOLD,
    backend: BackendOption = EncoderBackend.ONNX,
) -> None:
    """Each query with its global and re-ranked top-K; green/red frames when positions are
    known (from the index, file names or --positions)."""
    from fol_infer.images import find_images
    from fol_infer.index.positions_store import load_positions
    from fol_infer.pipeline import Retriever
    from fol_infer.positions import positions_of, read_positions_csv
    from fol_infer.shard_set import recorded_bundle
    from fol_infer.viz.figure import check_out
    from fol_infer.viz.results import draw_results, results_figure

    refuse_rerank_options(ctx, no_rerank)
    check_out(out)
    table = read_positions_csv(positions) if positions else None
    files = find_images(queries)
    if not files:
        raise UsageError("no query images found")
    rerank = RerankSettings(threshold, reranker)
    bundle = bundle_dir or recorded_bundle(index_dir)
    inputs = query_inputs(index_dir, bundle, queries, files)
    check_outputs({"--out": out}, inputs + ([("positions CSV", positions)] if positions else []))
    with Retriever(bundle, index_dir, backend=backend, rerank=rerank) as retriever:
        trained = retriever.bundle.manifest.trained
        untrained_banner(trained)
        found = retriever.query(files, top_k, rerank_k, rerank=not no_rerank)
        shards = retriever.shards
        absolute = [shards.absolute_path(i) for i in range(len(shards))]
        if table is None:
            db_positions, db_missing = load_positions(shards.folder, shards.paths, absolute)
        else:
            db_positions, db_missing = positions_of(absolute, table)
    query_positions, _ = positions_of(files, table)
    if table is not None:
        unmatched_note(table, [*absolute, *files])
    data = results_figure(found, db_positions, query_positions, positive_radius, db_missing)
    for note in data.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    draw_results(data, out, trained)
    console.print(f"wrote {out}: {len(found)} queries, top {top_k}", soft_wrap=True)


@show_app.command("bench")
@friendly_errors
def bench_reports(
    reports: Annotated[list[Path], typer.Argument(help="Reports of fol-infer bench --json.")],
    out: OutOption,
) -> None:
    """Benchmark reports side by side: p50 stage latency and recall vs re-rank depth."""
    from fol_infer.viz.bench_charts import chart_series, draw_bench, load_report
    from fol_infer.viz.figure import check_out

    check_out(out)
    check_outputs({"--out": out}, [("report", p) for p in reports])
    series = chart_series([load_report(p) for p in reports], [p.stem for p in reports])
    draw_bench(series, out)
    console.print(f"wrote {out}: {len(series)} reports", soft_wrap=True)
