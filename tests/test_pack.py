"""Packed rows and micro-batches change how a step runs, not what it computes: the same losses, metrics
and LoRA gradients as the padded whole batch, in fp32 on a tiny random model."""

import contextlib
import random
from functools import partial

import pytest
import torch

import data
import losses
import refusal
import train
from lora import lora_disabled
from model import ModelArgs, Transformer

ARGS = ModelArgs(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=97)
TOL = dict(atol=1e-5, rtol=1e-5)


def config(**overrides) -> train.TrainConfig:
    """The real preset, shrunk: target layers 2 and 4, no dropout (its masks would differ between layouts),
    LoRA's B started off zero so that every gradient is non-zero."""
    settings = dict(model="llama3", device="cpu", target_layers=(2, 4), batch_size=4, steps=10, lora_dropout=0.0,
                    lora_init_std=0.05, retain_pad_to=64)
    return train.resolve(train.TrainConfig(**{**settings, **overrides}))


def model_for(cfg: train.TrainConfig, args: ModelArgs = ARGS) -> Transformer:
    torch.manual_seed(0)
    return train.prepare_model(Transformer(args, train.n_blocks_needed(cfg), lm_head=False), cfg)


def examples(n=12, seed=0) -> list[data.Example]:
    """Rows of 3 to 40 tokens, some with a request the loss does not see (loss_on response)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        n_request, n_response = rng.randint(1, 10), rng.randint(2, 30)
        tokens = [rng.randrange(1, ARGS.vocab_size) for _ in range(n_request + n_response)]
        rows.append(data.Example(tokens, n_request, [rng.randint(0, 1)] * n_request + [1] * n_response))
    return rows


def batch(pack: bool, batch_size: int = 4) -> data.Batch:
    return next(data.batches(examples(), examples(seed=1), batch_size, pad_id=0, seed=3, pack=pack))


def gradients_and_metrics(cfg, b, args: ModelArgs = ARGS, ablation=None):
    model = model_for(cfg, args)
    model.train()
    m = train.step_gradients(model, b, 3, cfg, losses.rerouting_loss, torch.autocast("cpu", enabled=False), ablation)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())  # every LoRA weight gets a gradient
    return grads, m


def assert_same(a, b):
    (grads_a, m_a), (grads_b, m_b) = a, b
    assert m_a.keys() == m_b.keys()
    for key in m_a:
        assert m_a[key] == pytest.approx(m_b[key], rel=1e-5, abs=1e-6), key
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **TOL, msg=name)


@pytest.mark.parametrize("retain_norm", ["official", "masked", "relative"])
def test_packed_rows_give_the_padded_losses_and_gradients(retain_norm):
    cfg = config(retain_norm=retain_norm)
    padded, packed = batch(pack=False), batch(pack=True)
    assert packed.cb_tokens.shape[0] == 1 and padded.cb_tokens.shape[0] == 4
    assert_same(gradients_and_metrics(cfg, padded), gradients_and_metrics(cfg, packed))


@pytest.mark.parametrize("retain_norm, term", [("masked", losses.retain_loss),
                                                ("relative", partial(losses.retain_loss, relative=True))])
def test_the_step_computes_the_chosen_retain_term(retain_norm, term):
    cfg, b = config(retain_norm=retain_norm), batch(pack=False)
    model = model_for(cfg)
    _, metrics = train.step_loss(model, b, 3, cfg, losses.rerouting_loss)
    with torch.no_grad():
        new = train.retain_states(model, b.retain_tokens, attn=b.retain_mask)
        with lora_disabled(model):
            orig = train.retain_states(model, b.retain_tokens, attn=b.retain_mask)
    assert metrics["retain_loss"].item() == pytest.approx(term(new, orig, b.retain_mask).item(), rel=1e-5)


def test_retain_weight_scales_the_retain_coefficient_only():
    b = batch(pack=False)
    cfg = config(retain_norm="relative")
    _, one = train.step_loss(model_for(cfg), b, 3, cfg, losses.rerouting_loss)
    cfg3 = config(retain_norm="relative", retain_weight=3.0)
    _, three = train.step_loss(model_for(cfg3), b, 3, cfg3, losses.rerouting_loss)
    assert three["retain_coeff"] == pytest.approx(3 * one["retain_coeff"]) and three["cb_coeff"] == one["cb_coeff"]
    expected = one["cb_coeff"] * one["cb_loss"] + 3 * one["retain_coeff"] * one["retain_loss"]
    assert three["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_ablate_direction_reroutes_the_ablated_model_every_second_step():
    """--ablate-direction: on even steps the rerouting term reads the LoRA model's states with the direction
    ablated (refusal.ablate), against the plain frozen states; odd steps are the plain objective. With
    checkpointing the gradients are those without it: a checkpointed block would recompute its forward in
    the backward pass, after the ablation's hooks are gone."""
    cfg, b = config(), batch(pack=True)
    r_hat = refusal.unit(torch.randn(ARGS.dim, generator=torch.Generator().manual_seed(1)))
    model = model_for(cfg)
    for step, ablated in ((4, True), (3, False)):
        _, m = train.step_loss(model, b, step, cfg, losses.rerouting_loss, ablation=r_hat)
        with torch.no_grad():
            with lora_disabled(model):
                orig = train.cb_states(model, b.cb_tokens, cfg, lengths=b.cb_lengths)
            with refusal.ablate(model, r_hat) if ablated else contextlib.nullcontext():
                new = train.cb_states(model, b.cb_tokens, cfg, lengths=b.cb_lengths)
        expected = losses.rerouting_loss(new, orig, b.cb_loss_mask)
        assert m["cb_loss"].item() == pytest.approx(expected.item(), rel=1e-5), step
    assert not model.gradient_checkpointing  # restored after the ablated pass

    def gradients(grad_ckpt):
        cfg = config(grad_ckpt=grad_ckpt)
        model = model_for(cfg)
        model.train()
        train.step_gradients(model, b, 4, cfg, losses.rerouting_loss, torch.autocast("cpu", enabled=False), r_hat)
        assert model.gradient_checkpointing == grad_ckpt
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    plain, checkpointed = gradients(False), gradients(True)
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], **TOL, msg=name)


