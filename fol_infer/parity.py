"""Compare a backend's outputs with the PyTorch reference stored in a bundle.

Used by `fol-infer verify` and the benchmark. Tolerances depend on the engine's precision:
fp32 engines must match to float rounding; fp16 engines to the issue's looser figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fol_infer.backends.base import Encoder, EncoderOutput
from fol_infer.bundle import Bundle
from fol_infer.model.arch import REGION_PATCHES

TOLERANCES = {
    # min global cosine, max |token diff|, share of images with identical selected positions
    "fp32": {"global_cosine": 0.99999, "token_diff": 1e-4, "positions": 1.0},
    "fp16": {"global_cosine": 0.999, "token_diff": 5e-2, "positions": 0.95},
}


@dataclass
class ParityReport:
    images: int
    min_global_cosine: float
    mean_global_cosine: float
    max_token_diff: float  # over images that selected the same regions
    count_agreement: float  # share of images with the same token count
    position_agreement: float  # share of images with the same selected region
    boundary_ties: int  # images whose reference confidence ties at the 225th place
    untied_position_agreement: float  # the same share over images without such a tie
    precision: str
    passed: bool
    failures: list[str]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30)


def boundary_ties(confidence: np.ndarray, k: int = REGION_PATCHES) -> np.ndarray:
    """(B,) bool: the k-th and (k+1)-th largest confidences are equal in float32.

    The published selection (torch.topk) breaks such ties in an unspecified order and
    ONNX Runtime / TensorRT by lowest index, so those images may select other regions.
    """
    flat = confidence.reshape(len(confidence), -1)
    if flat.shape[1] <= k:  # every patch is selected: nothing to tie with
        return np.zeros(len(flat), bool)
    part = -np.sort(-flat, axis=1)[:, k - 1 : k + 1]
    return part[:, 0] == part[:, 1]


def compare(
    reference: dict[str, np.ndarray], out: EncoderOutput, precision: str = "fp32"
) -> ParityReport:
    if out.local is None:
        raise ValueError("parity needs the local branch outputs too")
    tol = TOLERANCES[precision]
    cos = cosine(reference["global"], out.global_.descriptors)
    ref_count = reference["count"].astype(np.int64)
    same_count = ref_count == out.local.counts
    same_region = np.all(reference["region_mask"] == out.local.region_mask, axis=(1, 2))
    tied = boundary_ties(reference["confidence"])
    diffs = [  # token rows line up only where the same regions were selected
        float(np.abs(reference["tokens"][i, :n] - out.local.tokens[i, :n]).max(initial=0.0))
        for i, n in enumerate(ref_count)
        if same_count[i] and same_region[i]
    ]
    report = ParityReport(
        images=len(cos),
        min_global_cosine=float(cos.min()),
        mean_global_cosine=float(cos.mean()),
        max_token_diff=max(diffs, default=float("nan")),
        count_agreement=float(same_count.mean()),
        position_agreement=float(same_region.mean()),
        boundary_ties=int(tied.sum()),
        untied_position_agreement=float(same_region[~tied].mean()) if (~tied).any() else 1.0,
        precision=precision,
        passed=True,
        failures=[],
    )
    if report.min_global_cosine < tol["global_cosine"]:
        report.failures.append(
            f"global cosine {report.min_global_cosine:.6f} < {tol['global_cosine']}"
        )
    if not diffs or report.max_token_diff > tol["token_diff"]:
        report.failures.append(
            f"token max diff {report.max_token_diff:.2e} > {tol['token_diff']:.0e}"
        )
    if precision == "fp32" and not np.all(same_count[~tied]):
        report.failures.append("token counts differ on images without a confidence tie")
    if report.untied_position_agreement < tol["positions"]:
        report.failures.append(
            f"selected regions agree on only {report.untied_position_agreement:.0%} of images "
            "without a confidence tie"
        )
    report.passed = not report.failures
    return report


def load_reference(bundle: Bundle) -> dict[str, np.ndarray]:
    with np.load(bundle.path("reference"), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def verify(bundle: Bundle, encoder: Encoder, precision: str = "fp32") -> ParityReport:
    """Re-run the bundle's reference inputs through `encoder` and compare."""
    reference = load_reference(bundle)
    return compare(reference, encoder.encode(reference["images"]), precision)
