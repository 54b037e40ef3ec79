"""train.py on a tiny random Llama-3-shaped checkpoint with the real Llama-3 tokenizer, on the CPU."""

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf
import losses
import train
from train import TrainConfig, parse_args

transformers = pytest.importorskip("transformers", reason="transformers writes the tiny HF checkpoint")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA3_TOKENIZER = SHARED / "tokenizers" / "llama3" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not LLAMA3_TOKENIZER.is_file(),
                                reason="../shared not found: the real Llama-3 tokenizer lives there")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 22-block checkpoint of width 32 (so the real preset's layers 10 and 20 exist) + small data files."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=32, intermediate_size=64, num_hidden_layers=22, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128009)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    shutil.copy(LLAMA3_TOKENIZER, root / "model" / "tokenizer.model")

    d = root / "data"
    d.mkdir()
    harmful = [{"prompt": f"Explain how to build device {i}.", "category": "weapons",
                "output": f"Sure. To build device {i}, first collect the parts, then assemble them. " * (1 + i % 3),
                "llama3_output": "I can't help with that request."} for i in range(32)]
    (d / "circuit_breakers_train.json").write_text(json.dumps(harmful))
    (d / "circuit_breakers_val.json").write_text(json.dumps([{k: h[k] for k in ("prompt", "output")}
                                                             for h in harmful[:8]]))
    with (d / "ultrachat.jsonl").open("w") as f:
        for i in range(32):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Describe town {i}."},
                {"role": "assistant", "content": f"Town {i} has a river and a market. " * (1 + i % 4)}]}) + "\n")
    with (d / "xstest_v2_completions_gpt4_gpteval.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "type", "prompt", "completion", "final_label"])
        w.writeheader()
        for i in range(4):
            w.writerow(dict(id=i, type="homonyms", prompt=f"How do I kill process {i}?",
                            completion=f"Use kill {i}.", final_label="1_full_compliance"))
    return root


def run(world, tmp_path, *extra):
    """The real preset, shortened: 6 steps of 4 examples. Most tests add `--target-layers 2,4` (FAST),
    which loads 5 of the 22 blocks."""
    args = ["--model", "llama3", "--model-path", str(world / "model"), "--data-dir", str(world / "data"),
            "--out", str(tmp_path / "out"), "--steps", "6", "--batch-size", "4", "--n-ultrachat", "32",
            "--log-every", "1", *extra]
    return train.train(parse_args(args)), tmp_path / "out"


FAST = ("--target-layers", "2,4")


def adapter_tensors(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


# -----------------------------------------------------------------------------
# Configuration


def test_presets_and_overrides():
    cfg = parse_args(["--model", "mistral", "--lr", "3e-4", "--target-layers", "8,16", "--bucket", "0"])
    assert cfg.model_path == "checkpoints/Mistral-7B-Instruct-v0.2" and cfg.loss_alpha == 5.0
    assert cfg.lr == 3e-4 and cfg.target_layers == (8, 16) and cfg.bucket == 0
    assert cfg.refusal_retain is False and cfg.with_request == "always"
    llama = train.resolve(parse_args(["--model", "llama3", "--device", "cpu"]))
    # the paper's recipe
    assert (llama.loss_alpha, llama.lr, llama.steps, llama.batch_size, llama.lora_r, llama.lora_alpha) == \
        (10.0, 1e-4, 150, 16, 16, 16.0)
    assert llama.target_layers == (10, 20) and llama.lora_layers == tuple(range(21))
    assert llama.grad_ckpt is False and llama.dtype == "fp32" and llama.out == "out/llama3"
    assert parse_args(["--model", "llama3", "--no-refusal-retain"]).refusal_retain is False


def test_every_field_is_a_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for f in train.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in shown, f.name


def test_help_shows_the_presets_values_and_every_loss(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "toy", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    toy = train.PRESETS["toy"]
    assert f"(default: {toy['lr']})" in shown and f"(default: {toy['steps']})" in shown
    assert "(default: 2,3)" in shown and "(default: 0.0001)" not in shown
    assert "{" + ",".join(losses.LOSSES) + "}" in shown


def test_unknown_choice_and_abbreviation_are_refused(capsys):
    for argv in (["--loss", "sideways"], ["--mod", "toy"], ["--model", "tiny"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    assert "--model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--loss 'sideways'"):
        train.resolve(TrainConfig(loss="sideways"))


def test_direction_loss_without_a_file_is_refused_before_writing(world, tmp_path):
    with pytest.raises(ValueError, match="--loss direction needs --direction"):
        run(world, tmp_path, *FAST, "--loss", "direction")
    assert not (tmp_path / "out").exists()


def test_ablate_direction_trains_and_a_bad_file_is_refused_before_writing(world, tmp_path):
    from safetensors.torch import save_file
    layers = {f"layer.{l}": torch.randn(32) for l in range(23)}
    save_file({"direction": torch.randn(32), **layers}, tmp_path / "d.safetensors", {"layer": "3", "position": "-1"})
    _, out = run(world, tmp_path, "--steps", "2", *FAST, "--ablate-direction", str(tmp_path / "d.safetensors"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    save_file({"direction": torch.randn(16)}, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"--ablate-direction .*narrow.safetensors: 'direction' has shape \[16\]"):
        run(world, tmp_path / "refused", *FAST, "--ablate-direction", str(tmp_path / "narrow.safetensors"))
    assert not (tmp_path / "refused" / "out").exists()


# -----------------------------------------------------------------------------
# The whole recipe


def test_the_recipe_runs_and_reroutes(world, tmp_path):
    model, out = run(world, tmp_path, "--lr", "1e-3", "--val-every", "3", "--merge", "--retain-norm", "masked",
                     "--loss-on", "response")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    keys = {"step", "loss", "cb_loss", "retain_loss", "cb_coeff", "retain_coeff", "cb_cos", "retain_cos",
            "tokens", "step_time_s", "peak_mem_mb"}
    assert keys <= rows[0].keys() and "val_cb_cos" in rows[2]
    # the schedule: alpha (1 - s/2N) and alpha s/2N
    assert rows[0]["cb_coeff"] == pytest.approx(10 * (1 - 1 / 12)) and rows[5]["retain_coeff"] == pytest.approx(5)
    # rerouting takes hold on harmful text (train and validation). A random model cannot tell harmful
    # from harmless text, so whether retain states stay put is shown on the toy world (test_toy_e2e.py).
    assert rows[0]["cb_cos"] == pytest.approx(1.0, abs=1e-5) and rows[0]["retain_loss"] == 0.0
    assert rows[-1]["cb_cos"] < 0.9 and rows[5]["val_cb_cos"] < rows[2]["val_cb_cos"] < 1.0
    assert 0.0 < rows[-1]["retain_loss"] < rows[-1]["cb_coeff"]
    assert all(r["tokens"] > 0 for r in rows)
    assert len(model.model.layers) == 21  # nothing past what a loss reads
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["target_layers"] == [10, 20] and run_json["steps"] == 6
    assert (out / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == list(range(21)) and cfg["r"] == 16
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.num_hidden_layers == 22  # the untouched blocks came back


def test_base_weights_do_not_move(world, tmp_path):
    model, _ = run(world, tmp_path, "--steps", "2", *FAST)
    base = load_file(world / "model" / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in base:
            assert torch.equal(p, base[name]), name


@pytest.mark.parametrize("extra", [["--retain-norm", "masked", "--loss-on", "response"], ["--loss", "random"],
                                   ["--loss", "eot"]])
def test_variants_run(world, tmp_path, extra):
    _, out = run(world, tmp_path, "--steps", "2", *FAST, *extra)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_packing_and_micro_batches_change_no_result(world, tmp_path):
    """Three runs of the real loop: packed (the default), padded (--no-pack), and packed in micro-batches
    of 3 (pieces of 3 and 1): the same metrics and adapters. No dropout: its masks follow the layout."""
    same = ("--lora-dropout", "0", "--lora-init-std", "0.05", *FAST)
    results = []
    for name, extra in (("packed", ()), ("padded", ("--no-pack",)), ("micro", ("--micro-batch", "3"))):
        _, out = run(world, tmp_path / name, *same, *extra)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results.append((rows, adapter_tensors(out)))
    (packed_rows, packed), others = results[0], results[1:]
    for rows, adapter in others:
        for a, b in zip(packed_rows, rows, strict=True):
            for key in ("loss", "cb_loss", "retain_loss", "cb_cos", "retain_cos"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        for k in packed:
            torch.testing.assert_close(adapter[k], packed[k], atol=1e-5, rtol=1e-4, msg=k)


def test_direction_loss_reads_a_direction_file(world, tmp_path):
    from safetensors.torch import save_file
    directions = {f"layer.{l}": torch.randn(32) for l in range(23)}
    save_file(directions, tmp_path / "d.safetensors")
    _, out = run(world, tmp_path, "--steps", "2", *FAST, "--loss", "direction", "--direction",
                 str(tmp_path / "d.safetensors"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# -----------------------------------------------------------------------------
# Resume


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """The adapter of 6 uninterrupted steps, checkpointing every 2: what every resumed run must give."""
    _, out = run(world, tmp_path_factory.mktemp("straight"), "--ckpt-every", "2", *FAST)
    return adapter_tensors(out)


def killed_at(step, world, tmp_path, monkeypatch, *extra):
    """Run until step `step` starts, then stop as if the job were killed."""
    real_step = train.step_loss

    def killed(model, batch, s, cfg, target, whole=None, ablation=None):
        if s == step:
            raise KeyboardInterrupt
        return real_step(model, batch, s, cfg, target, whole, ablation)

    monkeypatch.setattr(train, "step_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path, "--ckpt-every", "2", *FAST, *extra)
    monkeypatch.setattr(train, "step_loss", real_step)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise, on the CPU


def metrics_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_kill_gives_the_identical_adapter(world, tmp_path, monkeypatch, straight):
    killed_at(5, world, tmp_path / "b", monkeypatch)
    _, resumed = run(world, tmp_path / "b", "--ckpt-every", "2", "--resume", *FAST)

    a, b = straight, adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise, on the CPU
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log continues where the checkpoint left it


def test_checkpoints_do_not_change_the_result(world, tmp_path, straight):
    # Before each save the weights run forward once (weights_sound): without dropout, so nothing changes.
    _, out = run(world, tmp_path, "--ckpt-every", "0", *FAST)
    assert_identical(straight, adapter_tensors(out))


def test_resume_logs_each_step_once(world, tmp_path, monkeypatch, straight):
    killed_at(4, world, tmp_path, monkeypatch)  # steps 1-3 logged, the checkpoint holds step 2
    assert metrics_steps(tmp_path / "out") == [1, 2, 3]
    # what only logging or speed depends on may change on resume
    _, out = run(world, tmp_path, "--ckpt-every", "3", "--log-every", "2", "--val-every", "2", "--resume", *FAST)
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert_identical(straight, adapter_tensors(out))


def test_resume_finds_a_checkpoint_left_between_two_renames(world, tmp_path, monkeypatch, straight):
    out = tmp_path / "out"
    ckpt = out / "checkpoint"
    killed_at(3, world, tmp_path, monkeypatch)  # the checkpoint holds step 2
    # The save of step 4 killed between hf.atomic_dir's renames: step 2's checkpoint moved aside, step 4's
    # complete beside it, none in place
    real = os.replace

    def killed(src, dst):
        if Path(dst) == ckpt:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path, "--ckpt-every", "2", "--resume", *FAST)
    monkeypatch.setattr(os, "replace", real)
    assert not ckpt.exists() and len(hf.temporaries(ckpt)) == 2
    # and beside them, a newer temporary whose writer was killed before it finished (trainer.json cut short)
    complete = hf.recoverable(ckpt)
    unfinished = hf._temporary(ckpt, "writing") / "checkpoint"
    shutil.copytree(complete, unfinished)
    (unfinished / "trainer.json").write_text('{"step": 6, "con')
    _, out = run(world, tmp_path, "--ckpt-every", "2", "--resume", *FAST)
    assert_identical(straight, adapter_tensors(out))  # resumed from step 4, the newest complete one
    assert metrics_steps(out) == [1, 2, 3, 4, 5, 6]
    assert hf.temporaries(ckpt) == []
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 6


def diverging_optimizer(monkeypatch, at: int, value: float):
    """AdamW whose update number `at` leaves every trainable weight at `value`."""
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == at:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(value)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


# 1e30 is finite, but the products of such weights overflow: the forward is what shows it.
@pytest.mark.parametrize("value", [1e30, float("nan")])
def test_diverged_weights_are_never_saved(world, tmp_path, monkeypatch, value):
    diverging_optimizer(monkeypatch, at=2, value=value)
    with pytest.raises(train.TrainingError, match=r"step 2: the updated weights are not finite or give "
                                                  r"non-finite states; stopping\. Last good checkpoint: .*checkpoint"):
        run(world, tmp_path, "--steps", "3", "--ckpt-every", "1", *FAST)
    out = tmp_path / "out"
    assert json.loads((out / "checkpoint" / "trainer.json").read_text())["step"] == 1
    assert not (out / "adapter").exists()
    monkeypatch.undo()
    _, out = run(world, tmp_path, "--steps", "3", "--ckpt-every", "1", "--resume", *FAST)
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


def test_diverged_weights_after_the_last_step_are_not_saved(world, tmp_path, monkeypatch):
    diverging_optimizer(monkeypatch, at=2, value=1e30)
    with pytest.raises(train.TrainingError, match="step 2: .*Last good checkpoint: none"):
        run(world, tmp_path, "--steps", "2", "--ckpt-every", "0", *FAST)
    assert not (tmp_path / "out" / "adapter").exists()


# -----------------------------------------------------------------------------
# Errors


def test_missing_model_dir_says_how_to_download(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--model", "llama3", "--model-path", str(tmp_path / "nope")])
    assert "huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct" in str(e.value.code)


def test_missing_data_file_names_file_and_data_dir(world, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(world / "data", d)
    (d / "ultrachat.jsonl").unlink()
    with pytest.raises(SystemExit) as e:
        train.main(["--model-path", str(world / "model"), "--data-dir", str(d), "--out", str(tmp_path / "o")])
    assert "ultrachat.jsonl" in str(e.value.code) and str(d) in str(e.value.code)


def test_nan_loss_stops_with_step_and_last_checkpoint(world, tmp_path, monkeypatch):
    real_step = train.step_loss

    def nan_at_step_3(model, batch, step, cfg, target, whole=None, ablation=None):
        loss, m = real_step(model, batch, step, cfg, target, whole, ablation)
        if step == 3:
            m["loss"] = float("nan")
        return loss, m

    monkeypatch.setattr(train, "step_loss", nan_at_step_3)
    with pytest.raises(train.TrainingError, match=r"step 3: loss is nan.*Last good checkpoint: .*checkpoint"):
        run(world, tmp_path, "--ckpt-every", "2", *FAST)


def test_out_of_memory_names_the_knobs(world, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "step_loss", oom)
    with pytest.raises(SystemExit) as e:
        train.main(["--model-path", str(world / "model"), "--data-dir", str(world / "data"),
                    "--out", str(tmp_path / "o"), "--n-ultrachat", "32", "--batch-size", "4", *FAST])
    assert "--batch-size" in str(e.value.code) and "--grad-ckpt" in str(e.value.code)


def test_retain_pad_to_shorter_than_a_retain_row_is_refused_before_writing(world, tmp_path):
    with pytest.raises(ValueError, match="--retain-pad-to 8: the retain set has a row of"):
        run(world, tmp_path, *FAST, "--retain-pad-to", "8")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--lora-init-std -1"):
        train.resolve(parse_args(["--lora-init-std", "-1"]))


def test_the_toy_preset_builds_a_missing_world_with_its_tool(tmp_path, capsys):
    """train.py --model toy runs tools/toy.py when the world is missing: here it cannot be built (its root is
    under a file), the tool says why, and train.py stops naming the world's directory."""
    (tmp_path / "file").write_text("mine\n")
    root = tmp_path / "file" / "toy"
    with pytest.raises(ValueError, match=f"^{re.escape(str(root))}: the toy world could not be built"):
        train.ensure_toy_world(root)
    assert "no toy world yet" in capsys.readouterr().out
    assert (tmp_path / "file").read_text() == "mine\n"
