"""losses.py against independent hand computations: loops over tokens in numpy float64."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402


def states(L=2, B=3, T=5, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(L, B, T, D, generator=g)
    orig = torch.randn(L, B, T, D, generator=g)
    # some tokens nearly unchanged (positive cosine), some flipped (negative cosine -> ReLU 0)
    new[:, 0] = orig[:, 0] + 0.1 * new[:, 0]
    new[:, 1, :2] = -orig[:, 1, :2]
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.long)[:B, :T]
    return new, orig, mask


def np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def hand_tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_rerouting_loss_matches_hand_computation():
    new, orig, mask = states()
    n, o, m = new.double().numpy(), orig.double().numpy(), mask.numpy()
    total = sum(max(0.0, np_cos(n[l, b, t], o[l, b, t])) for l in range(n.shape[0]) for b, t in hand_tokens(m))
    expected = total / (n.shape[0] * m.sum())
    got = losses.rerouting_loss(new, orig, mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a list of per-layer tensors gives the same value as the stacked tensor
    assert losses.rerouting_loss(list(new), list(orig), mask).item() == pytest.approx(expected, rel=1e-5)


def test_rerouting_loss_ignores_padding_and_is_zero_when_orthogonal_or_opposite():
    new, orig, mask = states()
    garbage = new.clone()
    garbage[:, mask == 0] = 1e6  # values at padding must not matter
    assert losses.rerouting_loss(garbage, orig, mask).item() == pytest.approx(
        losses.rerouting_loss(new, orig, mask).item(), rel=1e-6)
    assert losses.rerouting_loss(-orig, orig, mask).item() == 0.0
    assert losses.rerouting_loss(orig, orig, mask).item() == pytest.approx(1.0, abs=1e-6)


def test_rerouting_loss_in_bf16_is_computed_in_fp32():
    new, orig, mask = states(D=256)
    ref = losses.rerouting_loss(new.bfloat16().float(), orig.bfloat16().float(), mask)
    got = losses.rerouting_loss(new.bfloat16(), orig.bfloat16(), mask)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_retain_loss_matches_hand_computation():
    new, orig, mask = states()
    n, o, m = new.double().numpy(), orig.double().numpy(), mask.numpy()
    total = sum(np.linalg.norm(n[l, b, t] - o[l, b, t]) for l in range(n.shape[0]) for b, t in hand_tokens(m))
    expected = total / (n.shape[0] * m.sum())
    assert losses.retain_loss(new, orig, mask).item() == pytest.approx(expected, rel=1e-5)
    assert losses.retain_loss(orig, orig, mask).item() == 0.0


def test_retain_loss_gradient_flows_only_through_masked_tokens():
    new, orig, mask = states()
    new.requires_grad_(True)
    losses.retain_loss(new, orig, mask).backward()
    assert torch.all(new.grad[:, mask == 0] == 0)
    assert torch.all(new.grad[:, mask == 1].abs().sum(-1) > 0)


def test_retain_loss_relative_matches_hand_computation():
    new, orig, mask = states()
    n, o, m = new.double().numpy(), orig.double().numpy(), mask.numpy()
    total = sum(np.linalg.norm(n[l, b, t] - o[l, b, t]) / np.linalg.norm(o[l, b, t])
                for l in range(n.shape[0]) for b, t in hand_tokens(m))
    expected = total / (n.shape[0] * m.sum())
    assert losses.retain_loss(new, orig, mask, relative=True).item() == pytest.approx(expected, rel=1e-5)
    assert losses.retain_loss(orig, orig, mask, relative=True).item() == 0.0


def test_retain_loss_relative_is_scale_free_per_token():
    # one token's state 1000x longer (a massive activation) weighs no more than the others
    new, orig, mask = states()
    ref = losses.retain_loss(new, orig, mask, relative=True)
    scaled_new, scaled_orig = new.clone(), orig.clone()
    scaled_new[:, 0, 0] *= 1000
    scaled_orig[:, 0, 0] *= 1000
    scaled = losses.retain_loss(scaled_new, scaled_orig, mask, relative=True)
    assert scaled.item() == pytest.approx(ref.item(), rel=1e-5)
    assert losses.retain_loss(scaled_new, scaled_orig, mask).item() > 10 * losses.retain_loss(new, orig, mask).item()


def test_retain_loss_official_matches_hand_computation_of_padded_batch():
    # The official code: states * mask, ||.||_2 over D, nanmean over (S, B, pad_to). Build that padded
    # batch explicitly (zeros past T) and compare with our unpadded call.
    S, B, T, D, pad_to = 4, 3, 5, 8, 16
    new, orig, mask = states(L=S, B=B, T=T, D=D)
    n = np.zeros((S, B, pad_to, D))
    o = np.zeros((S, B, pad_to, D))
    m = np.zeros((B, pad_to))
    n[:, :, :T], o[:, :, :T], m[:, :T] = new.double().numpy(), orig.double().numpy(), mask.numpy()
    dist = np.zeros((S, B, pad_to))
    for s in range(S):
        for b in range(B):
            for t in range(pad_to):
                dist[s, b, t] = np.linalg.norm(n[s, b, t] * m[b, t] - o[s, b, t] * m[b, t])
    expected = dist.mean()
    got = losses.retain_loss_official(new, orig, mask, pad_to=pad_to)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # padding the batch ourselves to a different length changes nothing
    padded_new = torch.cat([new, torch.randn(S, B, 3, D)], dim=2)
    padded_orig = torch.cat([orig, torch.randn(S, B, 3, D)], dim=2)
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=mask.dtype)], dim=1)
    assert losses.retain_loss_official(padded_new, padded_orig, padded_mask, pad_to=pad_to).item() == \
        pytest.approx(expected, rel=1e-5)


def test_retain_loss_official_rejects_rows_longer_than_pad_to():
    new, orig, mask = states()
    with pytest.raises(ValueError, match="longer than pad_to=4"):
        losses.retain_loss_official(new, orig, mask, pad_to=4)


def test_official_retain_states_normalises_only_the_last_state():
    hs = [torch.randn(2, 3, 4) for _ in range(3)]
    norm = torch.nn.RMSNorm(4, eps=1e-5)
    out = losses.official_retain_states(hs, norm)
    assert len(out) == 3 and out[0] is hs[0] and out[1] is hs[1]
    torch.testing.assert_close(out[2], norm(hs[2]))


def test_coefficients_follow_the_official_schedule():
    # the official trainer: step counted from 1, progress = step / 300 for 150 steps
    for step in (1, 75, 150):
        cb, retain = losses.coefficients(step, 150, alpha=10.0)
        assert cb == pytest.approx(10 * (1 - step / 300))
        assert retain == pytest.approx(10 * step / 300)
    assert losses.coefficients(150, 150, 10.0) == pytest.approx((5.0, 5.0))
    with pytest.raises(ValueError):
        losses.coefficients(0, 150, 10.0)


def test_random_directions_are_fixed_unit_vectors():
    u = losses.random_directions(2, 16, seed=3)
    assert u.shape == (2, 16) and u.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.vector_norm(u, dim=-1), torch.ones(2))
    torch.testing.assert_close(u, losses.random_directions(2, 16, seed=3), rtol=0, atol=0)
    assert not torch.equal(u, losses.random_directions(2, 16, seed=4))


def test_direction_loss_matches_hand_computation():
    new, orig, mask = states()
    u = losses.random_directions(2, 8, seed=1)
    n, o, m, un = new.double().numpy(), orig.double().numpy(), mask.numpy(), u.double().numpy()
    total = 0.0
    for l in range(2):
        for b, t in hand_tokens(m):
            scale = np.linalg.norm(o[l, b, t])
            total += np.linalg.norm(n[l, b, t] - un[l] * scale) / scale
    expected = total / (2 * m.sum())
    assert losses.direction_loss(new, orig, mask, u).item() == pytest.approx(expected, rel=1e-5)
    # zero when the state sits on the direction at its original length
    on_target = u[:, None, None, :] * torch.linalg.vector_norm(orig, dim=-1, keepdim=True)
    assert losses.direction_loss(on_target, orig, mask, u).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="3 directions for 2 layers"):
        losses.direction_loss(new, orig, mask, losses.random_directions(3, 8))


def test_direction_loss_gradient_moves_states_toward_direction():
    new, orig, mask = states()
    u = losses.random_directions(2, 8, seed=1)
    new = new.clone().requires_grad_(True)
    opt = torch.optim.Adam([new], lr=0.1)
    first = losses.direction_loss(new, orig, mask, u).item()
    for _ in range(50):
        opt.zero_grad()
        losses.direction_loss(new, orig, mask, u).backward()
        opt.step()
    assert losses.direction_loss(new, orig, mask, u).item() < 0.25 * first


class FakeTokenizer:
    """A chat format whose turns end with <eot> (id 9); generation also stops on <eos> (id 8)."""
    stop_ids = [8, 9]

    def apply_chat_template(self, messages):
        return [1] + [t for m in messages for t in (5, 6, 9)]


class FakeModel(torch.nn.Module):
    def __init__(self, D=8):
        super().__init__()
        self.args = type("Args", (), {"dim": D, "n_layers": 4})()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(10, D)


def context(**config):
    cfg = type("Config", (), {"target_layers": (2, 3), "seed": 0, "direction": "", **config})()
    torch.manual_seed(0)
    return losses.LossContext(FakeModel(), FakeTokenizer(), cfg)


def test_registry_entries_build_terms_of_the_same_shape():
    assert {"reroute", "random", "direction", "eot"} <= set(losses.LOSSES)
    new, orig, mask = states()
    ctx = context()
    for name in ("reroute", "random", "eot"):
        value = losses.LOSSES[name].build(ctx)(new, orig, mask)
        assert value.shape == () and torch.isfinite(value), name
    reroute = losses.LOSSES["reroute"].build(ctx)(new, orig, mask)
    assert reroute.item() == losses.rerouting_loss(new, orig, mask).item()


def test_eot_targets_the_embedding_of_the_token_that_ends_an_answer():
    ctx = context()
    assert losses.end_of_turn_id(ctx.tokenizer) == 9
    u = ctx.model.model.embed_tokens.weight[9].detach()
    u = (u / u.norm()).expand(2, -1)  # (L, D)
    new, orig, mask = states()
    expected = losses.direction_loss(new, orig, mask, u)
    assert losses.LOSSES["eot"].build(ctx)(new, orig, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    on_target = u[:, None, None, :] * torch.linalg.vector_norm(orig, dim=-1, keepdim=True)
    assert losses.LOSSES["eot"].build(ctx)(on_target, orig, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_direction_entry_needs_a_file(tmp_path):
    with pytest.raises(ValueError, match="--loss direction needs --direction FILE"):
        losses.LOSSES["direction"].build(context())
    ctx = context()
    ctx.directions = losses.random_directions(2, 8, seed=1)
    term = losses.LOSSES["direction"].build(ctx)
    new, orig, mask = states()
    assert torch.isfinite(term(new, orig, mask))


def test_cosine_metric_matches_hand_computation():
    new, orig, mask = states()
    n, o, m = new.double().numpy(), orig.double().numpy(), mask.numpy()
    total = sum(np_cos(n[l, b, t], o[l, b, t]) for l in range(2) for b, t in hand_tokens(m))
    assert losses.cosine_metric(new, orig, mask) == pytest.approx(total / (2 * m.sum()), rel=1e-5)
    assert losses.cosine_metric(orig, orig, mask) == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(losses.cosine_metric(torch.zeros_like(orig), orig, mask))
