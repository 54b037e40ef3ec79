"""
Time circuit-breaker training steps: our fast path next to the official code's layout, on the same examples.

    python bench.py                                   # CPU: the small shape, realistic lengths, ~5 minutes
    python bench.py --shape llama3-8b --device cuda   # GPU: the paper's setting, batch 16, bf16, checkpointing
    python bench.py --shape llama3-8b --flops-only    # FLOPs of both modes on the same batches, no model built
    python bench.py --shape llama3-8b --device cuda --profile   # two of our steps: top kernels, GPU busy share
    python bench.py --generate --device cpu --model-path DIR --instructions harmless_val.json  # ours vs transformers

Both modes run train.py's step on random weights, the reference in the official code's layout. The record
(JSON, printed and written to --out) holds step times, real tokens/s, peak memory, FLOPs (flops.py), MFU and the
speed-up; BENCHMARKS.md says how each is measured. On a shared CPU, set OMP_WAIT_POLICY=PASSIVE.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import torch

import cli
import data
import flops
import hf
import losses
import train
from bench_generate import bench_generate
from data import load_instructions
from synthetic import synthetic_examples
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# 1. Shapes: the real models' configurations, and small ones with the same proportions for a CPU.

SHAPES = {
    # meta-llama/Meta-Llama-3-8B-Instruct config.json
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                           vocab_size=128256, rope_theta=500000.0),
    # mistralai/Mistral-7B-Instruct-v0.2 config.json (v0.2 has no sliding window)
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                            vocab_size=32000, rope_theta=1000000.0),
    # Llama-3-8B's depth, GQA ratio and F/D at width 256; a vocabulary that keeps the head's share of the cost
    "small": ModelArgs(dim=256, n_layers=32, n_heads=4, n_kv_heads=1, head_dim=64, ffn_dim=896,
                       vocab_size=8192, rope_theta=500000.0),
    # For the smoke test: 6 blocks, target layers 2 and 4.
    "tiny": ModelArgs(dim=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, vocab_size=512),
}
# What differs from the preset's TrainConfig per shape; the preset (llama3 or mistral) sets the data recipe.
SHAPE_CONFIG = {
    "llama3-8b": dict(model="llama3", batch_size=16),
    "mistral-7b": dict(model="mistral", batch_size=16),
    "small": dict(model="llama3", batch_size=4),
    "tiny": dict(model="llama3", batch_size=2, target_layers=(2, 4)),
}


# -----------------------------------------------------------------------------
# 2. Examples: the real files through train.py's loader, or synthetic rows of realistic lengths
# (synthetic.py).

def examples(cfg: train.TrainConfig, n: int, vocab_size: int, tokenizer_path: str | None):
    """(circuit-breaker examples, retain examples, pad id): with a tokenizer, the training sets train.py
    builds from cfg.data_dir; without, n synthetic ones of each."""
    if tokenizer_path is None:
        return *synthetic_examples(cfg, n, vocab_size, cfg.seed), 0
    tokenizer = Tokenizer.from_pretrained(tokenizer_path, chat_format=None if cfg.model == "llama3" else "mistral")
    with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout carries only the record
        cb, retain, _ = train.load_data(cfg, tokenizer)
    return cb, retain, tokenizer.pad_id


# -----------------------------------------------------------------------------
# 3. The two modes: both run train.py's step; the reference with the official passes and padding.


@dataclasses.dataclass
class Mode:
    name: str
    cfg: train.TrainConfig
    official_passes: bool  # every block and the head in every pass (the official code's forward)
    autocast: bool         # bf16 autocast (CUDA only, as train.py)
    batches: list[data.Batch]


def modes(cfg: train.TrainConfig, truncate: bool, reference: bool, cb, retain, pad_id: int, steps: int,
          vocab_size: int, hf_peft: bool = False) -> list[Mode]:
    """Ours, and the reference: the same step with the official passes, fp32 weights under bf16 autocast
    on a GPU, and the official padding (512 + 512 and 1024, masks passed). Each on its first `steps` batches.
    hf_peft: also the official step on transformers + peft (hf_reference.py), on the reference's batches."""
    def first(stream) -> list[data.Batch]:  # random weights: real ids fold into the shape's vocabulary
        return [b._replace(cb_tokens=b.cb_tokens % vocab_size, retain_tokens=b.retain_tokens % vocab_size)
                for b in itertools.islice(stream, steps)]

    cuda = cfg.device.startswith("cuda")
    ours_batches = first(train.train_batches(cfg, cb, retain, pad_id))
    ours = Mode("ours", cfg, not truncate, cuda and cfg.dtype == "bf16", ours_batches)
    if not reference:
        return [ours]
    ref_cfg = dataclasses.replace(cfg, dtype="fp32", pack=False, bucket=0, compile=False, micro_batch=0)
    official = data.batches(cb, retain, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, pad_to=data.OFFICIAL_LENGTHS)
    reference_mode = Mode("reference", ref_cfg, True, cuda, first(official))
    return [ours, reference_mode] + [dataclasses.replace(reference_mode, name="hf_peft")] * hf_peft


