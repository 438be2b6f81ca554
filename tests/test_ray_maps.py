"""Maps on Ray: built by tasks (retried after a hard crash) and served by actors, with the
single machine's bytes and answers; a shard that is down is named, or left out and flagged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fol_infer.errors import IndexStoreError, ShardUnavailableError
from fol_infer.index.build import BuildSettings
from fol_infer.index.database import DESCRIPTORS, METADATA, TOKENS
from fol_infer.index.metadata import IndexMetadata
from fol_infer.index.shards import MapManifest
from fol_infer.index.token_store import TokenStore
from fol_infer.pipeline import Retriever, open_shard_set
from fol_infer.progress import Advance

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[ray]')")
# One Ray cluster per run: these share a worker; each takes seconds to minutes.
pytestmark = [pytest.mark.xdist_group("ray"), pytest.mark.slow]


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(
        num_cpus=2,
        object_store_memory=100 << 20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


def _rows(folder: Path, store: str) -> list[bytes]:
    with TokenStore.open(folder / store) as s:
        return [r.tobytes() for r in s.get(range(len(s)))]


def crash_once(marker: str) -> Advance:
    """A per-batch hook that kills its worker process hard the first time it runs anywhere."""

    def hook(n: int, total: int | None = None) -> None:
        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)

    return hook


def test_ray_build_survives_a_hard_crash_with_the_in_process_bytes(
    ray_cluster, map_builds, tmp_path: Path
) -> None:
    from fol_infer.bundle import Bundle
    from fol_infer.distributed.build import RayRunner
    from fol_infer.index.map_build import build_map

    marker = tmp_path / "crashed"
    runner = RayRunner("auto", decode_threads=1, on_batch=crash_once(str(marker)))
    out = tmp_path / "map"
    bundle = Bundle.open(map_builds.bundle)
    build_map(bundle, map_builds.db, out, runner, BuildSettings(batch=4), shards=3)
    assert marker.exists(), "one task must have died and been retried"
    reference = map_builds.get(shards=3)
    assert MapManifest.load(out).shards == MapManifest.load(reference).shards
    for entry in MapManifest.load(out).shards:
        meta = IndexMetadata.load(out / entry.name / METADATA)
        for store in (DESCRIPTORS, TOKENS):
            rows = _rows(out / entry.name, store)
            assert len(rows) == len(meta.paths)  # nothing stored twice by the retry
            assert rows == _rows(reference / entry.name, store), (entry.name, store)


def _answers(retriever: Retriever, queries: list[Path]) -> list[dict]:
    return [r.to_json() for r in retriever.query(queries, top_k=10, rerank_k=4)]


def test_shard_actors_answer_as_the_single_index_and_name_a_dead_shard(
    ray_cluster, map_builds, tmp_path: Path
) -> None:
    queries = map_builds.queries[:3]
    with Retriever(map_builds.bundle, map_builds.get()) as single:
        expected = _answers(single, queries)
    sharded = tmp_path / "map"
    shutil.copytree(map_builds.get(shards=3), sharded)
    shard_set = open_shard_set(sharded, ray="auto", timeout_s=10)
    with Retriever(map_builds.bundle, shard_set) as retriever:
        assert json.dumps(_answers(retriever, queries)) == json.dumps(expected)

        ray.kill(shard_set._actors[1], no_restart=True)  # type: ignore[attr-defined]
        os.rename(sharded / "shard-00001", tmp_path / "away")  # its node is gone with it
        with pytest.raises(IndexStoreError, match=r"shard-00001 \(global ids 16..26\).*missing"):
            retriever.query(queries[:1])  # the shard's own error, from its fresh actor
        retriever.allow_partial = True
        (partial,) = retriever.query(queries[:1], top_k=10, rerank_k=4)
        doc = partial.to_json()
        assert doc["partial"] is True and doc["missing_shards"] == ["shard-00001"]
        assert all(not 16 <= h["db_index"] <= 26 for h in doc["global"]) and doc["global"]

        os.rename(tmp_path / "away", sharded / "shard-00001")  # back: a fresh actor serves it
        retriever.allow_partial = False
        assert json.dumps(_answers(retriever, queries)) == json.dumps(expected)


def test_no_cluster_at_an_address_is_one_line_and_quick(map_builds, tmp_path: Path) -> None:
    """In a fresh process (this one already runs Ray): nothing listens on port 9."""
    code = "import sys; from fol_infer.cli import main; sys.argv[0] = 'fol-infer'; main()"
    args = ["index", map_builds.bundle, map_builds.db, "--out", tmp_path / "m", "--ray"]
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args), "127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 2, result.stderr
    assert "no Ray cluster at 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def test_a_hung_shard_actor_is_replaced_after_the_timeout(ray_cluster, map_builds, caplog) -> None:
    """A shard process that stops answering (SIGSTOP: alive, silent) stops the compiled graph
    after the timeout; actor calls replace the silent actor with a fresh one, which answers;
    then the map goes back to its compiled graph."""
    queries = map_builds.queries[:2]
    with Retriever(map_builds.bundle, map_builds.get()) as single:
        expected = _answers(single, queries)
    shard_set = open_shard_set(map_builds.get(shards=3), ray="auto", timeout_s=5)
    with Retriever(map_builds.bundle, shard_set) as retriever:
        assert json.dumps(_answers(retriever, queries)) == json.dumps(expected)
        assert shard_set.last_fan_out.compiled  # type: ignore[attr-defined]
        pid = _pid(shard_set._actors[2])  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert json.dumps(_answers(retriever, queries)) == json.dumps(expected)
            assert time.monotonic() - start >= 5
        finally:
            _kill_quietly(pid)
        deadline = time.monotonic() + 120  # the graph is compiled again on a thread
        while True:
            assert json.dumps(_answers(retriever, queries)) == json.dumps(expected)
            if shard_set.last_fan_out.compiled:  # type: ignore[attr-defined]
                break
            assert time.monotonic() < deadline, "the compiled graph never came back"
            time.sleep(1)
    assert "compiled graph stopped (no answer within 5 s)" in caplog.text


def test_a_shard_that_hangs_twice_is_named_or_left_out(
    ray_cluster, map_builds, tmp_path: Path
) -> None:
    """A shard whose store blocks on open (a FIFO stands in for a hung network disk): after a
    timeout and a fresh actor that hangs too, the error names it; --allow-partial answers."""
    sharded = tmp_path / "map"
    shutil.copytree(map_builds.get(shards=3), sharded)
    shard_set = open_shard_set(sharded, ray="auto", timeout_s=2, start_timeout_s=3)
    with Retriever(map_builds.bundle, shard_set) as retriever:
        commit = sharded / "shard-00002" / TOKENS / "commit.json"
        commit.unlink()
        os.mkfifo(commit)  # opening it blocks until a writer comes: none will
        ray.kill(shard_set._actors[2], no_restart=True)  # type: ignore[attr-defined]
        with pytest.raises(ShardUnavailableError, match=r"shard-00002 .*no answer within 5 s"):
            retriever.query(map_builds.queries[:1])
        retriever.allow_partial = True
        (partial,) = retriever.query(map_builds.queries[:1], top_k=10, rerank_k=4)
        doc = partial.to_json()
        assert doc["partial"] is True and doc["missing_shards"] == ["shard-00002"]


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _outward_address() -> str:
    """This machine's address on its default route (what a remote peer would connect to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # a UDP connect sends nothing: it only picks the route
        return str(s.getsockname()[0])


