"""The rerank engine: rerank.onnx built by TensorRT, with a profile over the chunk of candidates.

It is built from the graph's float16-candidate variant (an index stores float16 tokens: half the
bytes to upload, and exact), strongly typed, so the product, the maxima and the comparisons stay
float32 (the Cast to float32 is in the graph; TF32 is cleared by `fol_infer.trt.build`). The
query, its count and the threshold have no chunk axis and get a fixed profile. Everything but
``build_engine`` is pure and checked on the CPU.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from fol_infer.bundle import Bundle
from fol_infer.errors import BundleError, UsageError
from fol_infer.progress import Progress
from fol_infer.rerank.graph import GRAPH_NAME, INPUTS, write_rerank_graph
from fol_infer.trt.build import BuildOptions, BuildResult
from fol_infer.trt.record import EngineRecord, GpuInfo, Profile, engine_file

DEFAULT_RERANK_CHUNK = 8  # candidates per engine run; the README relates it to board memory
MAX_RERANK_CHUNK = 256
ENGINE_CANDIDATES = "float16"
STATIC_INPUTS = ("query", "query_count", "threshold")


def chunk_profile(max_chunk: int, opt_chunk: int | None = None) -> Profile:
    """Profile over the chunk axis, 1..max_chunk, tuned for ``opt_chunk`` (default: max)."""
    if not 1 <= max_chunk <= MAX_RERANK_CHUNK:
        raise UsageError(
            f"--rerank-chunk must be between 1 and {MAX_RERANK_CHUNK}, not {max_chunk}"
        )
    opt = max_chunk if opt_chunk is None else opt_chunk
    if not 1 <= opt <= max_chunk:
        raise UsageError(f"the rerank engine's opt chunk must be in 1..{max_chunk}, not {opt}")
    return Profile(min=1, opt=opt, max=max_chunk)


def input_shapes(bundle: Bundle) -> dict[str, list[int]]:
    """Each input's shape without the chunk axis, from the manifest's rerank.onnx record."""
    spec = bundle.rerank_graph()
    shapes = {t.name: [int(d) for d in t.shape if not isinstance(d, str)] for t in spec.inputs}
    if sorted(shapes) != sorted(INPUTS):
        raise BundleError(
            f"{bundle.folder}/manifest.json records rerank.onnx inputs {sorted(shapes)}, not "
            f"{sorted(INPUTS)}: re-export the bundle"
        )
    return shapes


def build_options(
    profile: Profile, workspace_gib: float | None, timing_cache: Path | None
) -> BuildOptions:
    """Strongly typed (the graph's own fp16 -> fp32 Cast decides every precision)."""
    return BuildOptions(
        precision="fp16",
        strongly_typed=True,
        batch=(profile.min, profile.opt, profile.max),
        workspace_gib=workspace_gib,
        timing_cache=timing_cache,
        static_inputs=STATIC_INPUTS,
    )


def write_engine_graph(bundle: Bundle, folder: Path) -> Path:
    """The float16-candidate variant of the bundle's rerank.onnx, written into ``folder``."""
    shapes = input_shapes(bundle)
    capacity, dim = shapes["query"]
    opset = max(bundle.manifest.opset, 18)
    path = folder / f"{GRAPH_NAME}.fp16-candidates.onnx"
    return write_rerank_graph(path, capacity, dim, ENGINE_CANDIDATES, opset)


def build_rerank_engine(
    bundle: Bundle,
    workdir: Path,
    profile: Profile,
    tensorrt: str,
    gpu: GpuInfo,
    workspace_gib: float | None = None,
    timing_cache: Path | None = None,
    progress: Progress | None = None,
) -> tuple[EngineRecord, BuildResult]:
    """Build the rerank engine on this GPU; returns its manifest record and the build."""
    from fol_infer.trt.build import build_engine

    source = write_engine_graph(bundle, workdir)
    options = build_options(profile, workspace_gib, timing_cache)
    result = build_engine(source, input_shapes(bundle), options, None, progress)
    record = EngineRecord(
        graph=GRAPH_NAME,
        file=engine_file(GRAPH_NAME, "fp16"),
        sha256=hashlib.sha256(result.engine).hexdigest(),
        bytes=len(result.engine),
        onnx_sha256=bundle.rerank_graph().sha256,
        tensorrt=tensorrt,
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        precision="fp16",  # the candidates' storage; the arithmetic is float32
        mode="strongly-typed",
        profile=profile,
        workspace_gib=workspace_gib,
        fp32_nodes=_graph_nodes(source),
        built=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return record, result


def _graph_nodes(path: Path) -> int:
    """Nodes of the variant: all but its input Cast compute in float32."""
    import onnx

    return len(onnx.load(str(path)).graph.node) - 1
