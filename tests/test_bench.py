"""bench.py in its smallest configuration: it runs and prints its record; flops.py counts FLOPs as torch does."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import flops
import hf
import losses
from conftest import no_space_left

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """bench.py on the tiny shape and a CPU, as a user runs it."""
    # Passive OpenMP waiting: on a shared CPU, spinning threads slow elementwise kernels tenfold.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return subprocess.run([sys.executable, "tools/bench.py", "--shape", "tiny", "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_smoke_prints_and_writes_its_record(tmp_path):
    out = tmp_path / "record.json"
    done = run_bench("--steps", "2", "--bucket", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert json.loads(out.read_text()) == record
    for mode in ("ours", "reference"):
        r = record[mode]
        assert len(r["step_s"]) == 2 and r["step_s_median"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_mem_gib"] > 0 and r["tflops_per_step"] > 0 and r["mfu"] is None  # no peak known on a CPU
    # The same examples in both modes; the official layout pads them to 512 + 512 and 1024.
    assert record["ours"]["tokens_real"] == record["reference"]["tokens_real"]
    assert record["reference"]["tokens_padded"] == 2 * 2 * (1024 + 1024)
    assert record["ours"]["tokens_padded"] < record["reference"]["tokens_padded"]
    assert record["speedup"] > 0 and record["flops_ratio"] > 1


def test_profile_lists_the_top_operators_instead_of_timing():
    done = run_bench("--steps", "2", "--profile")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    p = record["profile"]
    assert p["steps"] == 2 and p["wall_s"] > 0 and p["device_busy"] is None  # busy share: GPU only
    assert 0 < len(p["top"]) <= 15 and any(r["name"] == "aten::mm" for r in p["top"])
    assert p["top"] == sorted(p["top"], key=lambda r: r["self_ms"], reverse=True)
    assert "speedup" not in record and record["flops_ratio"] > 1  # nothing timed; FLOPs still counted


def test_hf_peft_mode_times_the_official_step_on_the_same_examples():
    pytest.importorskip("peft")
    done = run_bench("--steps", "2", "--bucket", "2", "--hf")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert len(record["hf_peft"]["step_s"]) == 2 and record["speedup_hf_peft"] > 0
    assert record["hf_peft"]["tokens_real"] == record["ours"]["tokens_real"]
    assert record["hf_peft"]["tokens_padded"] == record["reference"]["tokens_padded"]  # the official layout


def test_official_step_on_peft_starts_at_the_rerouting_coefficient():
    """PEFT starts B at zero, so the LoRA states are the frozen ones: every masked cosine is 1 and every
    retain distance 0, and the official loss is exactly the rerouting coefficient."""
    pytest.importorskip("peft")
    import hf_reference
    cfg, args = bench.config_from_args(bench.parse_args(["--shape", "tiny", "--device", "cpu"])), bench.SHAPES["tiny"]
    cb, retain = bench.synthetic_examples(cfg, 2, args.vocab_size, seed=0)
    batch = next(data.batches(cb, retain, 2, pad_id=0, pad_to=data.OFFICIAL_LENGTHS))
    V = args.vocab_size
    batch = batch._replace(cb_tokens=batch.cb_tokens % V, retain_tokens=batch.retain_tokens % V)
    model = hf_reference.hf_model(args, dataclasses.replace(cfg, lora_dropout=0.0))
    loss = hf_reference.official_loss(model, batch, 1, cfg)
    cb_coeff, _ = losses.coefficients(1, cfg.steps, cfg.loss_alpha)
    assert loss.item() == pytest.approx(cb_coeff, rel=1e-5)


def test_steps_must_cover_whole_bucket_windows():
    done = run_bench("--steps", "3", "--bucket", "2")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == "bench.py: error: --steps 3 is not a multiple of --bucket 2: both modes must time " \
                          "whole bucket windows to see the same examples\n"


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_unwritable_out_is_refused_before_anything_runs(tmp_path, where):
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "directory" else tmp_path / "file" / "record.json"
    done = run_bench("--steps", "2", "--bucket", "2", "--flops-only", "--out", str(out))
    assert done.returncode != 0 and done.stdout == ""  # no record: it stopped before counting anything
    assert done.stderr.startswith(f"bench.py: error: --out {out}: ") and "Traceback" not in done.stderr


def test_read_only_out_is_refused_before_anything_runs(read_only_dir):
    out = read_only_dir / "record.json"
    done = run_bench("--steps", "2", "--bucket", "2", "--flops-only", "--out", str(out))
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == f"bench.py: error: --out {out}: cannot write into {read_only_dir} (permission denied)\n"


def test_full_disk_names_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hf, "atomic_file", no_space_left)
    out = tmp_path / "record.json"
    with pytest.raises(SystemExit) as e:
        bench.main(["--shape", "tiny", "--device", "cpu", "--steps", "2", "--bucket", "2", "--flops-only",
                    "--out", str(out)])
    assert e.value.code == f"bench.py: error: --out {out}: could not write (No space left on device)"
    assert not out.exists()


def test_missing_data_dir_is_named(tmp_path):
    done = run_bench("--steps", "2", "--bucket", "2", "--flops-only", "--data-dir", str(tmp_path / "none"))
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr == f"bench.py: error: --data-dir {tmp_path / 'none'}: no such directory\n"


def test_out_is_replaced_whole_and_survives_a_failed_run(tmp_path):
    out = tmp_path / "record.json"
    out.write_text("earlier record\n")
    assert run_bench("--steps", "3", "--bucket", "2", "--out", str(out)).returncode != 0
    assert out.read_text() == "earlier record\n"
    done = run_bench("--steps", "2", "--bucket", "2", "--flops-only", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads(done.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left beside it


@pytest.mark.parametrize("official,ckpt,packed", [(False, False, False), (True, True, False), (False, True, True)])
def test_flop_count_matches_torch_flop_counter(official, ckpt, packed):
    """Every matmul of a real step (torch counts aten.mm; CPU attention kernels it does not count) against
    the formula without its attention part. The formula ignores that block 0's q/k/v projections need no
    input gradient and that checkpointing does not recompute a block's last matmul: within 3% here,
    far less at 8B."""
    flags = ["--shape", "tiny", "--device", "cpu", "--batch-size", "2", "--grad-ckpt" if ckpt else "--no-grad-ckpt"]
    cfg, args = bench.config_from_args(bench.parse_args(flags)), bench.SHAPES["tiny"]
    torch.manual_seed(0)
    if packed:  # two rows of each set one after another, then a padding tail
        cb, retain = torch.randint(args.vocab_size, (1, 96)), torch.randint(args.vocab_size, (1, 64))
        batch = data.Batch(cb, torch.ones_like(cb), retain, torch.ones_like(retain), torch.ones_like(cb),
                           cb_lengths=(40, 48), retain_lengths=(30, 32))
    else:
        cb, retain = torch.randint(args.vocab_size, (2, 48)), torch.randint(args.vocab_size, (2, 32))
        batch = data.Batch(cb, torch.ones_like(cb), retain, torch.ones_like(retain), torch.ones_like(cb))
    runner = bench.Runner(bench.Mode("ours", cfg, official, autocast=False, batches=[batch]), args)
    with FlopCounterMode(display=False) as counter:
        runner.step(1, batch)
    parts = flops.step_flops(args, cfg, batch, official)
    assert (parts["head"] > 0) == official
    # attention is counted row by row: packed rows and their tail, or the padded rows
    assert flops.rows_run(batch.cb_tokens, batch.cb_lengths) == ([40, 48, 8] if packed else [48, 48])
    assert flops.rows_run(batch.retain_tokens, batch.retain_lengths) == ([30, 32, 2] if packed else [32, 32])
    assert counter.get_total_flops() == pytest.approx(parts["linear"] + parts["lora"] + parts["head"], rel=0.03)


def test_generation_mode_is_token_for_token_transformers(tmp_path, smollm2_model):
    """bench.py --generate on the real SmolLM2 at tiny sizes: both sides' outputs equal, each side timed."""
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "Name three colours."}, {"instruction": "What is 2 + 2?"}]))
    record = bench.bench(bench.parse_args(["--generate", "--model-path", str(smollm2_model), "--instructions",
                                           str(instructions), "--gen-batch-sizes", "2", "1", "--max-new-tokens", "4",
                                           "--repeats", "1", "--device", "cpu"]), log=lambda line: None)
    assert [r["batch"] for r in record["results"]] == [2, 1]
    for r in record["results"]:
        assert r["identical"] and r["rows_differing"] == 0 and r["ratio"] > 0
        assert r["ours"]["tokens_per_s"] > 0 and r["transformers"]["ms_per_token"] > 0
    assert len(record["results"][0]["prompt_lengths"]) == 2 and min(record["results"][0]["prompt_lengths"]) > 20


