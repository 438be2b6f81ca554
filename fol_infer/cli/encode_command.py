"""`fol-infer encode`: images -> global descriptors and region tokens in one .npz."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fol_infer.cli.app import app, console, friendly_errors, untrained_banner
from fol_infer.cli.model_commands import BackendOption, CheckpointOption
from fol_infer.cli.progress import progress_bar
from fol_infer.errors import UsageError
from fol_infer.fsnames import printable


@app.command()
@friendly_errors
def encode(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (recursive).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npz file.")],
    backend: BackendOption = "onnx",
    checkpoint: CheckpointOption = None,
    batch: Annotated[int, typer.Option(help="Images per forward pass.")] = 8,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Encode images: writes global (N,8448), tokens (N,3600,128), count (N,), paths (N,)."""
    import numpy as np

    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.images import find_images
    from fol_infer.loader import Failure, iter_batches

    if out.suffix != ".npz":
        raise UsageError(f"--out {out}: the output is a .npz file")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists: pass --force to overwrite it")
    if batch < 1:
        raise UsageError("--batch must be at least 1")
    bundle = Bundle.open(bundle_dir)
    untrained_banner(bundle.manifest.trained)
    files = find_images(paths)
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    encoder = open_encoder(bundle, backend, checkpoint=checkpoint)
    descriptors: list[np.ndarray] = []
    tokens: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    names: list[str] = []
    failures: list[Failure] = []
    try:
        with progress_bar(console, "encoding", total=len(files)) as advance:
            for chunk in iter_batches(files, bundle.resolution, batch, strict=strict):
                failures.extend(chunk.failures)
                if chunk.indices:
                    result = encoder.encode(chunk.images)
                    assert result.local is not None
                    descriptors.append(result.descriptors)
                    tokens.append(result.local.tokens)
                    counts.append(result.local.counts)
                    names.extend(str(files[i]) for i in chunk.indices)
                advance(len(chunk.indices) + len(chunk.failures))
    finally:
        encoder.close()
    for failure in failures:
        reason = printable(failure.reason)
        console.print(f"[yellow]skipped[/yellow] {reason}", highlight=False, soft_wrap=True)
    if not names:
        raise UsageError("no image could be read; nothing written")
    tmp = out.with_name(out.name + ".partial.npz")
    arrays = {
        "global": np.concatenate(descriptors),
        "tokens": np.concatenate(tokens),
        "count": np.concatenate(counts),
        "paths": np.array(names),
    }
    np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stubs read ** as allow_pickle
    os.replace(tmp, out)
    console.print(f"wrote {out}: {len(names)} images, {len(failures)} skipped")
