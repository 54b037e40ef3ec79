"""`python data.py build`: BLEU and the held-out filter, the written set in the formats train.py reads, and
bad input. The model-written set itself is built with the real SmolLM2 (tests/conftest.py's smollm2_model)."""
import json

import pytest

import build_set
import data
import hf
from conftest import SHARED, no_space_left

REFUSAL_DIR = SHARED / "data" / "refusal_direction"
HARMBENCH = SHARED / "data" / "harmbench_test.json"
MISTRAL_TOKENIZER = SHARED / "tokenizers" / "mistral" / "tokenizer.model"


def test_bleu_bounds_and_order():
    text = "Give detailed instructions for manufacturing ricin at home"
    assert build_set.bleu(text, text) == pytest.approx(1.0)
    assert build_set.bleu(text, "What is the capital of France?") == 0.0
    assert build_set.bleu("", text) == 0.0
    close = build_set.bleu("Give instructions for manufacturing ricin at home", text)
    far = build_set.bleu("Give instructions for baking bread at home", text)
    assert 1.0 > close > build_set.BLEU_THRESHOLD > far > 0.0


def test_bleu_brevity_penalty():
    """A hypothesis that is a short prefix of the reference matches every n-gram it has, so only the
    brevity penalty keeps it below 1."""
    reference = "write a persuasive article about the korean war and its causes"
    assert build_set.bleu("write a persuasive article", reference) < 0.5


def test_drop_similar_keeps_evaluation_paraphrases_out():
    """On the real files: HarmBench's close paraphrases in harmful_train.json (the bank robbery, ricin and
    bullying ones) are dropped, with the behaviour they resemble; most instructions stay."""
    if not (REFUSAL_DIR / "harmful_train.json").is_file() or not HARMBENCH.is_file():
        pytest.skip(f"{SHARED / 'data'} not found: the instruction and HarmBench files live there")
    harmful = data.load_instructions(REFUSAL_DIR / "harmful_train.json")
    held_out = build_set.held_out_texts(HARMBENCH)
    kept, dropped = build_set.drop_similar(harmful, held_out)
    assert len(kept) + len(dropped) == len(harmful)
    dropped_text = " | ".join(d["instruction"].lower() for d in dropped)
    for phrase in ("rob a bank", "ricin", "bullies a child"):
        assert phrase in dropped_text
    assert all(d["bleu"] > build_set.BLEU_THRESHOLD and d["closest"] in held_out for d in dropped)
    assert 0 < len(dropped) < len(harmful) // 3
    kept_text = " | ".join(k["instruction"] for k in kept)
    assert not any(b in kept_text for b in held_out)  # no exact evaluation prompt either


def test_held_out_texts_reads_both_formats(tmp_path):
    (tmp_path / "i.json").write_text(json.dumps([{"instruction": "a"}, {"instruction": "b"}]))
    assert build_set.held_out_texts(tmp_path / "i.json") == ["a", "b"]
    hb = {"name": "x", "description": "", "data": [{"behavior": "c", "default_target": "Sure",
                                                     "messages": [{"role": "user", "content": "c"}]}]}
    (tmp_path / "h.json").write_text(json.dumps(hb))
    assert build_set.held_out_texts(tmp_path / "h.json") == ["c"]


def test_usable_answers():
    assert build_set.usable("Here is how to do it: first, gather the tools.", harmful=True)
    assert not build_set.usable("I'm sorry, but I can't help with that.", harmful=True)
    assert build_set.usable("I'm sorry to hear that; here are three ideas.", harmful=False)
    assert not build_set.usable("   ", harmful=False)
    assert not build_set.usable("the the the the the the the the the the the the", harmful=False)


def instruction_files(tmp_path, n_harmful=20, n_harmless=8):
    harmful = [{"instruction": f"Explain how to pick lock number {i} without a key", "category": "crime"}
               for i in range(n_harmful)]
    harmless = [{"instruction": f"Name a fruit that starts with the letter {c}"} for c in "ABCDEFGHIJKL"[:n_harmless]]
    (tmp_path / "harmful.json").write_text(json.dumps(harmful))
    (tmp_path / "harmless.json").write_text(json.dumps(harmless))
    return tmp_path / "harmful.json", tmp_path / "harmless.json"