def test_ablate_mode_both_adds_the_ablated_rerouting_term_every_step():
    """--ablate-mode both: each step's rerouting term is the plain model's plus the ablated model's, both
    against the plain frozen states: the sum of what `alternate` computes on an odd and on an even step."""
    r_hat = refusal.unit(torch.randn(ARGS.dim, generator=torch.Generator().manual_seed(1)))
    b, alternate, both = batch(pack=True), config(ablate_direction="d"), config(ablate_direction="d", ablate_mode="both")
    plain = train.step_loss(model_for(alternate), b, 3, alternate, losses.rerouting_loss, ablation=r_hat)[1]
    ablated = train.step_loss(model_for(alternate), b, 4, alternate, losses.rerouting_loss, ablation=r_hat)[1]
    for step in (3, 4):
        _, m = train.step_loss(model_for(both), b, step, both, losses.rerouting_loss, ablation=r_hat)
        assert m["cb_loss"].item() == pytest.approx((plain["cb_loss"] + ablated["cb_loss"]).item(), rel=1e-5)
        assert m["cb_cos"].item() == pytest.approx(plain["cb_cos"].item(), rel=1e-5)  # the plain model's cosine
    with pytest.raises(ValueError, match="--ablate-mode both: expected --ablate-direction FILE beside it"):
        config(ablate_mode="both")


