"""kill -9 at every commit point of a build, then the same command again: run as a script by
`tests/test_crash_points.py`, one process per scenario.

Every rename fol-infer makes (``os.replace``, ``os.rename``: each file and folder commit) is
a commit point. For point N = 1, 2, ... a forked child runs the scenario's command with a
hook that SIGKILLs it at its N-th rename; another child then runs the same command unhooked
and must finish, leaving what an uninterrupted run leaves (same images, rows, FAISS size and
map layout) and nothing else (no temporary, rebuild or old folder). N grows until a hooked
run finishes first. Builds use a deterministic numpy encoder (the storage protocol is under
test, not the model), so that each child costs milliseconds; the parent only forks and waits
(no FAISS or BLAS threads are started before a fork).

Usage: python crash_points.py BUNDLE WORKDIR SCENARIO  -> prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fol_infer.backends.base import Encoder, GlobalOutput, LocalOutput
from fol_infer.bundle import Bundle
from fol_infer.files.atomic import is_leftover
from fol_infer.index.build import BuildSettings, build_index
from fol_infer.index.database import DESCRIPTORS, Database
from fol_infer.index.map_build import LocalRunner, build_map
from fol_infer.index.shards import MapManifest, is_map
from fol_infer.index.token_store import TokenStore

sys.path.insert(0, str(Path(__file__).parent))
from sample_images import make_images  # noqa: E402


class HashEncoder(Encoder):
    """Descriptors and tokens drawn from a hash of each image's pixels: deterministic, per
    image, at the bundle's widths."""

    name = "hash"

    def __init__(self, bundle: Bundle) -> None:
        self.resolution = bundle.resolution
        self.dims = bundle.manifest.descriptor_dim, bundle.manifest.token_dim

    def _rng(self, image: np.ndarray) -> np.random.Generator:
        return np.random.default_rng(zlib.crc32(image.tobytes()))

    def _encode_global_impl(self, images: np.ndarray) -> GlobalOutput:
        rows = [self._rng(im).standard_normal(self.dims[0]).astype(np.float32) for im in images]
        d = np.stack(rows)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        h, w = self.resolution[0] // 14, self.resolution[1] // 14
        conf = np.zeros((len(images), h, w), np.float32)
        return GlobalOutput(d, images[:, :1, :h, :w].copy(), conf)

    def _encode_local_impl(self, global_out: GlobalOutput) -> LocalOutput:
        n = len(global_out.descriptors)
        tokens = np.zeros((n, 16, self.dims[1]), np.float32)
        counts = np.zeros(n, np.int64)
        for i, d in enumerate(global_out.descriptors):
            rng = np.random.default_rng(int(abs(d[0]) * 1e6))
            counts[i] = 4 + int(rng.integers(0, 12))
            t = rng.standard_normal((counts[i], self.dims[1])).astype(np.float32)
            tokens[i, : counts[i]] = t / np.linalg.norm(t, axis=1, keepdims=True)
        return LocalOutput(tokens, counts, global_out.confidence > 0)


def kill_at(n: int) -> None:
    """SIGKILL this process at its n-th rename (the commit primitive)."""
    count = [0]
    for name in ("replace", "rename"):
        original = getattr(os, name)

        def hooked(*args: object, _original: Callable[..., None] = original) -> None:
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            _original(*args)

        setattr(os, name, hooked)


