"""Checkpoint -> bundle: ONNX graphs for both branches and the re-ranker, reference outputs,
manifest.

Everything is written into a temporary sibling folder that is renamed into place at the end,
so an interrupted or failed export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from fol_infer.bundle import MAX_BATCH, PRODUCT, GraphSpec, Manifest, TensorSpec
from fol_infer.errors import UsageError
from fol_infer.export.reference import reference_images, reference_rerank_counts
from fol_infer.files.atomic import replace_folder
from fol_infer.files.integrity import sha256_file
from fol_infer.files.ownership import check_replaceable, occupied
from fol_infer.images import DEFAULT_RESOLUTION, check_resolution
from fol_infer.model.checkpoint import LoadedCheckpoint, load_checkpoint
from fol_infer.model.graphs import (
    GLOBAL_INPUTS,
    GLOBAL_OUTPUTS,
    LOCAL_INPUTS,
    LOCAL_OUTPUTS,
    GlobalGraph,
    LocalGraph,
)
from fol_infer.progress import Progress, silent
from fol_infer.rerank.graph import GRAPH_FILE, write_rerank_graph

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
EXAMPLE_BATCH = 2  # > 1 so the exporter keeps the batch axis symbolic
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with margin (ViT-G)
ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}


def default_bundle_dir(arch: str, resolution: tuple[int, int]) -> Path:
    h, w = resolution
    return Path("engines") / (f"{arch}-{h}" if h == w else f"{arch}-{h}x{w}")


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
        specs.append(TensorSpec(v.name, shape, ONNX_DTYPES.get(t.elem_type, str(t.elem_type))))
    return specs


def _graph_spec(path: Path) -> GraphSpec:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return GraphSpec(
        file=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        inputs=_tensor_specs(model.graph.input),
        outputs=_tensor_specs(model.graph.output),
    )


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    opset: int,
) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_shapes={name: {0: batch} for name in inputs},
            opset_version=opset,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=params > EXTERNAL_DATA_BYTES)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hold torch's exporter logs (e.g. "torchvision is not installed. Skipping ...", about
    ops FoL never uses) to errors, unless debug logging (``--verbose``) is on."""
    exporter = logging.getLogger("torch.onnx")
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    level = exporter.level
    exporter.setLevel(logging.ERROR)
    try:
        yield
    finally:
        exporter.setLevel(level)


def _reference_outputs(
    global_graph: GlobalGraph, local_graph: LocalGraph, images: np.ndarray
) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        descriptor, features, confidence = global_graph(torch.from_numpy(images))
        tokens, count, region = local_graph(features, confidence)
    return {
        "images": images,
        "global": descriptor.numpy(),
        "features": features.numpy(),
        "confidence": confidence.numpy(),
        "tokens": tokens.numpy(),
        "count": count.numpy().astype(np.int64),
        "region_mask": region.numpy(),
    }


def _check_out(out: Path, force: bool, checkpoint: Path) -> None:
    """Refuse an existing `out` without --force, and with it anything but a bundle."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise UsageError(occupied(out, PRODUCT))
    check_replaceable(out, PRODUCT, {"checkpoint": checkpoint})


def _place(tmp: Path, out: Path, force: bool, checkpoint: Path) -> None:
    """Move the finished bundle into place; with force, replace the old one only now."""
    if out.exists():
        _check_out(out, force, checkpoint)  # again: the folder may have changed meanwhile
    replace_folder(tmp, out)


def export_bundle(
    checkpoint: str | Path | LoadedCheckpoint,
    out: str | Path | None = None,
    resolution: int | str | tuple[int, int] = DEFAULT_RESOLUTION,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    trust_checkpoint: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export a checkpoint to a bundle folder and return its path."""
    say = progress or silent
    size = check_resolution(resolution)
    if opset < 17:
        raise UsageError(f"--opset {opset} is too old: LayerNormalization needs opset 17 or newer")
    loaded = (
        checkpoint
        if isinstance(checkpoint, LoadedCheckpoint)
        else load_checkpoint(checkpoint, trust=trust_checkpoint)
    )
    out = Path(out) if out is not None else default_bundle_dir(loaded.arch.name, size)
    _check_out(out, force, loaded.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model = loaded.model.float().eval()
        global_graph = GlobalGraph(model, size).eval()
        local_graph = LocalGraph(model).eval()
        images = reference_images(size)
        say("computing PyTorch reference outputs")
        reference = _reference_outputs(global_graph, local_graph, images)
        example = torch.from_numpy(np.concatenate([images] * EXAMPLE_BATCH)[:EXAMPLE_BATCH])
        say("exporting global.onnx")
        _export(global_graph, (example,), tmp / "global.onnx", GLOBAL_INPUTS, GLOBAL_OUTPUTS, opset)
        say("exporting local.onnx")
        local_args = (
            torch.from_numpy(reference["features"]),
            torch.from_numpy(reference["confidence"]),
        )
        _export(local_graph, local_args, tmp / "local.onnx", LOCAL_INPUTS, LOCAL_OUTPUTS, opset)
        local_spec = _graph_spec(tmp / "local.onnx")
        tokens_spec = next(t for t in local_spec.outputs if t.name == "tokens")
        capacity, dim = (int(d) for d in tokens_spec.shape[1:])  # (batch, C, D)
        say("writing rerank.onnx")
        write_rerank_graph(tmp / GRAPH_FILE, capacity, dim, opset=max(opset, 18))
        reference |= reference_rerank_counts(reference["tokens"], reference["count"])
        np.savez(tmp / "reference.npz", **reference)  # type: ignore[arg-type]  # numpy stub quirk
        say("writing manifest")
        manifest = Manifest(
            arch=loaded.arch.to_dict() | {"heads": loaded.arch.heads},
            resolution=size,
            opset=opset,
            trained=loaded.trained,
            checkpoint={
                "path": str(loaded.path.resolve()),
                "sha256": sha256_file(loaded.path),
                "bytes": loaded.path.stat().st_size,
            },
            graphs={"global": _graph_spec(tmp / "global.onnx"), "local": local_spec},
            rerank=_graph_spec(tmp / GRAPH_FILE),
            reference={
                "file": "reference.npz",
                "sha256": sha256_file(tmp / "reference.npz"),
                "bytes": (tmp / "reference.npz").stat().st_size,
                "images": int(images.shape[0]),
            },
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        manifest.write(tmp)
        _place(tmp, out, force, loaded.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