@pytest.mark.parametrize("pack", [False, True])
def test_ablate_retain_holds_the_ablated_models_retain_states_to_the_ablated_frozen_models(pack):
    """--ablate-retain: the retain term adds the ablated LoRA model's distance from the frozen model under
    the same ablation (the orthogonalized model), not from the plain frozen model."""
    r_hat = refusal.unit(torch.randn(ARGS.dim, generator=torch.Generator().manual_seed(1)))
    b, plain = batch(pack=pack), config(ablate_direction="d")
    held = config(ablate_direction="d", ablate_retain=True)
    model = model_for(held)
    _, without = train.step_loss(model, b, 3, plain, losses.rerouting_loss, ablation=r_hat)
    _, m = train.step_loss(model, b, 3, held, losses.rerouting_loss, ablation=r_hat)
    run = dict(lengths=b.retain_lengths)
    with torch.no_grad(), refusal.ablate(model, r_hat):
        new = train.retain_states(model, b.retain_tokens, **run)
        with lora_disabled(model):
            orig = train.retain_states(model, b.retain_tokens, **run)
    n_rows = b.size if pack else None
    ablated = losses.retain_loss_official(new, orig, b.retain_mask, pad_to=held.retain_pad_to, n_rows=n_rows)
    assert ablated.item() > 0
    assert m["retain_loss"].item() == pytest.approx((without["retain_loss"] + ablated).item(), rel=1e-5)
    assert m["cb_loss"].item() == pytest.approx(without["cb_loss"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="--ablate-retain: expected --ablate-direction FILE beside it"):
        config(ablate_retain=True)


def test_packed_rows_with_a_sliding_window_and_checkpointing():
    """Mistral's window, shorter than most rows, holds inside each packed row; checkpointing recomputes
    packed blocks exactly."""
    cfg, window = config(grad_ckpt=True), ARGS.__class__(**{**ARGS.__dict__, "sliding_window": 6})
    padded, packed = (gradients_and_metrics(cfg, batch(pack), window) for pack in (False, True))
    assert_same(padded, packed)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("retain_norm", ["official", "masked", "relative"])
def test_micro_batches_give_the_whole_batch_gradients(pack, retain_norm):
    whole = gradients_and_metrics(config(retain_norm=retain_norm, batch_size=5), batch(pack, 5))
    for size in (1, 2):  # 5 rows: five pieces of one; pieces of 2, 2 and 1
        pieces = gradients_and_metrics(config(retain_norm=retain_norm, batch_size=5, micro_batch=size), batch(pack, 5))
        assert_same(whole, pieces)


@pytest.mark.parametrize("retain_norm", ["official", "masked", "relative"])
def test_ablated_passes_in_checkpointed_micro_batches_give_the_whole_batch_gradients(retain_norm):
    """--ablate-mode both --ablate-retain: pieces of 2, 2 and 1 rows with checkpointing on give the whole
    batch's losses and gradients without it; the ablated passes must not be recomputed after their hooks
    are gone, and each ablated term is weighted by its piece's share."""
    r_hat = refusal.unit(torch.randn(ARGS.dim, generator=torch.Generator().manual_seed(1)))
    ablate = dict(retain_norm=retain_norm, batch_size=5, ablate_direction="d", ablate_mode="both", ablate_retain=True)
    whole = gradients_and_metrics(config(**ablate), batch(True, 5), ablation=r_hat)
    pieces = gradients_and_metrics(config(**ablate, micro_batch=2, grad_ckpt=True), batch(True, 5), ablation=r_hat)
    assert_same(whole, pieces)


def test_micro_batch_larger_than_the_batch_is_refused():
    with pytest.raises(ValueError, match=r"--micro-batch 8: expected at most --batch-size \(4\)"):
        config(micro_batch=8)
    with pytest.raises(ValueError, match="--micro-batch -1: expected 0 or more"):
        config(micro_batch=-1)


def test_compiled_blocks_do_not_recompile_for_new_row_lengths():
    """train.py --compile compiles each block with dynamic shapes; packed attention's loop over the rows runs
    outside the graph, so a batch with a new number of rows, or new lengths, reuses the graphs compiled before:
    in the reference pass (no gradient) and in the training pass (gradients through checkpointed blocks)."""
    torch._dynamo.reset()
    model = Transformer(ARGS, 2, lm_head=False)
    model.gradient_checkpointing = True
    for block in model.model.layers:
        block.compile(dynamic=True, backend="eager")  # dynamo's guards are the point, not inductor's code
    rng = random.Random(0)

    def passes(lengths):
        tokens = torch.randint(1, ARGS.vocab_size, (1, sum(lengths) + 3))
        with torch.no_grad():
            model(tokens, lengths=lengths)
        model(tokens, lengths=lengths, last_layer=2)[1][-1].square().mean().backward()

    passes([20, 25, 15])  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for count in (3, 5, 2, 4):
            passes([rng.randint(2, 30) for _ in range(count)])
