"""The bundle: what `fol-infer export` writes and every runtime backend reads.

A bundle is a folder with ``manifest.json``, ``global.onnx``, ``local.onnx``, ``rerank.onnx``
(the re-ranker as a graph) and ``reference.npz`` (and TensorRT engines once built). The
manifest is the whole contract between export time and run time: graph names, shapes, dtypes,
pre-processing and checksums come from here, never from the model code. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fol_infer import __version__
from fol_infer.bundle.graph_inputs import GraphInput, MalformedGraph, read_inputs
from fol_infer.choices import VerifyLevel
from fol_infer.errors import BundleError
from fol_infer.files.atomic import atomic_write_json
from fol_infer.files.integrity import check_level, check_sha256
from fol_infer.files.ownership import Product

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "fol-infer-bundle"  # the manifest's marker: what `--force` may replace
MAX_BATCH = 1024  # the dynamic batch range of an exported graph (and of engines built from it)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What `--force` may replace: a manifest carrying FORMAT, or, written before the marker
# existed, one with the manifest's own keys.
PRODUCT = Product(
    "bundle",
    ((MANIFEST, FORMAT),),
    frozenset({"schema_version", "fingerprint", "graphs", "arch", "resolution"}),
)


def preprocessing_spec() -> dict[str, Any]:
    """Spec section 2, recorded so that any runtime can reproduce the model's input."""
    return {
        "color": "RGB",
        "scale": "1/255 (1/65535 for 16-bit)",
        "resize": "bilinear, half-pixel centres, no antialiasing, to the bundle resolution",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW float32",
    }


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # "batch" for the dynamic batch axis
    dtype: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(name=d["name"], shape=list(d["shape"]), dtype=d["dtype"])


@dataclass
class GraphSpec:
    file: str
    sha256: str
    bytes: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphSpec:
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            bytes=int(d["bytes"]),
            inputs=[TensorSpec.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSpec.from_dict(t) for t in d["outputs"]],
        )


