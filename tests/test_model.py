"""model.py against Hugging Face transformers (a test-only reference) on tiny random checkpoints."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the reference for parity tests")

from data import left_padded  # noqa: E402
from hf import load_pretrained  # noqa: E402
from model import KVCache, ModelArgs, projection_shapes  # noqa: E402

TOL = 1e-4
T = 24  # longer than the Llama-3.1 original context and the Mistral window below

SHAPES = {
    # name: (config class, kwargs)
    "llama3": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)),
    "llama31": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                      sliding_window=5)),
    "llama2": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0)),
    "tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                 tie_word_embeddings=True)),
}


def to_hub_config(path):
    """Rewrite transformers 5's config.json in the hub's format (rope_theta / rope_scaling / torch_dtype
    at top level), which is what real checkpoints carry."""
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type") != "default":
        cfg["rope_scaling"] = params
    cfg["torch_dtype"] = cfg.pop("dtype")
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def make_hf(name, path, seed=0, **overrides):
    cls_name, kwargs = SHAPES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(
        vocab_size=101, hidden_size=64, intermediate_size=112, num_hidden_layers=3, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **{**kwargs, **overrides})
    config._attn_implementation = "eager"  # HF's own reference path, softmax in fp32
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(path, max_shard_size="40KB")  # several shards, so the index path runs
    to_hub_config(path)
    return hf


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, path)
    ours = load_pretrained(path, dtype=torch.float32)
    return request.param, hf, ours, path


def tokens(B=2, seed=1):
    return torch.randint(3, 101, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Parity


def test_checkpoint_is_sharded(pair):
    _, _, _, path = pair
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1


def test_logits_and_every_hidden_state_match_hf(pair):
    _, hf, ours, _ = pair
    x = tokens()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        logits, hiddens = ours(x)
    assert len(hiddens) == len(ref.hidden_states) == ours.args.n_layers + 1
    torch.testing.assert_close(logits, ref.logits, atol=TOL, rtol=0)
    for i, (h, r) in enumerate(zip(hiddens, ref.hidden_states)):
        if i == len(hiddens) - 1:
            h = ours.model.norm(h)  # HF normalises its last entry; ours stays the raw stream
        torch.testing.assert_close(h, r, atol=TOL, rtol=0, msg=f"hidden state {i}")


def test_input_embeds_equal_tokens(pair):
    _, _, ours, _ = pair
    x = tokens()
    with torch.no_grad():
        a, ha = ours(x)
        b, hb = ours(input_embeds=ours.embed(x))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_changes_nothing_at_real_tokens(pair, side):
    _, _, ours, _ = pair
    x = tokens(B=1)
    n = 7
    padded = torch.cat([torch.zeros(1, n, dtype=torch.long), x], 1) if side == "left" else \
        torch.cat([x, torch.zeros(1, n, dtype=torch.long)], 1)
    mask = torch.ones_like(padded)
    real = slice(n, None) if side == "left" else slice(0, T)
    mask[:, slice(0, n) if side == "left" else slice(T, None)] = 0
    with torch.no_grad():
        logits, hiddens = ours(x)
        plog, phid = ours(padded, mask)
    torch.testing.assert_close(plog[:, real], logits, atol=TOL, rtol=0)
    for h, p in zip(hiddens, phid):
        torch.testing.assert_close(p[:, real], h, atol=TOL, rtol=0)
    assert torch.isfinite(plog).all()  # padding queries are harmless, not NaN


def test_packed_rows_equal_each_row_run_alone(pair):
    """Rows packed one after another, with a tail of padding: each row's logits and states are those it
    has alone (positions restart, no row sees another; Mistral's window of 5 holds within rows of up to 9)."""
    _, _, ours, _ = pair
    lengths = (5, 9, 1, 7)
    rows = [torch.randint(3, 101, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat([*rows, torch.zeros(1, 4, dtype=torch.long)], 1)  # (1, 26): 22 real + 4 padding
    with torch.no_grad():
        logits, hiddens = ours(packed, lengths=lengths)
        start = 0
        for row in rows:
            alone_logits, alone = ours(row)
            real = slice(start, start + row.shape[1])
            torch.testing.assert_close(logits[:, real], alone_logits, atol=1e-5, rtol=0)
            for h, a in zip(hiddens, alone, strict=True):
                torch.testing.assert_close(h[:, real], a, atol=1e-5, rtol=0)
            start += row.shape[1]
    assert torch.isfinite(logits).all()  # the padding tail runs as a row of its own


def test_packed_rows_refuse_a_batch_a_mask_or_lengths_past_the_sequence(pair):
    _, _, ours, _ = pair
    with pytest.raises(ValueError, match="packed rows .* run as one sequence"):
        ours(tokens(B=2), lengths=(4, 4))
    with pytest.raises(ValueError, match="packed rows .* no attention_mask"):
        ours(tokens(B=1), torch.ones(1, T), lengths=(4, 4))
    with pytest.raises(ValueError, match=f"together at most T = {T}"):
        ours(tokens(B=1), lengths=(T, 1))


def test_greedy_generate_equals_hf(pair):
    _, hf, ours, _ = pair
    prompts = [[1, 5, 7, 9, 11, 13], [1, 40, 41]]
    new = ours.generate(prompts, max_new_tokens=12)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13], [0, 0, 0, 1, 40, 41]])
    mask = (torch.arange(6) >= torch.tensor([[0], [3]])).long()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert new == ref[:, 6:].tolist()


