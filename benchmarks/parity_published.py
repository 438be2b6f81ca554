"""Check fol-infer's model against the published FoL code on random weights.

    python benchmarks/parity_published.py --fol-repo PATH/FoL --dinov2-repo PATH/dinov2 \
        --arch vitb14 --resolution 322 504 [--json PATH]

Needs your own clones of chenshunpeng/FoL and facebookresearch/dinov2 (nothing is downloaded:
DINOv2 is built from the local clone without pretrained weights). The same seeded random
weights are loaded into both models strictly, then global descriptors and tokens are compared.
The published code pads tokens to a length that depends on the grid and fails below 322 px;
this script compares at the resolutions it supports.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from common import parser, write_report

from fol_infer.model.arch import get_arch
from fol_infer.model.checkpoint import random_model


def published_model(fol_repo: Path, dinov2_repo: Path, arch: str) -> torch.nn.Module:
    if "matplotlib" not in sys.modules:  # imported but unused by the published aggregator
        sys.modules["matplotlib"] = types.ModuleType("matplotlib")
        sys.modules["matplotlib.pyplot"] = types.ModuleType("matplotlib.pyplot")
    sys.path.insert(0, str(fol_repo))
    hub_load = torch.hub.load

    def local_dinov2(_repo: str, name: str, *args: object, **kwargs: object) -> torch.nn.Module:
        return hub_load(str(dinov2_repo), name, source="local", pretrained=False)

    torch.hub.load = local_dinov2  # type: ignore[assignment]
    try:
        from network_FoL import FoLNet  # type: ignore[import-not-found]

        return FoLNet(num_channels=get_arch(arch).width, model_name=f"dinov2_{arch}").eval()
    finally:
        torch.hub.load = hub_load  # type: ignore[assignment]


def options() -> argparse.ArgumentParser:
    p = parser(__doc__)
    p.add_argument("--fol-repo", type=Path, required=True)
    p.add_argument("--dinov2-repo", type=Path, required=True)
    p.add_argument("--arch", default="vitb14")
    p.add_argument("--resolution", type=int, nargs="+", default=[322])
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    args = options().parse_args()

    ours = random_model(args.arch, args.seed)
    theirs = published_model(args.fol_repo, args.dinov2_repo, args.arch)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    results = []
    for res in args.resolution:
        torch.manual_seed(args.seed)
        images = torch.randn(2, 3, res, res)
        with torch.inference_mode():
            pub_global, pub_tokens, *_ = theirs(images, test=True)
            pos = ours.backbone.model.position_embedding(res // 14, res // 14)
            desc, feats, conf = ours.forward_global(images, pos)
            tokens, count, _ = ours.forward_local(feats, conf)
        cos = torch.nn.functional.cosine_similarity(desc, pub_global).min().item()
        pub_count = (pub_tokens.abs().sum(-1) > 0).sum(1)
        same_count = bool(torch.equal(pub_count, count.long()))
        n = min(tokens.shape[1], pub_tokens.shape[1])
        diff = (tokens[:, :n] - pub_tokens[:, :n]).abs().max().item()
        ok = cos >= 0.99999 and same_count and diff <= 1e-4
        results.append(
            {
                "resolution": res,
                "min_global_cosine": cos,
                "counts": count.tolist(),
                "published_counts": pub_count.tolist(),
                "max_token_diff": diff,
                "ok": ok,
            }
        )
        print(
            f"{args.arch}/{res}: global min cos {cos:.7f}, counts {count.tolist()} vs "
            f"{pub_count.tolist()}, token max diff {diff:.1e} -> {'OK' if ok else 'MISMATCH'}"
        )
    write_report(args.json, {"arch": args.arch, "seed": args.seed, "results": results})
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
