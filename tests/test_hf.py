"""hf.py: config.json, safetensors checkpoints, PEFT adapters and the merged export, against transformers
and peft themselves (test-only references), plus the atomic directory and file writers and load_model.

Tiny random checkpoints written by transformers (the writers are tests/test_model.py's and
tests/test_lora.py's), everything in fp32.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="transformers is the reference for the file formats")
peft = pytest.importorskip("peft", reason="peft is the reference for the adapter format")

import hf  # noqa: E402
import lora  # noqa: E402
from test_lora import N_LAYERS, load, logits, randomize_lora, write_tiny_llama  # noqa: E402
from test_model import TOL, make_hf  # noqa: E402
from test_model import tokens as parity_tokens  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (2, 7), generator=g)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# -----------------------------------------------------------------------------
# config.json


def test_transformers5_rope_parameters_read_like_hub_keys():
    hub = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, vocab_size=10, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**hub["rope_scaling"], "rope_theta": 500000.0}
    a, b = hf.model_args(hub), hf.model_args(v5)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0
    assert a.head_dim == 16 and a.n_kv_heads == 4


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(change, message):
    cfg = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, vocab_size=10)
    with pytest.raises(ValueError, match=message):
        hf.model_args({**cfg, **change})


# -----------------------------------------------------------------------------
# Loading: every error names the file and the tensor


@pytest.fixture
def ckpt(tmp_path):
    make_hf("llama3", tmp_path / "m")
    return tmp_path / "m"


def shard_of(path, name):
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def rewrite_shard(path, name, fn):
    file = shard_of(path, name)
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        hf.load_pretrained(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        hf.load_pretrained(ckpt)


def test_missing_shard(ckpt):
    file = shard_of(ckpt, "model.norm.weight")
    file.unlink()
    with pytest.raises(FileNotFoundError, match=f"lists shard {file.name}, which is missing"):
        hf.load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite_shard(ckpt, name, lambda t: t.pop(name))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(name)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"checkpoint lacks tensor '{name}'"):
        hf.load_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.norm.weight"
    rewrite_shard(ckpt, name, lambda t: t.update({"model.extra.weight": torch.zeros(3)}))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = shard_of(ckpt, name).name
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        hf.load_pretrained(ckpt)


def test_shape_mismatch_names_file_tensor_and_shapes(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_shard(ckpt, name, lambda t: t.update({name: torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=rf"{shard_of(ckpt, name).name}: tensor '{name}' has shape \[64, 64\], "
                                         r"expected \[32, 64\]"):
        hf.load_pretrained(ckpt)


def test_pickled_checkpoints_are_refused(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, vocab_size=10)))
    (path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        hf.load_pretrained(path)


# -----------------------------------------------------------------------------
# Writing directories


def test_atomic_dir_replaces_only_with_a_complete_directory(tmp_path):
    out = tmp_path / "out"
    with hf.atomic_dir(out) as tmp:
        assert tmp.parent.parent == tmp_path and tmp.parent.name.startswith(".out.")
        (tmp / "a").write_text("old")
    assert (out / "a").read_text() == "old" and out.stat().st_mode & 0o777 == 0o755
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with hf.atomic_dir(out) as tmp:
                (tmp / "a").write_text("new")
                raise error("killed mid-write")
        assert (out / "a").read_text() == "old"  # the old directory, intact
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and no temporary left behind
    with hf.atomic_dir(out) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"]  # replaced as a whole, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_removes_only_its_own_temporaries(tmp_path):
    """A user's directories named like a temporary (.out.mybackup/, .out.old/) are theirs: successful
    writes and a failed one leave them as they were."""
    out = tmp_path / "out"
    for name in (".out.mybackup", ".out.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    for _ in range(2):
        with hf.atomic_dir(out) as tmp:
            (tmp / "a").write_text("new")
    with pytest.raises(RuntimeError):
        with hf.atomic_dir(out) as tmp:
            raise RuntimeError("failed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.mybackup", ".out.old", "out"]
    assert all((tmp_path / name / "notes.txt").read_text() == "mine" for name in (".out.mybackup", ".out.old"))
    assert hf.temporaries(out) == []


def killed_between_renames(monkeypatch, out, write):
    """Run write(tmp) in hf.atomic_dir(out), killed as it renames the new directory to `out`: after the
    earlier `out` was moved aside, before the new one took its place."""
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        with hf.atomic_dir(out) as tmp:
            write(tmp)
    monkeypatch.setattr(os, "replace", real)


def test_atomic_dir_recovers_the_newest_complete_directory_after_a_kill_between_its_renames(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with hf.atomic_dir(out) as tmp:
        (tmp / "a").write_text("first")
    killed_between_renames(monkeypatch, out, lambda tmp: (tmp / "a").write_text("second"))
    assert not out.exists() and len(hf.temporaries(out)) == 2  # the first moved aside, the second complete
    with pytest.raises(RuntimeError):  # the next writer fails: what it found is left in place
        with hf.atomic_dir(out) as tmp:
            raise RuntimeError("failed mid-write")
    assert (out / "a").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out"]

    killed_between_renames(monkeypatch, out, lambda tmp: (tmp / "a").write_text("third"))
    assert (hf.recoverable(out) / "a").read_text() == "third" and not out.exists()  # reading moves nothing
    hf.recover(out)  # as train.py --resume does before reading the checkpoint
    assert (out / "a").read_text() == "third" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_replaces_only_with_a_complete_file(tmp_path):
    out = tmp_path / "new" / "results.json"
    with hf.atomic_file(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".results.json.")
        tmp.write_text("old")
    assert out.read_text() == "old" and out.stat().st_mode & 0o777 == 0o644
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with hf.atomic_file(out) as tmp:
                tmp.write_text("half")
                raise error("killed mid-write")
        assert out.read_text() == "old"  # the old file, intact
        assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # and no temporary left behind


# -----------------------------------------------------------------------------
# Saving


def test_save_pretrained_round_trips_through_hf(tmp_path, ckpt):
    ours = hf.load_pretrained(ckpt, dtype=torch.float32)
    out = tmp_path / "export"
    hf.save_pretrained(out, ours.state_dict(), ours.config, max_shard_size=40_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["torch_dtype"] == "float32" and "rope_parameters" not in cfg
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    for f in files:
        with safe_open(f, framework="pt") as s:
            assert s.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".export.*"))  # no temporary left behind
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = parity_tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, ours(x)[0], atol=TOL, rtol=0)


def test_equal_tensors_and_metadata_give_equal_files(tmp_path):
    """Given in any dict order; safetensors' own save_file writes the metadata in a random order."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16),
               "c": torch.arange(3), "layer.0": torch.zeros(2)}
    metadata = {"format": "pt", "layer": "3", "position": "-1", "model": "m", "note": "é", "seed": "7"}
    hf.save_safetensors(tensors, tmp_path / "one.safetensors", metadata)
    hf.save_safetensors(dict(reversed(tensors.items())), tmp_path / "two.safetensors", dict(reversed(metadata.items())))
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    with safe_open(tmp_path / "one.safetensors", framework="pt") as f:
        assert f.metadata() == metadata
    read = hf.read_safetensors(tmp_path / "one.safetensors")
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