class OfficialPasses(Transformer):
    """The forward the official code calls (HF's, with output_hidden_states): every loaded block whatever
    last_layer asks, then the final norm and the logits over the vocabulary, cast to fp32 and never read."""

    def forward(self, tokens=None, attention_mask=None, *, lengths=None, input_embeds=None, last_layer=None):
        logits, hiddens = super().forward(tokens, attention_mask, lengths=lengths, input_embeds=input_embeds)
        logits.float()
        return logits, hiddens


# -----------------------------------------------------------------------------
# 4. Measuring: peak memory and step times

# Dense bf16 peaks in TFLOP/s (data sheets); the first key in the device's name wins, so longer keys first.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10", 125.0), ("L4", 121.0)]


class Runner:
    """One mode's model as train.build_model builds it (the same blocks, dtype, LoRA, checkpointing and
    compile, random weights) and its optimizer; the step times and peak memory measured on its batches."""

    def __init__(self, mode: Mode, args: ModelArgs):
        self.mode, self.args, self.times, cfg = mode, args, [], mode.cfg
        torch.manual_seed(0)
        with torch.device(cfg.device):
            model = (OfficialPasses if mode.official_passes else Transformer)(
                args, train.n_blocks_needed(cfg), lm_head=mode.official_passes)
        self.model = train.prepare_model(model.to(hf.pick_dtype(cfg.dtype, cfg.device)), cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.autocast)

    def step(self, i: int, batch: data.Batch) -> float:
        """Step i of train.py's loop, without its logging; its wall time (on a GPU, of the kernels)."""
        cfg = self.mode.cfg
        sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else lambda: None
        sync()
        t0 = time.perf_counter()
        self.gradients(i, batch.to(cfg.device))
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    def gradients(self, i: int, batch: data.Batch):
        self.model.train()
        train.step_gradients(self.model, batch, i, self.mode.cfg, losses.rerouting_loss, self.autocast)  # the paper's

    def warm_up(self):
        """An untimed step on the batch with the most padded tokens, which sets the peak memory (a CPU's
        resident set keeps it for later steps); compilation, allocator and caches settle too."""
        device = self.mode.cfg.device
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        # glibc keeps freed memory, so the resident set remembers earlier steps: hand it back, then restart
        # the kernel's high-water mark (VmHWM, which train.peak_memory_mb reads through getrusage).
        with contextlib.suppress(OSError, AttributeError):  # not Linux with glibc: the peak covers the process
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
        self.step(1, max(self.mode.batches, key=lambda b: b.cb_tokens.numel() + b.retain_tokens.numel()))
        self.peak_mem_gib = train.peak_memory_mb(device) / 2**10

    def report(self, peak_tflops: float | None, loadavg: list[float]) -> dict:
        times, (cfg, batches) = self.times, (self.mode.cfg, self.mode.batches)
        tflops = flops.tflops_per_step(self.args, cfg, batches, self.mode.official_passes)
        mean, real = statistics.mean(times), sum(real_tokens(b) for b in batches)
        return dict(step_s_median=statistics.median(times), step_s_mean=mean, step_s=[round(t, 3) for t in times],
                    tokens_real=real, tokens_padded=sum(b.cb_mask.numel() + b.retain_mask.numel() for b in batches),
                    tokens_per_s=real / sum(times), peak_mem_gib=self.peak_mem_gib, tflops_per_step=tflops,
                    mfu=tflops / mean / peak_tflops if peak_tflops else None,
                    projected_min_for_steps=mean * cfg.steps / 60, loadavg_1min=loadavg)


