"""The bundle: what `fol-infer export` writes and every runtime backend reads.

A bundle is a folder with ``manifest.json``, ``global.onnx``, ``local.onnx`` and
``reference.npz`` (and TensorRT engines once built). The manifest is the whole contract between
export time and run time: graph names, shapes, dtypes, pre-processing and checksums come from
here, never from the model code. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fol_infer import __version__
from fol_infer.errors import BundleError
from fol_infer.fileio import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_BATCH = 1024  # the dynamic batch range of an exported graph (and of engines built from it)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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

    def to_dict(self) -> dict[str, Any]:
        def tensors(ts: list[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in ts]

        return {
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
            "graphs": {
                name: {
                    "file": g.file,
                    "sha256": g.sha256,
                    "bytes": g.bytes,
                    "inputs": tensors(g.inputs),
                    "outputs": tensors(g.outputs),
                }
                for name, g in self.graphs.items()
            },
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
        """Path of a graph ("global", "local") or of the reference file ("reference")."""
        if name == "reference":
            return self.folder / self.manifest.reference["file"]
        return self.folder / self.manifest.graphs[name].file

    @classmethod
    def open(cls, folder: str | Path, verify: str = "sizes") -> Bundle:
        """Read and check a bundle. verify: "sizes" (fast) or "full" (sha256 of every file)."""
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
        bundle = cls(folder=folder, manifest=manifest)
        bundle.check_files(full=(verify == "full"))
        return bundle

    def check_files(self, full: bool) -> None:
        entries = [(g.file, g.bytes, g.sha256) for g in self.manifest.graphs.values()]
        ref = self.manifest.reference
        entries.append((ref["file"], int(ref["bytes"]), ref["sha256"]))
        for name, size, digest in entries:
            path = self.folder / name
            if not path.is_file():
                raise BundleError(f"bundle {self.folder} lacks {name}; re-export")
            if path.stat().st_size != size:
                raise BundleError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {size}: "
                    "the file was changed or truncated; re-export"
                )
            if full and sha256_file(path) != digest:
                raise BundleError(f"{path} does not match its sha256 in the manifest; re-export")
