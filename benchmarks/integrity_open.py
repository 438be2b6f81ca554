"""Cost of the integrity checks at open: a ViT-B/14 bundle at 322 and a 10,000-image index.

    python benchmarks/integrity_open.py [--images 10000] [--map-images 1000000]
        [--map-shards 16] [--repeats 5] [--json PATH]

Bundle: the bench's UNTRAINED seeded ViT-B/14 at 322 (made and exported once into
``$FOL_INFER_CACHE``, else ``~/.cache/fol-infer``, as ``fol-infer bench`` does). Index: built
synthetically through the library's own store APIs (no image is encoded): `--images` random
unit global descriptors in ``descriptors/`` and in a Flat ``global.faiss`` (the real sizes:
8448 float32 per image), and 16 fp16 tokens per image in ``tokens/``. Token rows are not read
at open at any level but "full", so their count does not enter the other figures.

Each open is timed at every level in the same process, round after round (levels interleaved,
median of `--repeats` rounds), with the verification cache in a temporary folder:
- without checks: what opening cost before these checks existed: for the bundle,
  ``verify="sizes"`` with the graph-input check switched off; for the index, ``verify="sizes"``
  itself (the same figure is printed on both rows);
- sizes: ``verify="sizes"`` (for the bundle: plus the graph inputs read against the manifest);
- cold: ``verify="cached"`` with the verification cache emptied first (the first open of
  these files: graphs / global.faiss hashed);
- warm: ``verify="cached"`` with the cache vouching for the files (every later open);
- full: ``verify="full"`` (every file hashed, every token-store commit crc-checked).
Files are in the OS page cache throughout (they were just written or read), so "cold" is the
cost of hashing, not of the disk. For scale, the bundle rows also give the time to create the
ONNX Runtime sessions, which every real open pays.

Map: what opening a map checks on top of opening its shards, against what reading the shards'
``index.json`` (which every open does) costs: `--map-images` names like a city dataset's
(``@east@north@`` names in per-area folders) in `--map-shards` shard records, the map's
consistency (`MapManifest.check_consistent`) and each shard's record against its entry
(`ShardEntry.mismatch`: counts, root, first and last file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import parser, write_report

from fol_infer.bench.defaults import bundle_for, default_checkpoint
from fol_infer.bundle import Bundle
from fol_infer.files.integrity import CACHE_FILE
from fol_infer.files.user_cache import cache_dir
from fol_infer.index.database import DESCRIPTORS, FAISS_FILE, METADATA, TOKENS, Database
from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import MapManifest, ShardEntry, name_key, shard_name
from fol_infer.index.token_store import TokenStore
from fol_infer.model.arch import GLOBAL_DIM

CHUNK = 500
LEVELS = ("without checks", "sizes", "cold", "warm", "full")  # see the module doc


def synthetic_index(folder: Path, n: int, seed: int = 0) -> None:
    """An index of `n` images written through the stores' own APIs (see the module doc)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    faiss_index = GlobalIndex.create(GLOBAL_DIM, "Flat", device="cpu")
    with (
        TokenStore.create(folder / DESCRIPTORS, dtype="fp32", dim=GLOBAL_DIM) as descriptors,
        TokenStore.create(folder / TOKENS, dtype="fp16") as tokens,
    ):
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            x = rng.standard_normal((m, GLOBAL_DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            descriptors.append([row[None] for row in x])
            faiss_index.add(x)
            t = rng.standard_normal((m, 16, 128), dtype=np.float32)
            tokens.append(list(t / np.linalg.norm(t, axis=2, keepdims=True)))
    faiss_index.save(folder / FAISS_FILE)
    IndexMetadata(
        root=str(folder.parent / "images"),
        bundle_sha256="0" * 64,
        bundle_name="synthetic",
        settings={"factory": "Flat", "tokens": "fp16", "batch": CHUNK, "complete": True},
        paths=[f"img{i:06d}.jpg" for i in range(n)],
    ).save(folder / METADATA)


def elapsed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def forget_verified() -> None:
    (cache_dir() / CACHE_FILE).unlink(missing_ok=True)


def time_levels(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per level; levels interleaved within each round, the cache emptied before
    "cold" (so "warm", right after it, finds the files vouched for)."""
    samples: dict[str, list[float]] = {level: [] for level in steps}
    steps["warm"]()  # the page cache and the imports
    for _ in range(repeats):
        for level, fn in steps.items():
            if level == "cold":
                forget_verified()
            samples[level].append(elapsed_ms(fn))
    return {level: statistics.median(v) for level, v in samples.items()}


def levels(open_at: Callable[[str], object], unchecked: Callable[[], object]) -> dict:  # type: ignore[type-arg]
    steps = {"without checks": unchecked, "sizes": lambda: open_at("sizes")}
    steps |= {"cold": lambda: open_at("cached"), "warm": lambda: open_at("cached")}
    return steps | {"full": lambda: open_at("full")}


def bundle_unchecked(folder: Path) -> Bundle:
    """Opening as it was before the checks: sizes only, graph inputs not read."""
    original = Bundle.check_graph_inputs
    Bundle.check_graph_inputs = lambda self: None  # type: ignore[method-assign]
    try:
        return Bundle.open(folder, verify="sizes")
    finally:
        Bundle.check_graph_inputs = original  # type: ignore[method-assign]


def open_database(folder: Path, verify: str) -> None:
    Database(folder, device="cpu", verify=verify).close()  # type: ignore[arg-type]


def session_ms(bundle: Bundle) -> float:
    from fol_infer.backends.onnx import OnnxEncoder

    start = time.perf_counter()
    OnnxEncoder(bundle).close()
    return (time.perf_counter() - start) * 1e3


def synthetic_map(folder: Path, images: int, shards: int) -> MapManifest:
    """Shard records (``index.json`` only: the map checks read nothing else) and their map
    manifest, as a build of `images` images in `shards` shards writes them."""
    names = [f"area{i // 1000:04d}/@{500000 + i}.00@{4100000 + i}.00@img{i:07d}.jpg"
             for i in range(images)]  # fmt: skip
    names.sort(key=name_key)
    manifest = MapManifest("/data/city", "0" * 64, "bundle", {"tokens": "fp16"})
    offset = 0
    for i, part in enumerate(np.array_split(np.arange(images), shards)):
        held = [names[j] for j in part]
        entry = ShardEntry(shard_name(i), len(held), held[0], held[-1], len(held), offset)
        manifest.shards.append(entry)
        (folder / entry.name).mkdir(parents=True)
        IndexMetadata(manifest.root, "0" * 64, paths=held).save(folder / entry.name / METADATA)
        offset += len(held)
    manifest.complete = True
    return manifest


def map_checks(folder: Path, images: int, shards: int, repeats: int) -> dict:  # type: ignore[type-arg]
    """Median ms to read every shard's index.json and to run the map checks on them."""
    manifest = synthetic_map(folder, images, shards)
    metas: list[IndexMetadata] = []

    def read() -> None:
        metas[:] = [IndexMetadata.load(folder / e.name / METADATA) for e in manifest.shards]

    def check() -> None:
        manifest.check_consistent(folder)
        assert all(e.mismatch(m, manifest.root) is None for e, m in zip(manifest.shards, metas))

    read()
    ms = {"read index.json": [], "map checks": []}  # type: ignore[var-annotated]
    for _ in range(repeats):
        ms["read index.json"].append(elapsed_ms(read))
        ms["map checks"].append(elapsed_ms(check))
    out = {k: statistics.median(v) for k, v in ms.items()}
    ratio = out["map checks"] / out["read index.json"]
    print(f"\n{images}-image map in {shards} shards: reading every shard's index.json "
          f"{out['read index.json']:.0f} ms, the map checks {out['map checks']:.0f} ms "
          f"({ratio:.2f}x the read)")  # fmt: skip
    return {"ms": out, "checks_over_read": ratio, "images": images, "shards": shards}


def report(name: str, ms: dict[str, float], size_mb: float, extra: float = 0.0) -> dict:  # type: ignore[type-arg]
    """Print and return the figures; `extra` (ms) is what every open pays besides (the ONNX
    Runtime sessions of a bundle), added to both sides of the second ratio."""
    base = ms["without checks"]
    ratios = {k: v / base for k, v in ms.items()}
    with_extra = {k: (v + extra) / (base + extra) for k, v in ms.items()}
    print(f"\n{name} ({size_mb:.0f} MB hashed when cold)")
    head = "  level            open (ms)   / unchecked" + (
        "   / unchecked + sessions" * bool(extra)
    )
    print(head)
    for level in LEVELS:
        line = f"  {level:15s} {ms[level]:9.1f}   {ratios[level]:10.2f}x"
        print(line + (f"   {with_extra[level]:10.3f}x" if extra else ""))
    out = {"ms": ms, "ratio_to_unchecked": ratios, "mb_hashed_cold": size_mb}
    return out | ({"ratio_with_sessions": with_extra} if extra else {})


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--map-images", type=int, default=1_000_000)
    p.add_argument("--map-shards", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    return p


def main() -> None:
    args = options().parse_args()

    checkpoint = default_checkpoint(print)  # the bench's cache, before it is redirected
    bundle_dir = bundle_for(checkpoint, "322", print)
    with tempfile.TemporaryDirectory(prefix="integrity-open-") as tmp:
        os.environ["FOL_INFER_CACHE"] = str(Path(tmp) / "user-cache")  # verified.json only
        bundle = Bundle.open(bundle_dir)
        graphs_mb = sum(g.bytes for g in bundle.manifest.graphs.values()) / 1e6
        steps = levels(
            lambda v: Bundle.open(bundle_dir, verify=v), lambda: bundle_unchecked(bundle_dir)
        )
        bundle_ms = time_levels(steps, args.repeats)
        sessions = session_ms(bundle)
        print(f"building a synthetic {args.images}-image index in {tmp}")
        index_dir = Path(tmp) / "index"
        synthetic_index(index_dir, args.images)
        faiss_mb = (index_dir / FAISS_FILE).stat().st_size / 1e6
        steps = levels(lambda v: open_database(index_dir, v), lambda: None)
        del steps["without checks"]  # verify="sizes" is how an index opened before the checks
        index_ms = time_levels(steps, args.repeats)
        index_ms = {"without checks": index_ms["sizes"]} | index_ms
        map_ms = map_checks(Path(tmp) / "map", args.map_images, args.map_shards, args.repeats)
    per_image = map_ms["ms"]["map checks"] / args.map_images
    open_per_image = index_ms["warm"] / args.images  # a whole shard open, per image
    map_ms["checks_over_shard_open"] = per_image / open_per_image
    print(
        f"map checks per image: {per_image * 1e3:.2f} us, {map_ms['checks_over_shard_open']:.4f}x "
        f"what opening a Flat index costs per image ({open_per_image * 1e3:.1f} us)"
    )
    results = {
        "repeats": args.repeats,
        "bundle": report("ViT-B/14 bundle at 322", bundle_ms, graphs_mb, sessions)
        | {"onnxruntime_sessions_ms": sessions},
        "index": report(f"{args.images}-image index (Flat)", index_ms, faiss_mb)
        | {"images": args.images},
        "map": map_ms,
    }
    print(f"\nfor scale: creating the two ONNX Runtime sessions took {sessions:.0f} ms")
    write_report(args.json, results)


if __name__ == "__main__":
    main()
