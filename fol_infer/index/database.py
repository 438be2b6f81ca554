"""An index folder, opened for queries: its layout, and the reader that serves it.

Layout of INDEX_DIR:
- ``index.json``    IndexMetadata: image paths, failures, bundle fingerprint, build settings
- ``descriptors/``  TokenStore (dim 8448, fp32, one row per image): the durable global side
- ``tokens/``       TokenStore (fp16 or int8): the re-ranking tokens, true counts only
- ``tokens_fp32/``  ``--tokens int8-exact`` only: the float32 originals, from which the
                    certified re-ranker reads the few rows its int8 bound cannot decide
- ``global.faiss``  GlobalIndex, derived from ``descriptors/`` (rebuilt when behind)

``index.json``'s image count is the commit point (`fol_infer.index.build` writes it last in
each batch): the stores may hold a batch more, which a reader leaves unread. An incomplete
index (a build still running, or interrupted) is never served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fol_infer.bundle import Bundle
from fol_infer.choices import FaissDevice, StoreDtype, TokenFormat, VerifyLevel
from fol_infer.errors import IndexStoreError
from fol_infer.files.ownership import Product
from fol_infer.index.global_index import GlobalIndex
from fol_infer.index.metadata import FORMAT as METADATA_FORMAT
from fol_infer.index.metadata import IndexMetadata, repair_command
from fol_infer.index.token_store import COMMIT, TokenStore
from fol_infer.index.token_store import FORMAT as STORE_FORMAT

METADATA, DESCRIPTORS, TOKENS, FAISS_FILE = "index.json", "descriptors", "tokens", "global.faiss"
EXACT_TOKENS = "tokens_fp32"
REBUILD_SUFFIX = ".rebuild"
# What `--force` may replace: an index says so in index.json, or, when that file is damaged,
# in its descriptor store's record.
PRODUCT = Product("index", ((METADATA, METADATA_FORMAT), (f"{DESCRIPTORS}/{COMMIT}", STORE_FORMAT)))


def is_index(folder: Path) -> bool:
    return (folder / METADATA).is_file()


def stores_match(meta: IndexMetadata, stores: list[TokenStore], writer: bool) -> None:
    """Bring stores back to the metadata's commit point: a writer cuts what a crash left
    past it; a reader only leaves it unread (a writer may be committing it right now)."""
    n = len(meta.paths)
    for store in stores:
        if len(store) < n:
            raise IndexStoreError(
                f"{store.path} holds {len(store)} images but {METADATA} lists {n}: the index "
                f"is damaged; repair it: {repair_command(store.path.parent)}"
            )
        if len(store) > n:
            store.truncate(n) if writer else store.limit(n)


def token_layout(fmt: TokenFormat | str) -> list[tuple[str, StoreDtype]]:
    """(folder, dtype) of each token store of a format: the scored one first."""
    fmt = TokenFormat.parse(fmt, "token format")
    if fmt == TokenFormat.INT8_EXACT:
        return [(TOKENS, "int8"), (EXACT_TOKENS, "fp32")]
    return [(TOKENS, "int8" if fmt == TokenFormat.INT8 else "fp16")]


def open_stores(
    folder: Path, fmt: TokenFormat | str, meta: IndexMetadata, verify: VerifyLevel, writer: bool
) -> list[TokenStore]:
    """The descriptor store, then the token stores, at the metadata's commit point; when one
    is refused, none is left open."""
    stores: list[TokenStore] = []
    repair = repair_command(folder)
    try:
        for name in [DESCRIPTORS, *(name for name, _ in token_layout(fmt))]:
            stores.append(TokenStore.open(folder / name, verify=verify, repair=repair))
        stores_match(meta, stores, writer)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


def faiss_from_descriptors(
    descriptors: TokenStore, factory: str, device: FaissDevice
) -> GlobalIndex:
    index = GlobalIndex.create(descriptors.dim, factory, device=device)
    extend(index, descriptors, 0)
    return index


EXTEND_CHUNK = 4096  # descriptors per FAISS add: a trained factory trains on the first chunk(s)


def extend(
    index: GlobalIndex, descriptors: TokenStore, start: int, chunk: int = EXTEND_CHUNK
) -> None:
    for a in range(start, len(descriptors), chunk):
        rows = descriptors.get(range(a, min(a + chunk, len(descriptors))))
        index.add(np.concatenate(rows).astype(np.float32, copy=False))


class Database:
    """An opened index: metadata, token store and FAISS index, released by `close`."""

    def __init__(
        self,
        folder: str | Path,
        bundle: Bundle | None = None,
        device: FaissDevice = "auto",
        verify: VerifyLevel = "cached",
        meta: IndexMetadata | None = None,
    ) -> None:
        """``meta``: the folder's metadata where the caller has just read it (a map's shard,
        checked against the map first)."""
        self.folder = Path(folder)
        if meta is None and not is_index(self.folder):
            if self.folder.with_name(self.folder.name + REBUILD_SUFFIX).is_dir():
                raise IndexStoreError(
                    f"{self.folder}: a --force rebuild was interrupted; re-run it"
                )
            raise IndexStoreError(
                f"{self.folder} is not an index (no {METADATA}): build it with fol-infer index"
            )
        self.meta = meta or IndexMetadata.load(self.folder / METADATA)
        if not self.meta.settings.get("complete", False):
            raise IndexStoreError(
                f"{self.folder}: the build was interrupted after {len(self.meta.paths)} images; "
                "re-run the same fol-infer index command to resume it"
            )
        if bundle is not None:
            self.meta.check_bundle(bundle.manifest.fingerprint, str(bundle.folder))
        self.token_format = TokenFormat.parse(
            self.meta.settings.get("tokens", "fp16"), "token format"
        )
        descriptors, *stores = open_stores(
            self.folder, self.token_format, self.meta, verify, writer=False
        )
        self.tokens = stores[0]
        self.exact_tokens = stores[1] if len(stores) > 1 else None  # int8-exact only
        try:
            self.global_index = self._open_faiss(descriptors, device, verify)
        except BaseException:  # a refused index leaves no memory map open
            for store in stores:
                store.close()
            raise
        finally:
            descriptors.close()

    def _open_faiss(
        self, descriptors: TokenStore, device: FaissDevice, verify: VerifyLevel
    ) -> GlobalIndex:
        """The saved FAISS index, caught up with descriptors appended since it was saved."""
        path, n = self.folder / FAISS_FILE, len(self.meta.paths)
        repair = f"{repair_command(self.folder)} (rebuilds it from the stored descriptors)"
        index = None
        if path.is_file():
            index = GlobalIndex.open(path, verify=verify, device=device, repair=repair)
        if index is None or len(index) > n or index.factory != self.meta.settings["factory"]:
            index = faiss_from_descriptors(descriptors, str(self.meta.settings["factory"]), device)
        elif len(index) < n:
            extend(index, descriptors, len(index))
        return index

    def __len__(self) -> int:
        return len(self.meta.paths)

    @property
    def paths(self) -> list[str]:
        """Image paths as recorded: relative to the database root unless outside it."""
        return self.meta.paths

    def absolute_path(self, db_index: int) -> Path:
        return Path(self.meta.root) / self.meta.paths[db_index]

    def close(self) -> None:
        self.tokens.close()
        if self.exact_tokens is not None:
            self.exact_tokens.close()
        self.global_index.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
