"""lora.py: the LoRA invariants (B = 0 is the base, disabled is the base, merged equals unmerged, base
weights untouched by training). Adapter files and the merged export are tests/test_hf.py's.

Tiny random Llama checkpoints written by transformers, everything in fp32.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
from hf import load_pretrained  # noqa: E402
from model import Transformer  # noqa: E402

transformers = pytest.importorskip("transformers")

N_LAYERS = 4


def write_tiny_llama(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=64, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # HF's init (std 0.02) leaves tiny activations; larger weights test more
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(b"not a real tokenizer, only copied\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 7), generator=g)


def load(base, **kw) -> Transformer:
    return load_pretrained(base, dtype=torch.float32, **kw).eval()


def randomize_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.copy_(0.5 * torch.randn(m.lora_B.weight.shape, generator=g))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


# ----------------------------------------------------------------------------------------------------
# Invariants


def test_b_zero_is_the_base_model(base, tokens):
    model = load(base)
    before = logits(model, tokens)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    assert len(lora.lora_modules(model)) == 7 * N_LAYERS
    assert torch.equal(logits(model, tokens), before)
    # base keys unchanged, LoRA keys are PEFT's without the "base_model.model." prefix
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_trainable_parameters_are_fp32_lora_only(base):
    model = load_pretrained(base, dtype=torch.bfloat16)
    lora.apply_lora(model, r=4, alpha=8, layers=[0, 2])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    out, _ = model(torch.zeros(1, 3, dtype=torch.long))
    assert out.dtype == torch.bfloat16
    A = model.model.layers[0].self_attn.k_proj.lora_A.weight
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound


def test_disabled_is_the_base_model(base, tokens):
    model = load(base)
    before = logits(model, tokens)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    randomize_lora(model)
    adapted = logits(model, tokens)
    assert (adapted - before).abs().max() > 1e-2
    with lora.lora_disabled(model):
        assert torch.equal(logits(model, tokens), before)
    assert torch.equal(logits(model, tokens), adapted)
    with pytest.raises(RuntimeError), lora.lora_disabled(model):
        raise RuntimeError("restored even on error")
    assert not any(m.disabled for m in lora.lora_modules(model).values())


def test_merged_equals_unmerged(base, tokens):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    randomize_lora(model)
    unmerged = logits(model, tokens)
    lora.merge_lora(model)
    assert not lora.lora_modules(model)
    assert set(model.state_dict()) == set(load(base).state_dict())
    torch.testing.assert_close(logits(model, tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_base_weights_bit_identical_after_an_optimizer_step(base, tokens):
    model = load(base).train()
    lora.apply_lora(model, r=4, alpha=8, dropout=0.05, layers=range(N_LAYERS))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        out, hiddens = model(tokens)
        (out.square().mean() + hiddens[2].square().mean()).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in trained.items())


def test_apply_lora_errors(base):
    model = load(base, n_layers=2, lm_head=False)
    with pytest.raises(ValueError, match="layer 2 asked for, but the model has 2 blocks loaded"):
        lora.apply_lora(model, layers=range(3))
    with pytest.raises(ValueError, match="unknown target module 'qkv_proj'"):
        lora.apply_lora(model, targets=("qkv_proj",), layers=[0])
    lora.apply_lora(model, layers=[0])
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(model, layers=[1])


def test_b_std_starts_b_as_noise_and_zero_keeps_the_default_draws():
    from torch import nn
    from lora import LoRALinear
    torch.manual_seed(0)
    plain = LoRALinear(nn.Linear(64, 32, bias=False), r=8, alpha=8, dropout=0.0)
    after_plain = torch.rand(1)
    torch.manual_seed(0)
    zero = LoRALinear(nn.Linear(64, 32, bias=False), r=8, alpha=8, dropout=0.0, b_std=0.0)
    assert torch.equal(zero.lora_A.weight, plain.lora_A.weight) and not zero.lora_B.weight.any()
    assert torch.equal(torch.rand(1), after_plain)  # no extra random draw: other runs keep their numerics
    noisy = LoRALinear(nn.Linear(64, 32, bias=False), r=8, alpha=8, dropout=0.0, b_std=0.05)
    assert 0.03 < noisy.lora_B.weight.std().item() < 0.07


def test_under_autocast_the_update_runs_in_bf16_on_fp32_master_weights():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    layer = lora.LoRALinear(base, r=8, alpha=16, dropout=0.0, b_std=0.1)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == layer.lora_A.weight.grad.dtype == torch.float32  # fp32 masters
    # the update as bf16 matmuls of the bf16 input and the rounded master weights
    A, B = layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16()
    expected = x @ base.weight.T + (layer.scale * ((x @ A.T) @ B.T)).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)
    with torch.no_grad():  # outside autocast: fp32 update, as before
        exact = x @ base.weight.T + (x.float() @ layer.delta().T).to(torch.bfloat16)  # delta: scale * B A
        torch.testing.assert_close(layer(x), exact, atol=2e-2, rtol=2e-2)


def projections(dropout: float, b_std: float = 0.1):
    """q, k, v LoRA layers of one input width, B off zero so that every update shows."""
    torch.manual_seed(0)
    return [lora.LoRALinear(torch.nn.Linear(32, out, bias=False), r=4, alpha=8, dropout=dropout, b_std=b_std)
            for out in (32, 16, 16)]


def test_projections_together_equal_one_at_a_time():
    layers, x = projections(dropout=0.0), torch.randn(2, 5, 32)
    together = lora.LoRALinear.project_together(x, layers)
    for y, layer in zip(together, layers, strict=True):
        torch.testing.assert_close(y, layer(x), atol=1e-6, rtol=1e-6)
    for layer in layers:
        layer.disabled = True
    for y, layer in zip(lora.LoRALinear.project_together(x, layers), layers, strict=True):
        torch.testing.assert_close(y, x @ layer.weight.T, atol=0, rtol=0)  # disabled: the base exactly
    mixed = [layers[0], torch.nn.Linear(32, 16, bias=False)]  # no LoRA on one: each on its own
    assert [y.shape[-1] for y in lora.LoRALinear.project_together(x, mixed)] == [32, 16]


def test_projections_together_share_one_dropout_mask():
    layers, x = projections(dropout=0.5), torch.randn(2, 5, 32)
    torch.manual_seed(7)
    together = lora.LoRALinear.project_together(x, layers)
    torch.manual_seed(7)
    dropped = layers[0].lora_dropout(x)  # the one draw the fused path makes
    for y, layer in zip(together, layers, strict=True):
        expected = x @ layer.weight.T + layer.scale * layer.lora_B(layer.lora_A(dropped))
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