class HFRunner(Runner):
    """Runner with the transformers + peft model and the official step (hf_reference.py)."""

    def __init__(self, mode: Mode, args: ModelArgs):
        import hf_reference  # transformers and peft: only when asked
        self.reference = hf_reference
        self.mode, self.args, self.times, cfg = mode, args, [], mode.cfg
        self.model = hf_reference.hf_model(args, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.autocast)

    def gradients(self, i: int, batch: data.Batch):
        with self.autocast:
            loss = self.reference.official_loss(self.model, batch, i, self.mode.cfg)
        loss.backward()


def runner_for(mode: Mode, args: ModelArgs) -> Runner:
    return HFRunner(mode, args) if mode.name == "hf_peft" else Runner(mode, args)


def time_modes(modes_: list[Mode], args: ModelArgs, peak_tflops: float | None, log) -> dict:
    """{mode name: its report}. On a CPU the modes take turns step by step, so that the drifting load of
    other processes falls on both; on a GPU each runs alone in memory."""
    reports = {}
    for group in [[m] for m in modes_] if modes_[0].cfg.device.startswith("cuda") else [modes_]:
        runners, load = [runner_for(m, args) for m in group], [os.getloadavg()[0]]
        for r in runners:
            r.warm_up()
        for i, r in itertools.product(range(len(group[0].batches)), runners):
            r.times.append(r.step(i + 1, r.mode.batches[i]))
            log(f"{r.mode.name}: step {i + 1}/{len(r.mode.batches)} {r.times[-1]:.2f} s")
        load.append(os.getloadavg()[0])
        reports.update({r.mode.name: r.report(peak_tflops, load) for r in runners})
        del runners, r  # this group's models go before the next group's are built
        gc.collect()
    return reports


def profile(runner: Runner, log, top: int = 15) -> dict:
    """Our mode's first two steps under torch.profiler, after the warm-up step: the operators (on a GPU, the
    kernels) with the most self time, and on a GPU the share of the wall time some kernel was running."""
    cuda = runner.mode.cfg.device.startswith("cuda")
    runner.warm_up()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for i, batch in enumerate(runner.mode.batches[:2]):
            runner.step(i + 1, batch)
    wall_s, events = time.perf_counter() - t0, prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # noqa: E731
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    rows = [dict(name=e.key, calls=e.count, self_ms=self_us(e) / 1e3) for e in ranked]
    for r in rows:
        log(f"{r['self_ms']:10.1f} ms {r['calls']:7d} x  {r['name'][:90]}")
    busy = sum(self_us(e) for e in events) / 1e6 / wall_s if cuda else None  # kernel time over wall time
    return dict(steps=min(2, len(runner.mode.batches)), wall_s=wall_s, device_busy=busy, top=rows)


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    cpu = os.uname().machine
    with contextlib.suppress(OSError):  # not Linux: the architecture only
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    return dict(device=gpu if device.startswith("cuda") else cpu, cpu=cpu, threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), torch=torch.__version__,
                python=sys.version.split()[0])


