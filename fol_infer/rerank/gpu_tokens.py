"""Getting re-ranking tokens onto the GPU for the fused kernel (torch; imported lazily).

The kernel reads token sets packed back to back in one (T, D) float16 tensor (`PackedTokens`).
Two ways to fill it:

- `ResidentTokens`: the whole database stays on the GPU. At ~3,400 tokens x 128 dims x 2 bytes
  an image takes ~0.87 MB, so ~1,230 images fit per GiB (`images_per_gib`): Pitts30k's 10k
  database images take ~8.1 GiB, MSLS-val's 19k ~15 GiB, Pitts250k's 83k ~68 GiB (an 80 GB
  card, barely). Candidate ids from a GPU global search index it on the device: no host trip.
- `PinnedStager`: candidates are read per query batch from a token source (the token store)
  into reusable pinned host buffers and copied asynchronously on a side stream; two slots
  alternate so the host fills batch n+1 while the GPU still copies / re-ranks batch n.

Both depend on the token source only through `TokenSource.get`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch

from fol_infer.errors import UsageError
from fol_infer.model.arch import MAX_TOKENS, TOKEN_DIM

BYTES_PER_FP16 = 2


class TokenSource(Protocol):
    """What the GPU paths need from a token store: each id's (n_i, D) tokens, float16."""

    def get(self, ids: Sequence[int]) -> list[np.ndarray]: ...


@dataclass
class PackedTokens:
    """Token sets back to back in one tensor: the only layout the kernel reads."""

    tokens: torch.Tensor  # (T, D) float16, D a power of two >= 16 (zero columns pad it)
    offsets: torch.Tensor  # (n,) int64 on the tokens' device: first row of each set
    counts: torch.Tensor  # (n,) int32 on the tokens' device: rows of each set
    max_count: int  # host-side bound on counts, sizes the kernel's grid without a sync

    def __len__(self) -> int:
        return int(self.counts.shape[0])


def kernel_dim(dim: int) -> int:
    """tl.arange and tl.dot need a power of two >= 16; zero columns do not change dot products."""
    return max(16, 1 << max(0, dim - 1).bit_length())


def images_per_gib(mean_tokens: float = 3400.0, dim: int = TOKEN_DIM) -> int:
    """How many images a GiB of GPU memory holds as resident float16 tokens (+12 B of index)."""
    per_image = mean_tokens * kernel_dim(dim) * BYTES_PER_FP16 + 12
    return int(2**30 // per_image)


def _as_2d(x: np.ndarray | torch.Tensor, i: int) -> np.ndarray | torch.Tensor:
    if x.ndim == 2:
        return x
    if x.ndim == 1 and x.shape[0] == 0:  # an empty set written as np.zeros(0)
        return x.reshape(0, 0)
    raise UsageError(f"token set {i} has shape {tuple(x.shape)}: pass (n, dim) arrays")


def _common_dim(sets: Sequence[np.ndarray | torch.Tensor]) -> int:
    dims = {int(s.shape[1]) for s in sets if s.shape[0] > 0}
    if len(dims) > 1:
        raise UsageError(f"token sets of different widths {sorted(dims)}: use one encoder")
    return dims.pop() if dims else TOKEN_DIM


def _fp16_rows(x: np.ndarray | torch.Tensor, dim: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, np.float16)) if isinstance(x, np.ndarray) else x
    return t.to(device=device, dtype=torch.float16).reshape(-1, dim)


def pack_tokens(
    sets: Sequence[np.ndarray | torch.Tensor],
    device: torch.device | str,
    *,
    check_finite: bool = True,
    what: str = "token set",
) -> PackedTokens:
    """Pack (n_i, D) sets (numpy, or torch on any device) as float16 on `device`.

    Non-finite values (also float32 values beyond float16's +-65504) raise ValueError: the
    kernel would otherwise return counts that mean nothing.
    """
    device = torch.device(device)
    sets = [_as_2d(s, i) for i, s in enumerate(sets)]
    dim = _common_dim(sets)
    counts = np.array([s.shape[0] for s in sets], np.int64)
    with np.errstate(over="ignore"):  # overflow to inf is reported below
        if all(isinstance(s, np.ndarray) for s in sets):  # one host concat, one copy
            parts = [np.asarray(s, np.float16).reshape(-1, dim) for s in sets]
            host = np.concatenate([np.zeros((0, dim), np.float16), *parts])
            tokens = torch.from_numpy(host).to(device)
        else:
            empty = torch.zeros((0, dim), dtype=torch.float16, device=device)
            tokens = torch.cat([empty, *(_fp16_rows(s, dim, device) for s in sets)])
    width = kernel_dim(dim)
    if width != dim:
        tokens = torch.nn.functional.pad(tokens, (0, width - dim))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    packed = PackedTokens(
        tokens=tokens.contiguous(),
        offsets=torch.from_numpy(offsets).to(device),
        counts=torch.from_numpy(counts.astype(np.int32)).to(device),
        max_count=int(counts.max(initial=0)),
    )
    if check_finite:
        check_finite_tokens(packed.tokens, np.cumsum(counts), what)
    return packed