def in_child(work: Callable[[], None]) -> int:
    """Run `work` in a forked child; its exit code, or -signal."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent by exit code
            print(f"child failed: {exc!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def summary(out: Path) -> dict[str, object]:
    """What a user gets: images, failures, every row of every store, FAISS size, map layout."""
    if is_map(out):
        manifest = MapManifest.load(out)
        doc: dict[str, object] = {"complete": manifest.complete}
        doc["shards"] = [vars(e) for e in manifest.shards]
        doc |= {e.name: summary(out / e.name) for e in manifest.shards}
        return doc
    with Database(out) as database:
        stores = {}
        for name in (DESCRIPTORS, "tokens"):
            with TokenStore.open(out / name) as store:
                rows = store.get(range(len(store)))
                stores[name] = [bytes(np.asarray(r).tobytes()).hex()[:64] for r in rows]
        return {
            "paths": database.paths,
            "failures": database.meta.failures,
            "faiss": len(database.global_index),
            "stores": stores,
        }


def leftovers(root: Path) -> list[str]:
    """Entries a finished command must not leave: temporaries, .rebuild and .old folders,
    writer-lock files."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            if is_leftover(name) or name.endswith((".rebuild", ".lock")) and name != ".lock":
                found.append(str(Path(folder, name).relative_to(root)))
    return sorted(found)


def scenario(
    name: str, bundle: Bundle, work: Path
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(make the starting state in `work`, the command under test)."""
    db, out = work / "db", work / "out"
    settings = BuildSettings(batch=2)

    def images(n: int, hidden_from: int = 99) -> None:
        for i, path in enumerate(make_images(db, n, seed=7, size=(40, 40))):
            if i >= hidden_from:  # find_images skips hidden files: "not yet in the database"
                path.rename(path.with_name("." + path.name))

    def reveal() -> None:
        for path in db.glob(".*.jpg"):
            path.rename(path.with_name(path.name[1:]))

    def index(mode: str) -> None:
        build_index(bundle, HashEncoder(bundle), db, out, settings, mode)  # type: ignore[arg-type]

    def map_(mode: str, shards: int | None) -> None:
        runner = LocalRunner(HashEncoder(bundle))
        build_map(bundle, db, out, runner, settings, shards, mode)  # type: ignore[arg-type]

    if name == "index-new":
        return lambda: images(5), lambda: index("new")
    if name == "index-append":
        return (lambda: (images(5, hidden_from=3), index("new"), reveal())), lambda: index("append")
    if name == "index-force":
        return (lambda: (images(4), index("new"))), lambda: index("force")
    if name == "map-new":
        return lambda: images(6), lambda: map_("new", 2)
    if name == "map-append":
        return (lambda: (images(6, hidden_from=4), map_("new", 2), reveal())), lambda: map_(
            "append", 1
        )
    if name == "map-force":
        return (lambda: (images(4), map_("new", 2))), lambda: map_("force", 2)
    raise SystemExit(f"unknown scenario {name}")


def main() -> None:
    bundle_dir, workdir, name = sys.argv[1:4]
    bundle = Bundle.open(bundle_dir)
    work, seed = Path(workdir) / "w", Path(workdir) / "seed"
    work.mkdir(parents=True)
    prepare, command = scenario(name, bundle, work)
    assert in_child(prepare) == 0, "preparing the scenario failed"
    shutil.copytree(work, seed, symlinks=True)

    def restore() -> None:
        shutil.rmtree(work)
        shutil.copytree(seed, work, symlinks=True)

    reference, got = Path(workdir) / "reference.json", Path(workdir) / "got.json"

    def record(path: Path) -> Callable[[], None]:
        return lambda: path.write_text(json.dumps(summary(work / "out")))

    assert in_child(lambda: (command(), record(reference)())) == 0, "the plain run failed"
    restore()
    problems: list[str] = []
    point = 0
    while True:
        point += 1
        code = in_child(lambda n=point: (kill_at(n), command()))  # type: ignore[misc]
        if code == 0:
            break
        if code != -signal.SIGKILL:
            problems.append(f"point {point}: the hooked run failed before its kill ({code})")
        elif in_child(lambda: (command(), record(got)())) != 0:
            problems.append(f"point {point}: the same command failed after the kill")
        else:
            if got.read_text() != reference.read_text():
                problems.append(f"point {point}: the result differs from an uninterrupted run")
            left = leftovers(work)
            if left:
                problems.append(f"point {point}: left behind {left}")
        restore()
    print(json.dumps({"scenario": name, "points": point - 1, "problems": problems}))


if __name__ == "__main__":
    main()
