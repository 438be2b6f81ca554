"""Images in, pre-processed batches out, with failures recorded instead of fatal.

Decoding runs in a small thread pool one batch ahead of the model (PIL and numpy release the
GIL), so encoding a folder keeps the encoder busy. Order is the input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fol_infer.errors import ImageError
from fol_infer.images import ImageSource, preprocess, source_name


@dataclass
class Failure:
    source: str
    reason: str


@dataclass
class Batch:
    indices: list[int]  # positions in the input sequence of the images that decoded
    images: np.ndarray  # (len(indices), 3, H, W) float32
    failures: list[Failure] = field(default_factory=list)


def _load(source: ImageSource, size: tuple[int, int]) -> np.ndarray | str:
    try:
        return preprocess(source, size)
    except ImageError as exc:
        return str(exc)


def iter_batches(
    sources: Sequence[ImageSource],
    size: tuple[int, int],
    batch_size: int,
    strict: bool = False,
    workers: int = 2,
) -> Iterator[Batch]:
    """Yield batches of decoded images; unreadable ones are listed in `failures`.

    With `strict`, the first unreadable image raises its ImageError instead.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    starts = range(0, len(sources), batch_size)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def submit(start: int) -> list:
            chunk = sources[start : start + batch_size]
            return [pool.submit(_load, s, size) for s in chunk]

        pending = submit(starts[0]) if starts else []
        for n, start in enumerate(starts):
            current = pending
            pending = submit(starts[n + 1]) if n + 1 < len(starts) else []
            batch = Batch(indices=[], images=np.empty((0, 3, *size), np.float32))
            arrays = []
            for offset, future in enumerate(current):
                result = future.result()
                index = start + offset
                if isinstance(result, str):
                    if strict:
                        raise ImageError(result)
                    batch.failures.append(Failure(source_name(sources[index], index), result))
                else:
                    batch.indices.append(index)
                    arrays.append(result)
            if arrays:
                batch.images = np.stack(arrays)
            yield batch