def test_prefill_runs_the_prompts_packed_and_fills_the_cache_as_left_padding_would(pair):
    """generate's first pass packs the prompts one after another (no padding to compute): each row's next-token
    logits, and its keys and values in the cache, right-aligned, are those of the left-padded batch's pass."""
    _, _, ours, _ = pair
    prompts = [[1, 5, 7, 9, 11, 13, 17, 19, 23], [1, 40, 41], [1, 8]]  # 9 > Mistral's window of 5
    lengths, T0, a = [len(p) for p in prompts], 9, ours.args

    def caches():
        return [KVCache(len(prompts), a.n_kv_heads, T0, a.head_dim, torch.float32, "cpu") for _ in ours.model.layers]
    padded, packed = caches(), caches()
    with torch.no_grad():
        logits, _ = ours(*left_padded(prompts, 0), cache=padded)  # (B, T0, V)
        first = ours._prefill([ours.embed(torch.tensor(p)) for p in prompts], lengths, packed)  # (B, V)
    torch.testing.assert_close(first, logits[:, -1], atol=1e-5, rtol=0)
    for by_padding, by_packing in zip(padded, packed, strict=True):
        assert by_packing.length == T0
        for row, n in enumerate(lengths):
            torch.testing.assert_close(by_packing.k[row, :, T0 - n:], by_padding.k[row, :, T0 - n:], atol=1e-5, rtol=0)
            torch.testing.assert_close(by_packing.v[row, :, T0 - n:], by_padding.v[row, :, T0 - n:], atol=1e-5, rtol=0)


def test_a_row_generates_the_same_alone_and_in_a_batch(pair):
    _, _, ours, _ = pair
    prompts = [[1, 5, 7, 9, 11, 13], [1, 40, 41], [1, 8, 9, 10]]
    together = ours.generate(prompts, max_new_tokens=10)
    assert together == [ours.generate([p], max_new_tokens=10)[0] for p in prompts]


def test_generate_stops_at_stop_ids(pair):
    _, _, ours, _ = pair
    prompt = [1, 5, 7, 9]
    free = ours.generate([prompt], max_new_tokens=10)[0]
    stopped = ours.generate([prompt], max_new_tokens=10, stop_ids=(free[3],))[0]
    assert stopped == free[:free.index(free[3])]


def test_rows_that_stop_are_dropped_and_the_rest_generate_as_alone(pair, monkeypatch):
    """Once a quarter of the batch has stopped, generate drops those rows from the batch and the caches; the
    rows left go on as they would alone."""
    _, _, ours, _ = pair
    prompts = [[1, 5, 7, 9], [1, 40, 41], [1, 8, 9, 10], [1, 2, 3], [1, 60, 61, 62, 63], [1, 30]]
    free = ours.generate(prompts, max_new_tokens=10)
    stop_ids = (free[0][1], free[1][1])  # rows 0 and 1 end by their second token, with any other row writing one
    alone = [ours.generate([p], max_new_tokens=10, stop_ids=stop_ids)[0] for p in prompts]
    rows_run = []
    run = ours._run
    monkeypatch.setattr(ours, "_run", lambda x, *a, **k: rows_run.append(x.shape[0]) or run(x, *a, **k))
    together = ours.generate(prompts, max_new_tokens=10, stop_ids=stop_ids)
    assert together == alone
    assert max(len(together[0]), len(together[1])) <= 1 and max(len(r) for r in together) == 10
    assert rows_run[0] == 1 and min(rows_run[1:]) < len(prompts)  # the packed prefill, then a shrunk batch


def test_sampling_is_seeded(pair):
    _, _, ours, _ = pair
    run = lambda: ours.generate([[1, 5, 7]], 8, temperature=1.0, top_p=0.9,  # noqa: E731
                                generator=torch.Generator().manual_seed(0))
    assert run() == run()


# -----------------------------------------------------------------------------
# Training features


def test_gradient_checkpointing_gives_the_same_gradients(pair):
    _, _, ours, _ = pair
    x = tokens()
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = flag
        _, hiddens = ours(x, last_layer=2)
        hiddens[-1].pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    ours.gradient_checkpointing = False
    ours.zero_grad()
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=0, msg=n)


def test_truncated_load_gives_the_same_first_states(pair):
    _, _, ours, path = pair
    short = load_pretrained(path, dtype=torch.float32, n_layers=2, lm_head=False)
    assert len(short.model.layers) == 2 and short.lm_head is None
    x = tokens()
    with torch.no_grad():
        _, full = ours(x)
        logits, part = short(x)
        none, stopped = ours(x, last_layer=2)
    assert logits is None and none is None
    assert len(part) == len(stopped) == 3
    for a, b, c in zip(full, part, stopped):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_bf16_load_casts_weights(pair):
    _, _, _, path = pair
    m = load_pretrained(path)  # bf16 by default
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32  # rotary frequencies stay fp32, as in HF
    logits, _ = m(tokens())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# -----------------------------------------------------------------------------
# Sizes and rotary frequencies


def test_projection_shapes_match_the_built_layers(pair):
    _, _, ours, _ = pair
    block = ours.model.layers[0]
    for name, shape in projection_shapes(ours.args).items():
        parent = block.self_attn if hasattr(block.self_attn, name) else block.mlp
        assert tuple(getattr(parent, name).weight.shape) == shape, name


def test_llama3_rope_scaling_keeps_29_divides_29_interpolates_6():
    args = ModelArgs(dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=1, vocab_size=1,
                     rope_theta=500000.0)
    from model import llama3_scale, rope_inv_freq
    inv = rope_inv_freq(args)
    scaled = llama3_scale(inv, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192})
    kept = (scaled == inv).sum().item()
    divided = torch.isclose(scaled, inv / 8, rtol=1e-6, atol=0).sum().item()
    assert (kept, divided, 64 - kept - divided) == (29, 29, 6)