@pytest.mark.parametrize("flags, match", [
    ([], "--generate needs --model-path DIR and --instructions FILE"),
    (["--model-path", "{tmp}/none", "--instructions", "{tmp}/i.json"], "none"),
    (["--model-path", "{model}", "--instructions", "{tmp}/i.json", "--repeats", "0"], "--repeats 0: must be at least 1"),
    (["--model-path", "{model}", "--instructions", "{tmp}/i.json", "--max-new-tokens", "0"],
     "--max-new-tokens 0: must be at least 1"),
    (["--model-path", "{model}", "--instructions", "{tmp}/i.json", "--gen-batch-sizes", "4", "0"],
     "--gen-batch-sizes 0: must be at least 1"),
    pytest.param(["--model-path", "{model}", "--instructions", "{tmp}/i.json", "--device", "cuda"],
                 "--device cuda: no CUDA GPU is available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_generation_mode_refuses_bad_flags_before_loading(tmp_path, flags, match):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "i.json").write_text(json.dumps([{"instruction": "Hi"}]))
    argv = [f.format(tmp=tmp_path, model=tmp_path / "model") for f in flags]
    done = subprocess.run([sys.executable, "tools/bench.py", "--generate", "--device", "cpu", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("bench.py: error: ") and match in done.stderr, done.stderr