def check_finite_tokens(tokens: torch.Tensor, ends: np.ndarray, what: str) -> None:
    """Raise ValueError naming the first set with NaN/Inf. One device sync; the boolean
    temporaries stay small (row chunks), whatever the batch."""
    chunk = max(1, (16 << 20) // max(1, tokens.shape[1]))
    bad = torch.zeros((), dtype=torch.bool, device=tokens.device)
    for part in tokens.split(chunk):
        bad |= ~torch.isfinite(part).all()
    if not bool(bad):
        return
    for start, part in zip(range(0, len(tokens), chunk), tokens.split(chunk), strict=True):
        bad_rows = torch.nonzero(~torch.isfinite(part).all(dim=1))
        if len(bad_rows):
            row = start + int(bad_rows[0, 0])
            break
    index = int(np.searchsorted(ends, row, side="right"))
    raise ValueError(
        f"{what} {index} holds NaN or infinite values (or values beyond float16's +-65504) "
        "after conversion to float16: check the encoder output"
    )


def has_non_finite_fp16(a: np.ndarray) -> bool:
    """NaN/Inf anywhere in a float16 array, in two integer max passes (~10x np.isfinite):
    as int16, +inf/+NaN are the values >= 0x7C00; as uint16, -inf/-NaN are those >= 0xFC00."""
    if a.size == 0:
        return False
    return bool(a.view(np.int16).max() >= 0x7C00 or a.view(np.uint16).max() >= 0xFC00)


def _read(source: TokenSource, ids: Sequence[int], dim: int | None) -> list[np.ndarray]:
    sets = [np.asarray(a) for a in source.get(list(ids))]
    if len(sets) != len(ids):
        raise UsageError(f"token source returned {len(sets)} sets for {len(ids)} ids")
    for i, s in zip(ids, sets, strict=True):
        if s.ndim != 2 or (dim is not None and s.shape[0] and s.shape[1] != dim):
            raise UsageError(f"token source gave id {i} shape {s.shape}, expected (n, {dim})")
    return sets


class ResidentTokens:
    """A whole token database on the GPU; database ids are its rows."""

    def __init__(self, packed: PackedTokens):
        self.packed = packed

    @classmethod
    def from_source(
        cls,
        source: TokenSource,
        count: int,
        *,
        device: torch.device | str = "cuda",
        dim: int = TOKEN_DIM,
        token_counts: np.ndarray | None = None,
        max_tokens_per_image: int = MAX_TOKENS,
        batch: int = 512,
    ) -> ResidentTokens:
        """Load ids 0..count-1 batch by batch, validating each batch once here (the kernel path
        then skips per-query checks). Without `token_counts` (e.g. TokenStore.counts) the buffer
        is sized for `max_tokens_per_image` per image and the unused tail is kept (~6% at 3,400
        of 3,600 tokens); with them it is exact."""
        device = torch.device(device)
        width = kernel_dim(dim)
        bound = (
            int(np.sum(token_counts)) if token_counts is not None else count * max_tokens_per_image
        )
        tokens = torch.empty((bound, width), dtype=torch.float16, device=device)
        counts = np.zeros(count, np.int64)
        row = 0
        for start in range(0, count, batch):
            ids = range(start, min(count, start + batch))
            part = pack_tokens(_read(source, ids, dim), device, what="database image")
            n = int(part.tokens.shape[0])
            if row + n > bound:
                raise UsageError(
                    f"database images {ids.start}..{ids.stop - 1} exceed the "
                    f"{max_tokens_per_image} tokens per image the buffer was sized for: "
                    "pass token_counts"
                )
            if n:
                tokens[row : row + n] = part.tokens
            counts[ids.start : ids.stop] = part.counts.cpu().numpy()
            row += n
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(
            PackedTokens(
                tokens=tokens[:row],
                offsets=torch.from_numpy(offsets).to(device),
                counts=torch.from_numpy(counts.astype(np.int32)).to(device),
                max_count=int(counts.max(initial=0)),
            )
        )

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def nbytes(self) -> int:
        p = self.packed
        return p.tokens.numel() * p.tokens.element_size() + 12 * len(p)

    def rows(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Candidate rows for the kernel: ids as they are (on device), any id outside
        [0, len) -> -1 (an empty candidate, e.g. FAISS's -1 padding), with no host sync."""
        device = self.packed.tokens.device
        ids = torch.as_tensor(ids, device=device).to(torch.int64)
        return torch.where((ids >= 0) & (ids < len(self)), ids, -1)


class _Event(Protocol):
    def record(self, stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...


class _HostEvent:
    """CPU stand-in for torch.cuda.Event: there, every copy is synchronous."""

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass


@dataclass
class _Slot:
    pinned: torch.Tensor  # (rows, D) float16, page-locked on CUDA
    device_rows: torch.Tensor  # (rows, D) float16 on the device
    copied: _Event  # H2D copy of this slot finished
    consumed: _Event  # work that read this slot's device rows finished


class PinnedStager:
    """Candidate tokens from a TokenSource to the GPU, per query batch, via pinned staging.

    `stage(ids)` returns packed tokens that are ready on the current stream (it waits on the copy
    event, the host does not). A slot is rewritten only after the work queued on the caller's
    stream between its `stage` call and the next one has finished, so reuse never races; the
    returned tokens stay valid until the `stage` call after next (queue their work before)."""

    def __init__(
        self,
        source: TokenSource,
        *,
        device: torch.device | str = "cuda",
        dim: int = TOKEN_DIM,
        rows: int = 100 * MAX_TOKENS,
        check_finite: bool = True,
    ):
        self.source, self.dim, self.check_finite = source, dim, check_finite
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._slots = [self._new_slot(rows), self._new_slot(rows)]
        self._next = 0

    def _new_slot(self, rows: int) -> _Slot:
        width = kernel_dim(self.dim)
        pinned = torch.empty((rows, width), dtype=torch.float16, pin_memory=self._cuda)
        return _Slot(
            pinned=pinned,
            device_rows=torch.empty((rows, width), dtype=torch.float16, device=self.device),
            copied=torch.cuda.Event() if self._cuda else _HostEvent(),
            consumed=torch.cuda.Event() if self._cuda else _HostEvent(),
        )

    def stage(self, ids: np.ndarray) -> tuple[PackedTokens, np.ndarray]:
        """Fetch the distinct non-negative ids once each; return (packed, rows) where rows has
        ids' shape and says which packed set each id is (-1 where the id is negative)."""
        ids = np.asarray(ids, np.int64)
        unique, inverse = np.unique(ids[ids >= 0], return_inverse=True)
        rows = np.full(ids.shape, -1, np.int64)
        rows[ids >= 0] = inverse
        sets = _read(self.source, unique.tolist(), self.dim)
        counts = np.array([s.shape[0] for s in sets], np.int64)
        total = int(counts.sum())

        # Everything queued so far on the caller's stream that read the previous slot.
        self._slots[self._next ^ 1].consumed.record(self._caller_stream())
        slot = self._slot_for(total)
        slot.copied.synchronize()  # its pinned rows may still be in flight
        host = slot.pinned[:total].numpy()
        host[:, self.dim :] = 0
        ends = np.cumsum(counts)
        with np.errstate(over="ignore"):  # overflow to inf is reported below
            for s, end, n in zip(sets, ends, counts, strict=True):
                if n:
                    host[end - n : end, : self.dim] = s
        if self.check_finite and has_non_finite_fp16(host):
            bad = ~np.isfinite(host[:, : self.dim]).all(axis=1)
            if bad.any():
                first = int(unique[np.searchsorted(ends, int(np.argmax(bad)), side="right")])
                raise ValueError(
                    f"database image {first} holds NaN or infinite values (or values beyond "
                    "float16's +-65504): rebuild its tokens"
                )
        device_rows = slot.device_rows[:total]
        if self._stream is None:
            device_rows.copy_(slot.pinned[:total])
        else:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(cast(torch.cuda.Event, slot.consumed))
                device_rows.copy_(slot.pinned[:total], non_blocking=True)
                slot.copied.record(self._stream)
            torch.cuda.current_stream(self.device).wait_event(cast(torch.cuda.Event, slot.copied))
        self._next ^= 1
        offsets = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        packed = PackedTokens(
            tokens=device_rows,
            offsets=torch.from_numpy(offsets).to(self.device, non_blocking=True),
            counts=torch.from_numpy(counts.astype(np.int32)).to(self.device, non_blocking=True),
            max_count=int(counts.max(initial=0)),
        )
        return packed, rows

    def _caller_stream(self) -> torch.cuda.Stream | None:
        return torch.cuda.current_stream(self.device) if self._stream is not None else None

    def _slot_for(self, total: int) -> _Slot:
        """The next slot, regrown (after its last use finished) when this batch is larger."""
        slot = self._slots[self._next]
        if total > slot.pinned.shape[0]:
            slot.consumed.synchronize()
            slot.copied.synchronize()
            slot = self._slots[self._next] = self._new_slot(max(total, 2 * slot.pinned.shape[0]))
        return slot