def test_clusters_the_tests_start_listen_on_loopback_only(ray_cluster) -> None:
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    assert host == "127.0.0.1"
    socket.create_connection((host, int(port)), timeout=5).close()
    outward = _outward_address()
    if outward != "127.0.0.1":  # a machine with a network: the port is closed there
        with pytest.raises(OSError):
            socket.create_connection((outward, int(port)), timeout=5).close()


def test_eight_threads_on_one_ray_map_get_the_sequential_answers(ray_cluster, map_builds) -> None:
    queries = map_builds.queries[:8]
    shard_set = open_shard_set(map_builds.get(shards=3), ray="auto", timeout_s=30)
    with Retriever(map_builds.bundle, shard_set) as retriever:
        sequential = [json.dumps(_answers(retriever, [q])) for q in queries]
        assert shard_set.last_fan_out.compiled  # type: ignore[attr-defined]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda q: json.dumps(_answers(retriever, [q])), queries))
        assert together == sequential
        assert shard_set.last_fan_out.compiled  # type: ignore[attr-defined]


def test_a_shard_folder_missing_is_left_out_over_ray_when_allowed(
    ray_cluster, map_builds, tmp_path: Path
) -> None:
    sharded = Path(shutil.copytree(map_builds.get(shards=3), tmp_path / "map"))
    shutil.rmtree(sharded / "shard-00001")
    shard_set = open_shard_set(
        sharded, ray="auto", timeout_s=10
    )  # opens: the shard is named when needed
    with Retriever(map_builds.bundle, shard_set) as retriever:
        with pytest.raises(IndexStoreError, match=r"shard-00001 \(global ids 16..26\).*missing"):
            retriever.query(map_builds.queries[:1])
        retriever.allow_partial = True
        start = time.monotonic()
        (partial,) = retriever.query(map_builds.queries[:1], top_k=40, rerank_k=4)
        assert time.monotonic() - start < 10  # a shard known down is not waited for
        doc = partial.to_json()
        assert doc["partial"] is True and doc["missing_shards"] == ["shard-00001"]
        assert {h["db_index"] for h in doc["global"]} == set(range(16)) | set(range(27, 38))


