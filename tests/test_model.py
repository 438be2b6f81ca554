"""The reference model follows the spec step by step (checked against straightforward code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="model tests need PyTorch")
F = torch.nn.functional

from fol_infer.model import fol  # noqa: E402
from fol_infer.model.checkpoint import random_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


def test_position_embedding_follows_dinov2_scale_factor_rule(model) -> None:
    backbone = model.backbone.model
    h, w = 15, 16
    got = backbone.position_embedding(h, w)
    grid = backbone.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, mode="bicubic", scale_factor=((h + 0.1) / 37, (w + 0.1) / 37))
    want = want.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    assert torch.equal(got[:, 1:], want)
    assert torch.equal(got[:, :1], backbone.pos_embed[:, :1])
    by_size = (
        F.interpolate(grid, mode="bicubic", size=(h, w)).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    )
    assert not torch.allclose(got[:, 1:], by_size)  # the rule matters
    assert torch.equal(backbone.position_embedding(37, 37), backbone.pos_embed)


def test_saliency_is_last_block_cls_attention_summed_over_heads(model) -> None:
    backbone = model.backbone.model
    images = torch.randn(2, 3, 210, 224)
    pos = backbone.position_embedding(15, 16)
    with torch.no_grad():
        _, _, saliency = backbone(images, pos)
        x = torch.cat([backbone.cls_token.expand(2, -1, -1), backbone.patch_embed(images)], 1) + pos
        for block in backbone.blocks[:-1]:
            x, _ = block(x)
        last = backbone.blocks[-1]
        y = last.norm1(x)
        b, n, c = y.shape
        heads = last.attn.heads
        q, k, _ = last.attn.qkv(y).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
        want = att[:, :, 0, 1:].sum(1)
    torch.testing.assert_close(saliency, want)


def test_stable_logsumexp_matches_torch_and_survives_large_values() -> None:
    x = torch.randn(3, 5, 7) * 30
    torch.testing.assert_close(fol.logsumexp(x, 2), torch.logsumexp(x, 2))
    big = torch.tensor([[1e4, 1e4 - 1.0]])
    assert torch.isfinite(fol.logsumexp(big, 1)).all()


def test_sinkhorn_matches_the_spec_recurrence() -> None:
    torch.manual_seed(0)
    b, m, n = 2, 4, 9
    scores, dustbin = torch.randn(b, m, n), torch.rand(b, n)
    z = torch.cat([scores, dustbin[:, None]], 1).double()
    norm = -math.log(m + n)
    log_mu = torch.tensor([norm] * m + [math.log(n - m) + norm]).double()
    log_nu = torch.full((n,), norm).double()
    u, v = torch.zeros(b, m + 1).double(), torch.zeros(b, n).double()
    for _ in range(3):
        u = log_mu - torch.logsumexp(z + v[:, None], 2)
        v = log_nu - torch.logsumexp(z + u[:, :, None], 1)
    want = torch.exp(z + u[:, :, None] + v[:, None] - norm)[:, :m]
    torch.testing.assert_close(
        fol.sinkhorn_assignment(scores, dustbin).double(), want, rtol=1e-5, atol=1e-7
    )


def test_clamp_top_values_clamps_exactly_three_to_the_five_percent_value() -> None:
    x = torch.rand(3, 240)
    got = fol.clamp_top_values(x)
    for row, out in zip(x, got):
        order = torch.argsort(row, descending=True)
        kth = row[order[int(0.05 * 240)]]
        want = row.clone()
        want[order[:3]] = kth
        assert torch.equal(out, want)


def test_local_branch_selects_row_major_tokens_of_the_upsampled_region(model) -> None:
    h, w = 15, 16
    torch.manual_seed(1)
    features = torch.randn(2, 64, h, w)
    confidence = torch.rand(2, h, w)
    with torch.no_grad():
        tokens, count, region = model.forward_local(features, confidence)
        y = model.upconv2(F.relu(model.upconv(features)))
    big_h, big_w = 4 * h - 3, 4 * w - 3
    assert tokens.shape == (2, 3600, 128) and count.dtype == torch.int32
    for i in range(2):
        top = torch.topk(confidence[i].flatten(), 225).indices
        mask = torch.zeros(h * w)
        mask[top] = 1
        assert torch.equal(region[i].flatten(), mask.bool())
        up = F.interpolate(mask.reshape(1, 1, h, w), size=(big_h, big_w), mode="nearest")[0, 0]
        rows, cols = torch.nonzero(up, as_tuple=True)  # row-major order
        want = F.normalize(y[i, :, rows, cols].T, dim=-1)
        n = len(rows)
        assert int(count[i]) == n and 225 * 9 <= n <= 3600
        torch.testing.assert_close(tokens[i, :n], want)
        assert torch.count_nonzero(tokens[i, n:]) == 0


def test_global_branch_shapes_and_unit_norm(model) -> None:
    images = torch.randn(3, 3, 210, 224)
    with torch.no_grad():
        d, f, c = model.forward_global(images, model.backbone.model.position_embedding(15, 16))
    assert d.shape == (3, 8448) and f.shape == (3, 64, 15, 16) and c.shape == (3, 15, 16)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(c.sum((1, 2)), torch.ones(3))
    # The 256-d token part and each cluster column are L2-normalised before the final norm.
    g = d[:, :256].numpy()
    clusters = d[:, 256:].numpy().reshape(3, 128, 64)
    ratio = np.linalg.norm(clusters, axis=1) / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-4)
