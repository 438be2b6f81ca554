"""Maps on Ray: shard builds as Ray tasks (`build.py`), shards served by Ray actors
(`serve.py`). Imported only when ``--ray`` (or ``open_shard_set(..., ray=...)``) is used;
needs the ``ray`` extra: ``pip install "fol-infer[ray]"``.
"""

from __future__ import annotations

import socket
from types import ModuleType

from fol_infer.errors import BackendUnavailableError, first_line

CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"  # where a cluster this process starts for itself listens


def require_ray() -> ModuleType:
    """The ray module, or an error that names the extra to install."""
    try:
        import ray
    except ImportError:
        raise BackendUnavailableError(
            'Ray is not installed: pip install "fol-infer[ray]" (Ray 2.x) to build or serve '
            "maps over a cluster, or drop --ray to run in this process"
        ) from None
    return ray


def connect(address: str) -> bool:
    """Join the Ray cluster at `address` (``auto``: the one this machine belongs to, else a
    local one started for this process and bound to 127.0.0.1); True when this call started
    or joined it (and so should shut it down), False when Ray was already initialised here.
    An address fails within `CONNECT_TIMEOUT_S` when nothing listens there or when what
    listens does not speak Ray's protocol (Ray's own client would retry for minutes)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address == "auto":
        try:
            ray.init(address="auto", **options)
        except ConnectionError:
            ray.init(_node_ip_address=LOOPBACK, **options)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendUnavailableError(f"no Ray cluster at {address}: {first_line(exc)}") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a host:port address, or when
    what listens does not complete the gRPC (HTTP/2) handshake that Ray's head answers."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendUnavailableError(
            f"--ray {address!r}: give 'auto' or the head node's HOST:PORT (e.g. 10.0.0.5:6379)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"no Ray cluster at {address} ({exc.strerror or exc}): start one with "
            "`ray start --head` or pass --ray auto"
        ) from None
    import grpc  # Ray's own dependency; its head (GCS) and client server both speak gRPC

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise BackendUnavailableError(
            f"something listens at {address} but it is not a Ray cluster (no gRPC handshake "
            f"within {CONNECT_TIMEOUT_S:g} s): give the head node's GCS port (`ray start "
            "--head --port`, 6379 by default) or its client port (ray://HOST:10001)"
        ) from None
    finally:
        channel.close()
