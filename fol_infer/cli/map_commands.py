"""`fol-infer index --shards/--ray`: build a sharded map here or on Ray (see index/map_build)."""

from __future__ import annotations

from pathlib import Path

from fol_infer.bundle import Bundle
from fol_infer.cli.app import console
from fol_infer.cli.progress import progress_bar
from fol_infer.files.names import printable
from fol_infer.index.build import BuildSettings
from fol_infer.index.map_build import LocalRunner, MapMode, ShardRunner, build_map


def index_map(
    bundle: Bundle,
    db_folder: Path,
    out: Path,
    settings: BuildSettings,
    shards: int | None,
    mode: MapMode,
    ray: str | None,
    backend: str,
    decode_threads: int,
    wait: bool = False,
) -> None:
    """Build, resume or extend the map at `out` and print what was done."""

    def notice(message: str) -> None:
        console.print(printable(message), highlight=False, soft_wrap=True)

    runner: ShardRunner
    if ray is not None:
        from fol_infer.distributed.build import RayRunner

        ray_runner = RayRunner(ray, backend, decode_threads=decode_threads)
        runner, close = ray_runner, ray_runner.close
    else:
        from fol_infer.backends import open_encoder

        encoder = open_encoder(bundle, backend)
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