@dataclass
class Manifest:
    arch: dict[str, Any]
    resolution: tuple[int, int]
    opset: int
    trained: bool
    checkpoint: dict[str, Any]  # {"path", "sha256", "bytes"}
    graphs: dict[str, GraphSpec]  # "global", "local"
    reference: dict[str, Any]  # {"file", "sha256", "bytes", "images"}
    preprocessing: dict[str, Any] = field(default_factory=preprocessing_spec)
    engines: dict[str, Any] = field(default_factory=dict)  # TensorRT builds, filled later
    # rerank.onnx; None in bundles exported before the re-rank graph existed. Kept apart from
    # ``graphs`` (the encoder) so that it is not part of the fingerprint an index records.
    rerank: GraphSpec | None = None
    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = __version__
    created: str = ""

    @property
    def fingerprint(self) -> str:
        """Identity of what the bundle computes: graphs, resolution and pre-processing.

        Indexes record it; adding engines or moving the folder keeps it, re-exporting a
        different checkpoint or resolution changes it.
        """
        ident = {
            "graphs": {k: g.sha256 for k, g in sorted(self.graphs.items())},
            "resolution": list(self.resolution),
            "preprocessing": self.preprocessing,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def output_width(self, graph: str, output: str) -> int:
        """Last dimension of a graph output as exported: the width a runtime must store."""
        for tensor in self.graphs[graph].outputs:
            if tensor.name == output and isinstance(tensor.shape[-1], int):
                return tensor.shape[-1]
        raise BundleError(f"the manifest's {graph} graph has no output {output!r} of fixed width")

    @property
    def descriptor_dim(self) -> int:
        """Width of the global descriptor (8448 for every published FoL model)."""
        return self.output_width("global", "global")

    @property
    def token_dim(self) -> int:
        """Width of a re-ranking token (128 for every published FoL model)."""
        return self.output_width("local", "tokens")

    @property
    def arch_name(self) -> str:
        return str(self.arch["name"])

    def source(self, graph: str) -> GraphSpec:
        """The ONNX graph an engine of ``graph`` is built from ("global", "local", "rerank")."""
        if graph == "rerank":
            if self.rerank is None:
                raise KeyError(graph)
            return self.rerank
        return self.graphs[graph]

    def to_dict(self) -> dict[str, Any]:
        def tensors(ts: list[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in ts]

        def graph(g: GraphSpec) -> dict[str, Any]:
            return {
                "file": g.file,
                "sha256": g.sha256,
                "bytes": g.bytes,
                "inputs": tensors(g.inputs),
                "outputs": tensors(g.outputs),
            }

        return {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "toolkit_version": self.toolkit_version,
            "created": self.created,
            "fingerprint": self.fingerprint,
            "arch": self.arch,
            "trained": self.trained,
            "resolution": list(self.resolution),
            "opset": self.opset,
            "preprocessing": self.preprocessing,
            "checkpoint": self.checkpoint,
            "graphs": {name: graph(g) for name, g in self.graphs.items()},
            **({"rerank": graph(self.rerank)} if self.rerank is not None else {}),
            "reference": self.reference,
            "engines": self.engines,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            schema_version=int(d["schema_version"]),
            toolkit_version=str(d["toolkit_version"]),
            created=str(d.get("created", "")),
            arch=dict(d["arch"]),
            trained=bool(d["trained"]),
            resolution=(int(d["resolution"][0]), int(d["resolution"][1])),
            opset=int(d["opset"]),
            preprocessing=dict(d["preprocessing"]),
            checkpoint=dict(d["checkpoint"]),
            graphs={k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()},
            reference=dict(d["reference"]),
            engines=dict(d.get("engines", {})),
            rerank=GraphSpec.from_dict(d["rerank"]) if "rerank" in d else None,
        )

    def write(self, folder: Path) -> Path:
        """Atomic: a reader never sees a half-written manifest."""
        path = folder / MANIFEST
        atomic_write_json(path, self.to_dict())
        return path


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest

    @property
    def resolution(self) -> tuple[int, int]:
        return self.manifest.resolution

    def path(self, name: str) -> Path:
        """Path of a graph ("global", "local", "rerank") or of the reference file ("reference")."""
        if name == "reference":
            return self.folder / self.manifest.reference["file"]
        return self.folder / self.manifest.source(name).file

    def rerank_graph(self) -> GraphSpec:
        """rerank.onnx's record; a bundle exported before the graph existed is refused."""
        if self.manifest.rerank is None:
            raise BundleError(
                f"bundle {self.folder} has no rerank.onnx: it was exported before the re-rank "
                f"graph existed; re-export it ({self.repair_command}) to re-rank with onnx or "
                "trt, or use the cpu re-ranker"
            )
        return self.manifest.rerank

    @property
    def repair_command(self) -> str:
        """The command that writes this bundle again from its checkpoint."""
        h, w = self.resolution
        ckpt = shlex.quote(str(self.manifest.checkpoint.get("path", "CHECKPOINT")))
        out = shlex.quote(str(self.folder))
        return f"fol-infer export {ckpt} --out {out} --resolution {h}x{w} --force"

    @classmethod
    def open(cls, folder: str | Path, verify: VerifyLevel | str = "cached") -> Bundle:
        """Read and check a bundle (`fol_infer.files.integrity` says what each level checks):
        sizes, graph inputs against the manifest, and the graphs' sha256 unless "sizes"."""
        level = check_level(verify)
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if not folder.is_dir():
            raise BundleError(
                f"bundle folder not found: {folder} (create one with fol-infer export)"
            )
        if not manifest_path.is_file():
            raise BundleError(
                f"{folder} is not a bundle: no {MANIFEST} (was the export interrupted? "
                "re-run fol-infer export)"
            )
        try:
            raw = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{folder} has bundle schema {version}, this fol-infer {__version__} reads "
                f"schema {SCHEMA_VERSION}: re-export it with this version"
            )
        try:
            manifest = Manifest.from_dict(raw)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{manifest_path} is incomplete ({exc!r}); re-export") from None
        bundle = cls(folder=Path(os.path.abspath(folder)), manifest=manifest)  # recorded by indexes
        bundle.check_files(level)
        bundle.check_graph_inputs()
        return bundle

    def check_files(self, verify: VerifyLevel) -> None:
        """Sizes of every file; sha256 of the graphs ("cached") or of every file ("full")."""
        graphs = [*self.manifest.graphs.values(), *filter(None, [self.manifest.rerank])]
        entries = [(g.file, g.bytes, g.sha256, verify) for g in graphs]
        ref = self.manifest.reference
        ref_level: VerifyLevel = "full" if verify == "full" else "sizes"
        entries.append((ref["file"], int(ref["bytes"]), ref["sha256"], ref_level))
        for name, size, _, _ in entries:
            path = self.folder / name
            if not path.is_file():
                raise BundleError(f"bundle {self.folder} lacks {name}: {self.repair_command}")
            if path.stat().st_size != size:
                raise BundleError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {size}: "
                    f"the file was changed or truncated; re-export: {self.repair_command}"
                )
        for name, _, digest, level in entries:
            repair = f"re-export the bundle: {self.repair_command}"
            check_sha256(self.folder / name, digest, level, repair)

    def check_graph_inputs(self) -> None:
        """Each graph's declared inputs (read from the .onnx without its weights) against the
        manifest's, and the image input against the manifest's resolution, so that an edited
        manifest is refused here rather than deep inside a runtime."""
        rerank = {"rerank": self.manifest.rerank} if self.manifest.rerank is not None else {}
        for name, spec in {**self.manifest.graphs, **rerank}.items():
            path = self.folder / spec.file
            try:
                found = read_inputs(path)
            except (OSError, MalformedGraph) as exc:
                raise BundleError(
                    f"{path} is not a readable ONNX graph ({exc}): {self.repair_command}"
                ) from None
            problem = _inputs_problem(spec.inputs, found)
            if name == "global" and problem is None and found and len(found[0].shape) == 4:
                h, w = found[0].shape[2:]
                if (h, w) != tuple(self.resolution):
                    problem = (
                        f"it takes {h}x{w} images, the manifest's resolution is "
                        f"{self.resolution[0]}x{self.resolution[1]}"
                    )
            if problem is not None:
                raise BundleError(
                    f"{self.folder / MANIFEST} disagrees with {path}: {problem} (the manifest "
                    f"was edited or a graph replaced); re-export: {self.repair_command}"
                )


def _inputs_problem(declared: list[TensorSpec], found: list[GraphInput]) -> str | None:
    """What differs between the manifest's inputs and the graph's, or None."""
    if [t.name for t in declared] != [g.name for g in found]:
        return f"inputs {[g.name for g in found]}, the manifest says {[t.name for t in declared]}"
    for t, g in zip(declared, found):
        fixed = [d if isinstance(d, int) else None for d in t.shape]
        have = [d if isinstance(d, int) else None for d in g.shape]
        if fixed != have or t.dtype != g.dtype:
            return (
                f"input {g.name!r} is {g.dtype} {list(g.shape)}, the manifest says "
                f"{t.dtype} {t.shape}"
            )
    return None