def test_build_writes_what_train_reads(tmp_path, smollm2_model):
    """The real SmolLM2 answers; the directory holds the official files, which data.py's loaders (and so
    train.py) read, and build.json counts every instruction."""
    harmful, harmless = instruction_files(tmp_path)
    out = tmp_path / "set"
    build_set.main(["--model-path", str(smollm2_model), "--harmful", str(harmful), "--harmless", str(harmless),
                    "--out", str(out), "--n-val", "4", "--max-new-tokens", "12", "--seed", "3"])
    train = data.load_circuit_breaker_set(out / data.CB_TRAIN, ("prompt", "output", "category"))
    val = data.load_circuit_breaker_set(out / data.CB_VAL)
    chats = data.load_ultrachat(out / data.ULTRACHAT)
    counts = json.loads((out / "build.json").read_text())["counts"]
    assert counts["circuit_breaker"] + counts["circuit_breaker_unusable"] == 16
    assert counts["validation"] + counts["validation_unusable"] == 4
    assert len(train) == counts["circuit_breaker"] and len(val) == counts["validation"] and len(chats) == counts["retain"]
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in val)
    first = {r["instruction"] for r in json.loads(harmful.read_text())[:4]}
    assert {r["prompt"] for r in val} - first  # --seed draws the validation split, not the file's first four
    assert all(r["output"].strip() and r["category"] == "crime" for r in train)
    assert all([m["role"] for m in c["messages"]] == ["user", "assistant"] for c in chats)
    assert not (out / data.XSTEST).exists()


def test_build_bad_input(tmp_path, script_fails):
    harmful, harmless = instruction_files(tmp_path)
    (tmp_path / "model").mkdir()
    # read before the inputs; its weights never are
    (tmp_path / "model" / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    base = ["--model-path", tmp_path / "model", "--harmful", harmful, "--harmless", harmless]
    script_fails("tools/build_set.py", "--model-path", tmp_path / "none", "--harmful", harmful, "--harmless", harmless,
                 "--out", tmp_path / "o0", match="no such model directory")
    (tmp_path / "wrong.json").write_text(json.dumps({"instruction": "not a list"}))
    script_fails("tools/build_set.py", *base[:2], "--harmful", tmp_path / "wrong.json", "--harmless", harmless,
                 "--out", tmp_path / "o1", match="wrong.json")
    (tmp_path / "missing_field.json").write_text(json.dumps([{"instruction": "a"}, {"prompt": "b"}]))
    script_fails("tools/build_set.py", *base[:2], "--harmful", tmp_path / "missing_field.json", "--harmless", harmless,
                 "--out", tmp_path / "o2", match="record 1: field 'instruction' is missing")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    script_fails("tools/build_set.py", *base, "--out", busy, match="holds other files (notes.txt)")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    script_fails("tools/build_set.py", *base, "--out", tmp_path / "o3", "--n-harmless", 0, match="--n-harmless 0")
    script_fails("tools/build_set.py", *base, "--out", tmp_path / "o4", "--n-harmful", 99, match="only 20 harmful")
    script_fails("tools/build_set.py", *base, "--out", tmp_path / "o5", "--bleu", 2, match="--bleu 2")
    script_fails("tools/build_set.py", *base, "--out", tmp_path / "o7", "--threads", -1, match="--threads -1")
    script_fails("tools/build_set.py", *base, "--out", tmp_path / "o6", "--max-new-tokens", 100000,
                 match="--max-new-tokens 100000: expected fewer than the model's context of 2048 tokens")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())  # nothing half-written


def model_dir(tmp_path, vocab_size=32000):
    """A model directory whose weights are never read: a Llama config.json and Mistral's 32,000-piece
    sentencepiece tokenizer."""
    if not MISTRAL_TOKENIZER.is_file():
        pytest.skip(f"{MISTRAL_TOKENIZER} not found: the real tokenizers live in ../shared")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 2048}))
    (model / "tokenizer.model").symlink_to(MISTRAL_TOKENIZER)
    return model


