"""`fol-infer make-dataset`: a small synthetic dataset in the standard layout, for benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.cli.app import app, console, friendly_errors
from fol_infer.cli.progress import progress_bar


@app.command("make-dataset")
@friendly_errors
def make_dataset(
    out: Annotated[Path, typer.Argument(help="Folder to create (images/test/...).")],
    places: Annotated[int, typer.Option(min=1, help="Distinct places.")] = 20,
    queries_per_place: Annotated[int, typer.Option(min=1, help="Query views of each place.")] = 2,
    distractors: Annotated[
        int | None,
        typer.Option(
            min=0, help="Database images far from every query (default: as many as --places)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Same seed, byte-identical dataset.")] = 0,
    force: Annotated[
        bool, typer.Option(help="Replace OUT if it is empty or a synthetic dataset.")
    ] = False,
) -> None:
    """Draw a deterministic synthetic dataset: exercises the pipeline, not FoL's accuracy."""
    from fol_infer.bench.synthetic import plan_dataset

    plan = plan_dataset(places, queries_per_place, distractors, seed)
    with progress_bar(console, "drawing", total=len(plan.views)) as advance:
        plan.write(out, force=force, progress=advance)
    n_queries = sum(v.query for v in plan.views)
    console.print(
        f"wrote {out}: {len(plan.views) - n_queries} database images "
        f"({plan.distractors} of them distractors), {n_queries} queries, seed {seed}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        "[bold yellow]SYNTHETIC[/bold yellow] drawn scenes: benchmarks on them exercise the "
        "pipeline but say nothing about FoL's accuracy"
    )