def test_the_same_adapter_saved_twice_gives_equal_files(base, tmp_path):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    randomize_lora(model)
    files = set()
    for i in range(4):
        hf.save_adapter(model, tmp_path / f"adapter{i}")
        files.add((tmp_path / f"adapter{i}" / hf.WEIGHTS_FILE).read_bytes())
    assert len(files) == 1


# -----------------------------------------------------------------------------
# PEFT adapters


def test_adapter_key_takes_a_peft_name_apart():
    key = hf.adapter_key("base_model.model.model.layers.12.self_attn.k_proj.lora_B.weight")
    assert key == (12, "self_attn", "k_proj", "B") and key.module == "model.layers.12.self_attn.k_proj"
    for name in ("base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight",
                 "base_model.model.lm_head.lora_A.weight", "model.layers.1.mlp.up_proj.lora_A.weight"):
        assert hf.adapter_key(name) is None, name


def test_peft_loads_our_adapter_with_equal_logits(base, tokens, tmp_path):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.05, layers=range(3))  # not the last block
    randomize_lora(model)
    hf.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))

    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["layers_to_transform"] == [0, 1, 2]
    assert sorted(cfg["target_modules"]) == sorted(lora.TARGETS)
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        # PEFT's "format": "pt", and the base model's depth, which PEFT ignores (it loads the file below)
        assert f.metadata() == {"format": "pt", hf.BASE_LAYERS_KEY: str(model.args.n_layers)}
        keys = set(f.keys())
    assert len(keys) == 2 * 7 * 3
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in keys

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    torch.testing.assert_close(hf_logits(peft_model, tokens), logits(model, tokens), rtol=1e-4, atol=1e-4)