# -----------------------------------------------------------------------------
# 5. The command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--shape", choices=list(SHAPES), default="small", help="model shape (default: small)")
    add("--device", default=train.TrainConfig.device, help="cuda or cpu (default: %(default)s)")
    add("--batch-size", type=int, help="examples of each set per step (default: 16 for 7-8B, 4 small, 2 tiny)")
    add("--steps", type=int, default=8, help="timed steps per mode, a multiple of --bucket (default: %(default)s)")
    add("--data-dir", help="the official files (as train.py --data-dir); default: synthetic lengths")
    add("--tokenizer", help="with --data-dir: model directory or tokenizer.model (default: the preset's)")
    add("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="our base weights (default: as train.py)")
    add("--grad-ckpt", action=on_off, help="gradient checkpointing, both modes (default: on for CUDA)")
    add("--truncate", action=on_off, default=True, help="cb passes stop at the deepest target layer, no head")
    add("--pack", action=on_off, default=train.TrainConfig.pack, help="packed rows, ours (default: on, as train.py)")
    add("--bucket", type=int, default=train.TrainConfig.bucket, help="length-bucketing window in batches, 0: off")
    add("--micro-batch", type=int, default=0, help="examples per forward and backward, ours (default: all)")
    add("--compile", action=on_off, help="torch.compile each block, ours (default: as train.py, off)")
    add("--reference", action=on_off, default=True, help="also time the official layout (default: on)")
    add("--hf", action="store_true", help="with --reference, also the official step on transformers + peft")
    add("--flops-only", action="store_true", help="count each mode's FLOPs and stop: no model, no timing")
    add("--profile", action="store_true", help="profile two of our steps instead of timing: top kernels, GPU busy")
    add("--out", help="also write the JSON record to this file")
    cli.add_threads_flag(p)
    g = p.add_argument_group("generation (--generate: bench_generate.py, ours against transformers' generate)")
    g.add_argument("--generate", action="store_true", help="time generation instead of training steps")
    g.add_argument("--model-path", help="HF model directory with its tokenizer and chat template")
    g.add_argument("--instructions", help="instruction list, [{\"instruction\"}]: the prompts")
    g.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[32, 1], help="rows per batch (default: 32 1)")
    g.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per row (default: 16)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size (default: 3)")
    return p.parse_args(argv)


def generation(a: argparse.Namespace, log) -> dict:
    """The generation bench's record, its flags checked first."""
    if not a.model_path or not a.instructions:
        raise ValueError("--generate needs --model-path DIR and --instructions FILE")
    hf.read_config(a.model_path)
    load_instructions(a.instructions)
    cli.check_flags(a, {"max_new_tokens": 1, "repeats": 1}, {})
    if min(a.gen_batch_sizes) < 1:
        raise ValueError(f"--gen-batch-sizes {min(a.gen_batch_sizes)}: must be at least 1")
    if a.out:
        cli.check_output(a.out, "--out")
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(a.device),
            **bench_generate(a.model_path, a.instructions, batch_sizes=tuple(a.gen_batch_sizes),
                             max_new_tokens=a.max_new_tokens, repeats=a.repeats, device=a.device, log=log)}


def config_from_args(a: argparse.Namespace) -> train.TrainConfig:
    """The TrainConfig of our mode, as train.py resolves it for the shape's preset and the flags given, after
    checking them."""
    if a.steps < 1:
        raise ValueError(f"--steps {a.steps}: must be at least 1")
    if a.device.startswith("cuda") and not a.flops_only and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}, but torch sees no CUDA device (--flops-only needs none)")
    if a.out:
        cli.check_output(a.out, "--out")
    if a.data_dir and not Path(a.data_dir).is_dir():  # else the preset's tokenizer, read first, is what fails
        raise FileNotFoundError(f"--data-dir {a.data_dir}: no such directory")
    given = {k: getattr(a, k) for k in ("device", "dtype", "grad_ckpt", "pack", "bucket", "compile", "micro_batch",
                                        "batch_size", "data_dir") if getattr(a, k) is not None}
    settings = SHAPE_CONFIG[a.shape]
    cfg = train.resolve(train.TrainConfig(**{**train.PRESETS[settings["model"]], **settings, **given}),
                        device_present=not a.flops_only)
    if cfg.bucket and a.steps % cfg.bucket:
        raise ValueError(f"--steps {a.steps} is not a multiple of --bucket {cfg.bucket}: both modes must time "
                         f"whole bucket windows to see the same examples")
    return cfg


