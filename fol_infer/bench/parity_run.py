"""Parity of an engine's whole run against the PyTorch reference on the same images.

Encodes the dataset again with the torch backend, ranks it in memory the same way (inner
product, then the same re-ranker) and compares descriptors, top-1 choices and recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fol_infer.backends import Encoder, open_encoder
from fol_infer.bench.dataset import Dataset
from fol_infer.bench.recall import RECALL_NS, recall_at
from fol_infer.bundle import Bundle
from fol_infer.choices import EncoderBackend
from fol_infer.encoding import encode_images
from fol_infer.parity import cosine
from fol_infer.pipeline import QueryResult
from fol_infer.rerank import RerankSettings, rerank_order, score_many


def encode_files(encoder: Encoder, paths: Sequence[Path]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(descriptors (N, 8448), token list) of image files that must all decode."""
    encoded = encode_images(encoder, paths, batch=4, strict=True)
    return encoded.descriptors, encoded.token_list()


def _delta(ours: float | None, reference: float | None) -> float | None:
    return None if ours is None or reference is None else ours - reference


def torch_parity(
    bundle: Bundle,
    dataset: Dataset,
    results: list[QueryResult],
    checkpoint: Path | None,
    rerank: RerankSettings,
    rerank_k: int,
) -> dict[str, Any]:
    reference = open_encoder(bundle, EncoderBackend.TORCH, checkpoint=checkpoint)
    try:
        db_desc, db_tokens = encode_files(reference, dataset.database)
        q_desc, q_tokens = encode_files(reference, dataset.queries)
    finally:
        reference.close()
    order = np.argsort(-(q_desc @ db_desc.T), axis=1, kind="stable")
    candidates = order[:, :rerank_k]
    matches = score_many(q_tokens, [[db_tokens[j] for j in row] for row in candidates], rerank)
    reranked = np.array(
        [
            np.concatenate([row[rerank_order(m)], full[rerank_k:]])
            for row, m, full in zip(candidates, matches, order)
        ]
    )
    engine_global = np.array([[h.db_index for h in r.global_hits] for r in results])
    engine_final = np.array([r.ranking() for r in results])
    engine_q = np.stack([r.descriptor for r in results if r.descriptor is not None])
    cos = cosine(engine_q, q_desc)
    out: dict[str, Any] = {
        "images_compared": len(cos),
        "min_global_cosine": float(cos.min()),
        "mean_global_cosine": float(cos.mean()),
        "top1_agreement_global": float(np.mean(engine_global[:, 0] == order[:, 0])),
        "top1_agreement_reranked": float(np.mean(engine_final[:, 0] == reranked[:, 0])),
    }
    positives = dataset.positives()
    if positives is not None:
        n_db = len(dataset.database)
        for name, engine_rank, torch_rank in (
            ("global", engine_global, order),
            ("reranked", engine_final, reranked),
        ):
            ours = recall_at(engine_rank, positives, RECALL_NS, num_database=n_db)
            ref = recall_at(torch_rank, positives, RECALL_NS, num_database=n_db)
            out[f"recall_delta_{name}"] = {
                k.removeprefix("R@"): _delta(ours[k], ref[k]) for k in ours
            }
    return out