def test_we_load_an_adapter_written_by_peft(base, tokens, tmp_path):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                             layers_to_transform=[1, 3], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_model, config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    expected = hf_logits(peft_model.eval(), tokens)

    model = hf.load_adapter(load(base), tmp_path / "peft")
    assert len(lora.lora_modules(model)) == 3 * 2
    torch.testing.assert_close(logits(model, tokens), expected, rtol=1e-4, atol=1e-4)


def test_adapter_round_trip_is_exact_and_save_is_atomic(base, tokens, tmp_path):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    hf.save_adapter(model, tmp_path / "adapter")  # written twice: the second replaces the first
    randomize_lora(model)
    hf.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary directories left
    again = hf.load_adapter(load(base), tmp_path / "adapter")
    assert torch.equal(logits(again, tokens), logits(model, tokens))


def test_load_adapter_errors(base, tmp_path):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, layers=range(N_LAYERS))
    hf.save_adapter(model, tmp_path / "adapter")

    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        hf.load_adapter(load(base), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="LoRA on layer 3, but the model has 2 blocks loaded"):
        hf.load_adapter(load(base, n_layers=2, lm_head=False), tmp_path / "adapter")

    wider = write_tiny_llama(tmp_path / "wider", hidden_size=64)
    fresh = load(wider)
    with pytest.raises(ValueError, match=r"down_proj.lora_B.weight has shape \[32, 4\], the model expects \[64, 4\]"):
        hf.load_adapter(fresh, tmp_path / "adapter")
    assert not lora.lora_modules(fresh)  # a failed load leaves the model untouched

    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        hf.load_adapter(load(base), tmp_path / "adapter")
    cfg_path.write_text(json.dumps({**cfg, "target_modules": "q_proj|v_proj"}))
    with pytest.raises(ValueError, match="target_modules 'q_proj|v_proj' not supported"):
        hf.load_adapter(load(base), tmp_path / "adapter")
    cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="has unexpected base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"):
        hf.load_adapter(load(base), tmp_path / "adapter")
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing"):
        hf.load_adapter(load(base), tmp_path / "adapter")


# -----------------------------------------------------------------------------
# Merged export

def test_export_copies_the_tokenizer_files(tmp_path):
    # chat_template.jinja too: it tells Llama-3.1/3.2 from Llama-3, and transformers 5 keeps the template there.
    src = tmp_path / "src"
    for rel in hf.TOKENIZER_FILES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    hf.save_pretrained(tmp_path / "out", {"w": torch.zeros(2)}, {"rope_theta": 1.0}, tokenizer_from=src)
    assert "chat_template.jinja" in hf.TOKENIZER_FILES
    assert all((tmp_path / "out" / rel).read_text() == rel for rel in hf.TOKENIZER_FILES)


