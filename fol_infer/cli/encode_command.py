"""`fol-infer encode`: images -> global descriptors and region tokens in one .npz."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fol_infer.choices import EncoderBackend
from fol_infer.cli.app import app, console, friendly_errors, untrained_banner
from fol_infer.cli.options import BackendOption, BatchOption, CheckpointOption
from fol_infer.cli.progress import progress_bar
from fol_infer.errors import UsageError
from fol_infer.files.names import printable
from fol_infer.files.ownership import check_outputs


@app.command()
@friendly_errors
def encode(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (recursive).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npz file.")],
    backend: BackendOption = EncoderBackend.ONNX,
    checkpoint: CheckpointOption = None,
    batch: BatchOption = 8,
    strict: Annotated[bool, typer.Option(help="Stop at the first unreadable image.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite --out.")] = False,
) -> None:
    """Encode images: writes global (N,8448), tokens (N,3600,128), count (N,), paths (N,)."""
    from fol_infer.backends import open_encoder
    from fol_infer.bundle import Bundle
    from fol_infer.encoding import encode_images
    from fol_infer.images import find_images

    if out.suffix != ".npz":
        raise UsageError(f"--out {out}: the output is a .npz file")
    files = find_images(paths)
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, paths))}")
    given = [("image folder" if p.is_dir() else "image", p) for p in paths]
    inputs = [("bundle", bundle_dir), *given, *(("image", f) for f in files)]
    check_outputs({"--out": out}, inputs + ([("checkpoint", checkpoint)] if checkpoint else []))
    if out.exists() and not force:
        raise UsageError(f"{out} already exists: pass --force to overwrite it")
    bundle = Bundle.open(bundle_dir)
    untrained_banner(bundle.manifest.trained)
    encoder = open_encoder(bundle, backend, checkpoint=checkpoint)
    try:
        with progress_bar(console, "encoding", total=len(files)) as advance:
            encoded = encode_images(encoder, files, batch, strict=strict, progress=advance)
    finally:
        encoder.close()
    for failure in encoded.failures:
        reason = printable(failure.reason)
        console.print(f"[yellow]skipped[/yellow] {reason}", highlight=False, soft_wrap=True)
    if not encoded.paths:
        raise UsageError("no image could be read; nothing written")
    encoded.save_npz(out)
    console.print(f"wrote {out}: {len(encoded.paths)} images, {len(encoded.failures)} skipped")