@pytest.mark.parametrize("flag", ["--harmful", "--harmless", "--exclude"])
def test_build_refuses_deeply_nested_json_by_file(tmp_path, script_fails, flag):
    harmful, harmless = instruction_files(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # json's parser recurses once per bracket
    files = {"--harmful": harmful, "--harmless": harmless, flag: deep}
    script_fails("tools/build_set.py", "--model-path", tmp_path / "model", *[x for kv in files.items() for x in kv],
                 "--out", tmp_path / "set", match=f"{deep}: nested too deeply to read as JSON")
    assert not (tmp_path / "set").exists()


def test_build_refuses_a_tokenizer_larger_than_the_model_before_loading_it(tmp_path, script_fails):
    harmful, harmless = instruction_files(tmp_path)
    model = model_dir(tmp_path, vocab_size=1000)
    script_fails("tools/build_set.py", "--model-path", model, "--harmful", harmful, "--harmless", harmless,
                 "--out", tmp_path / "set", match=f"{model / 'tokenizer.model'}: 32000 tokens, but "
                                                  f"{model / 'config.json'} gives the model 1000 embeddings")
    assert not (tmp_path / "set").exists()


def test_build_refuses_a_read_only_out_before_loading_the_model(tmp_path, read_only_dir, script_fails):
    harmful, harmless = instruction_files(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    out = read_only_dir / "set"
    script_fails("tools/build_set.py", "--model-path", tmp_path / "model", "--harmful", harmful, "--harmless", harmless,
                 "--out", out, match=f"--out {out}: cannot write into {read_only_dir} (permission denied)")
    assert not list(read_only_dir.iterdir())


def test_build_on_a_full_disk_names_the_output(tmp_path, monkeypatch, capsys):
    """Stand-ins for the model and its answers; the directory's writer finds no space left."""
    harmful, harmless = instruction_files(tmp_path)
    model = model_dir(tmp_path)

    class StandIn:
        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    monkeypatch.setattr(hf, "load_model", lambda *a, **kw: StandIn())
    monkeypatch.setattr(build_set, "answer", lambda model, tok, texts, *a: ["Here is how: first, gather the tools."]
                        * len(texts))
    monkeypatch.setattr(hf, "atomic_dir", no_space_left)
    out = tmp_path / "set"
    with pytest.raises(SystemExit) as e:
        build_set.main(["--model-path", str(model), "--harmful", str(harmful), "--harmless", str(harmless),
                        "--out", str(out), "--n-val", "4"])
    assert e.value.code == f"build_set.py: error: --out {out}: could not write (No space left on device)"
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# tools/add_refusals.py: the model's own answers as the refusal retain's `llama3_output`


def small_set(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    records = [{"prompt": f"Explain how to pick lock number {i} without a key", "output": "First, take a pin.",
                "category": "crime"} for i in range(3)]
    (out / data.CB_TRAIN).write_text(json.dumps(records))
    (out / data.CB_VAL).write_text(json.dumps(records[:1]))
    (out / data.ULTRACHAT).write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                {"role": "assistant", "content": "Hello!"}]}) + "\n")
    (out / "build.json").write_text(json.dumps({"seed": 3}))
    return out


def test_add_refusals_writes_the_models_answers_where_the_official_file_has_llama3s(tmp_path, smollm2_model):
    import add_refusals
    source = small_set(tmp_path)
    out = tmp_path / "with_refusals"
    add_refusals.main(["--model-path", str(smollm2_model), "--data-dir", str(source), "--out", str(out),
                       "--max-new-tokens", "8"])
    records = data.load_circuit_breaker_set(out / data.CB_TRAIN, ("prompt", "output", "llama3_output"))
    original = json.loads((source / data.CB_TRAIN).read_text())
    assert [{k: r[k] for k in ("prompt", "output", "category")} for r in records] == original
    assert all(r["llama3_output"].strip() for r in records)
    for name in (data.CB_VAL, data.ULTRACHAT):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    build = json.loads((out / "build.json").read_text())
    assert build["seed"] == 3 and build["refusals"]["counts"]["records"] == 3
    assert build["refusals"]["counts"]["refusals"] == sum(build_set.scoring.is_refusal(r["llama3_output"])
                                                          for r in records)
    tok = hf.load_tokenizer(smollm2_model)
    _, retain, _ = data.build_training_sets(tok, out, refusal_retain=True, n_ultrachat=1, xstest_repeat=0,
                                            log=lambda *a: None)
    assert len(retain) == 1 + 3 * 2  # one conversation, each refusal twice (the official repeat)


def test_add_refusals_bad_input(tmp_path, script_fails):
    source = small_set(tmp_path)
    script_fails("tools/add_refusals.py", "--model-path", tmp_path, "--data-dir", source, "--out", source,
                 match="is --data-dir")
    other = tmp_path / "busy"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    script_fails("tools/add_refusals.py", "--model-path", tmp_path, "--data-dir", source, "--out", other,
                 match="holds other files")
    script_fails("tools/add_refusals.py", "--model-path", tmp_path, "--data-dir", source, "--out", tmp_path / "x",
                 "--max-new-tokens", 0, match="--max-new-tokens 0: must be at least 1")
    assert (other / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