def _cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None):
    code = "import sys; from fol_infer.cli import main; sys.argv[0] = 'fol-infer'; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])} | (env or {}),
    )


def test_something_that_is_not_ray_is_named_within_the_connect_timeout(map_builds) -> None:
    """An HTTP server where a head was expected: one line in seconds, not Ray's minutes."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        start = time.monotonic()
        result = _cli("query", map_builds.get(shards=3), map_builds.queries[0], "--ray",
                      f"127.0.0.1:{port}")  # fmt: skip
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert result.returncode == 2, result.stderr
    assert f"something listens at 127.0.0.1:{port} but it is not a Ray cluster" in result.stderr
    assert "Traceback" not in result.stderr and elapsed < 30


def test_relative_paths_reach_a_head_started_in_another_folder(map_builds, tmp_path: Path) -> None:
    """`ray start --head` run elsewhere (its workers do not share our working folder): the
    README's relative `index BUNDLE DB --out MAP` and `query MAP` work with --ray ADDRESS."""
    work, other = tmp_path / "work", tmp_path / "other"
    other.mkdir()
    shutil.copytree(map_builds.bundle, work / "bundle")
    (work / "db").mkdir(parents=True)
    for image in sorted((map_builds.db / "a").glob("*.jpg"))[:8]:  # a small database: Ray's
        shutil.copy(image, work / "db")  # start-up is what this test is about
    shutil.copy(map_builds.queries[0], work / "q.jpg")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths
    env = {"RAY_AUTH_MODE": "token"}  # Ray 2.60's own token authentication, on by default
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", "--block"],
        cwd=other, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{port}"
        _wait_for_port(port, head)
        argv = ["index", "bundle", "db", "--out", "map", "--shards", "2", "--batch", "4"]
        built = _cli(*argv, "--ray", address, cwd=work, env=env)
        assert built.returncode == 0, built.stderr
        over_ray = _cli("query", "map", "q.jpg", "--json", "--ray", address, cwd=work, env=env)
        assert over_ray.returncode == 0, over_ray.stderr
        here = _cli("query", "map", "q.jpg", "--json", cwd=work)
        assert json.loads(over_ray.stdout) == json.loads(here.stdout)
        assert json.loads(here.stdout)[0]["reranked"]
    finally:
        head.terminate()  # --block: Ray drains and stops the processes it started
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def _wait_for_port(port: int, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the Ray head never listened")