def bench(a: argparse.Namespace, log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Run what the arguments ask for; the record."""
    if a.generate:
        return generation(a, log)
    cfg, args = config_from_args(a), SHAPES[a.shape]
    tokenizer = (a.tokenizer or cfg.model_path) if a.data_dir else None
    cb, retain, pad_id = examples(cfg, a.steps * cfg.batch_size, args.vocab_size, tokenizer)
    modes_ = modes(cfg, a.truncate, a.reference, cb, retain, pad_id, a.steps, args.vocab_size, a.hf and a.reference)
    record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(cfg.device), "shape": a.shape,
              "blocks_loaded": train.n_blocks_needed(cfg), "target_layers": list(cfg.target_layers),
              "batch_size": cfg.batch_size, "steps": a.steps, "data": a.data_dir or "synthetic",
              "lengths": length_summary(modes_[0].batches)}
    gpu = record["machine"]["device"] if cfg.device.startswith("cuda") else ""
    record["peak_bf16_tflops"] = next((tf for key, tf in PEAK_BF16_TFLOPS if key in gpu), None)
    if a.flops_only or a.profile:
        record.update({m.name: {"tflops_per_step": flops.tflops_per_step(args, m.cfg, m.batches, m.official_passes)}
                       for m in modes_})
    if a.profile:
        record["profile"] = profile(Runner(modes_[0], args), log)
    elif not a.flops_only:
        log(f"{a.shape}: {a.steps} steps of {cfg.batch_size} + {cfg.batch_size} rows per mode")
        record.update(time_modes(modes_, args, record["peak_bf16_tflops"], log))
    if a.reference:
        record["flops_ratio"] = record["reference"]["tflops_per_step"] / record["ours"]["tflops_per_step"]
    if a.reference and "step_s_mean" in record["reference"]:
        record["speedup"] = record["reference"]["step_s_mean"] / record["ours"]["step_s_mean"]
    if "step_s_mean" in record.get("hf_peft", {}):
        record["speedup_hf_peft"] = record["hf_peft"]["step_s_mean"] / record["ours"]["step_s_mean"]
    return record


def real_tokens(b: data.Batch) -> int:
    return int(b.cb_mask.sum() + b.retain_mask.sum())


def length_summary(batches: list[data.Batch]) -> dict:
    """Real row lengths of the timed examples: the distribution the numbers hold for."""
    cb = [n for b in batches for n in b.cb_lengths or b.cb_mask.sum(1).tolist()]
    retain = [n for b in batches for n in b.retain_lengths or b.retain_mask.sum(1).tolist()]
    at_cap = sum(n >= data.OFFICIAL_LENGTHS.retain for n in retain) / len(retain)
    return dict(cb_mean=statistics.mean(cb), cb_max=max(cb), retain_mean=statistics.mean(retain),
                retain_max=max(retain), retain_share_at_cap=at_cap)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        cli.use_threads(a.threads)
        record = {"command": " ".join(["python tools/bench.py", *argv]), **bench(a)}
        print(json.dumps(record, indent=2))
        if a.out:
            with hf.atomic_file(a.out) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
    except ValueError as e:
        sys.exit(f"bench.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"bench.py: error: {cli.os_error(e, '--out', a.out)}")


if __name__ == "__main__":
    main()