def test_transformers_loads_our_merged_export_with_equal_logits(base, tokens, tmp_path):
    # as in training: only the first blocks loaded, no head; LoRA on all of them
    trained = load(base, n_layers=3, lm_head=False)
    lora.apply_lora(trained, r=4, alpha=8, dropout=0.05, layers=range(3))
    randomize_lora(trained)
    hf.export_merged(base, trained, tmp_path / "merged", max_shard_size=20_000)
    assert lora.lora_modules(trained)  # the trained model is left as it was

    out = tmp_path / "merged"
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == N_LAYERS and config["rope_theta"] == 500000.0
    assert config["torch_dtype"] == "float32" and "rope_parameters" not in config
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}

    # reference: our full model with the same LoRA, unmerged
    hf.save_adapter(trained, tmp_path / "adapter")
    full = hf.load_adapter(load(base), tmp_path / "adapter")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    torch.testing.assert_close(hf_logits(hf_model.eval(), tokens), logits(full, tokens), rtol=1e-4, atol=1e-4)

    # the later block, final norm and head are the base's, bit for bit
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged_sd, base_sd = hf_model.state_dict(), hf_base.state_dict()
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight",
                 "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(merged_sd[name], base_sd[name]), name
    assert not torch.equal(merged_sd["model.layers.0.mlp.up_proj.weight"], base_sd["model.layers.0.mlp.up_proj.weight"])

    # exporting from the adapter directory gives the same tensors
    hf.export_merged(base, tmp_path / "adapter", tmp_path / "merged2", max_shard_size=20_000)
    other = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged2", dtype=torch.float32)
    for name, t in other.state_dict().items():
        torch.testing.assert_close(t, merged_sd[name], rtol=1e-6, atol=1e-6)


def test_export_merged_errors(base, tmp_path):
    wider = write_tiny_llama(tmp_path / "wider", hidden_size=64)
    model = load(wider, n_layers=1, lm_head=False)
    lora.apply_lora(model, r=4, alpha=8, layers=[0])
    with pytest.raises(ValueError, match=r"down_proj.weight' has shape \[32, 48\], the adapter's update has \[64, 48\]"):
        hf.export_merged(base, model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with pytest.raises(ValueError, match="no LoRA layers"):
        hf.export_merged(base, load(base), tmp_path / "merged")
    save_file({"x": torch.zeros(1)}, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        hf.export_merged(base, tmp_path, tmp_path / "merged")


# -----------------------------------------------------------------------------
# load_model and the dtype names


def test_load_model_merges_or_keeps_the_adapter(base, tokens, tmp_path):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, dropout=0.0, layers=range(N_LAYERS))
    randomize_lora(model)
    hf.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    merged = hf.load_model(base, dtype=torch.float32, device="cpu", adapter=tmp_path / "adapter").eval()
    assert not lora.lora_modules(merged)
    torch.testing.assert_close(logits(merged, tokens), logits(model, tokens), rtol=1e-5, atol=1e-5)
    kept = hf.load_model(base, dtype=torch.float32, device="cpu", adapter=tmp_path / "adapter", merge=False)
    assert len(lora.lora_modules(kept)) == 7 * N_LAYERS
    assert torch.equal(logits(kept.eval(), tokens), logits(model, tokens))


def test_load_model_checks_the_adapter_before_reading_weights(base, tmp_path, monkeypatch):
    model = load(base)
    lora.apply_lora(model, r=4, alpha=8, layers=range(N_LAYERS))
    hf.save_adapter(model, tmp_path / "named", base_model_name_or_path=str(base))
    hf.save_adapter(model, tmp_path / "unnamed")
    wider = write_tiny_llama(tmp_path / "wider", hidden_size=64)
    monkeypatch.setattr(hf, "load_pretrained", lambda *a, **kw: pytest.fail("weights read before the check"))
    with pytest.raises(ValueError, match=re.escape(f"made for base model '{base}'")):
        hf.load_model(wider, dtype=torch.float32, device="cpu", adapter=tmp_path / "named")
    with pytest.raises(ValueError, match=r"down_proj.lora_B.weight has shape \[32, 4\], but .* needs \[64, 4\]"):
        hf.load_model(wider, dtype=torch.float32, device="cpu", adapter=tmp_path / "unnamed")


def test_dtype_names():
    assert hf.pick_dtype("auto", "cuda:0") == torch.bfloat16 and hf.pick_dtype("auto", "cpu") == torch.float32
    assert {name: hf.pick_dtype(name, "cpu") for name in hf.DTYPES} == hf.DTYPES
    with pytest.raises(ValueError, match="expected auto or one of"):
        hf.pick_dtype("float32", "cpu")
