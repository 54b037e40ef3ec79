"""
Time circuit-breaker training steps: our fast path next to the official code's layout, on the same examples.

    python bench.py                                   # CPU: the small shape, realistic lengths, ~5 minutes
    python bench.py --shape llama3-8b --device cuda   # GPU: the paper's setting, batch 16, bf16, checkpointing
    python bench.py --bucket 0                        # one optimisation off: its speed-up against the default's
    python bench.py --shape llama3-8b --flops-only    # FLOPs of both modes on the same batches, no model built
    python bench.py --data-dir data --tokenizer checkpoints/Meta-Llama-3-8B-Instruct   # real lengths

Both modes run train.py's step (reference pass, LoRA pass, both losses, backward, clipping, AdamW) on random
weights of the chosen shape. The reference runs it in the official code's layout (GraySwanAI/circuit-breakers):
rows padded to 512 + 512 and 1024 with masks, no bucketing, every pass through all loaded blocks and the head,
fp32 weights under bf16 autocast on a GPU. The record (JSON, printed and written to --out) holds step times,
real tokens/s, peak memory, FLOPs, MFU and the speed-up; BENCHMARKS.md says how each is measured.
On a shared CPU, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads slow its kernels tenfold.
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import data
import hf
import losses
import train
from model import ModelArgs, Transformer, projection_shapes
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


def train_config(shape: str, **given) -> train.TrainConfig:
    """The TrainConfig train.py would resolve for this shape's preset, with the given fields changed."""
    settings = SHAPE_CONFIG[shape]
    return train.resolve(train.TrainConfig(**{**train.PRESETS[settings["model"]], **settings, **given}))


# -----------------------------------------------------------------------------
# 2. Examples: the real files through train.py's loader, or synthetic rows of realistic lengths in Llama-3
# tokens, each part a clipped log-normal (median, sigma, low, high). BENCHMARKS.md gives their sources.

TEMPLATE = 10  # chat template around one request
HARMFUL_REQUEST = (14, 0.35, 4, 100)
HARMFUL_RESPONSE = (300, 0.45, 20, 4000)
ULTRACHAT_WHOLE = (1100, 0.5, 60, 8000)
ULTRACHAT_REPLY = (350, 0.5, 10, 4000)
XSTEST_REQUEST = (10, 0.2, 4, 20)
XSTEST_COMPLETION = (150, 0.6, 10, 256)
REFUSAL = (25, 0.3, 8, 80)
RETAIN_MIX = {"ultrachat": 10_000, "xstest": 230 * 50, "refusal": 2_000 * 2}  # as the official retain set


def synthetic_examples(cfg: train.TrainConfig, n: int, vocab_size: int, seed: int):
    """n circuit-breaker and n retain examples (data.Example) of random ids, with the lengths above capped
    as data.build_training_sets caps them."""
    rng, caps = random.Random(seed), data.OFFICIAL_LENGTHS

    def draw(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(max(round(rng.lognormvariate(0.0, sigma) * median), low), high))

    def keep_request() -> bool:  # on every row for Mistral, on half of them for Llama-3
        return cfg.with_request == "always" or rng.random() < 0.5

    def turn(request: tuple, response: tuple) -> tuple[int, int]:
        return TEMPLATE + (draw(*request) if keep_request() else 0), draw(*response)

    def example(n_prompt: int, n_reply: int, cap: int) -> data.Example:
        n = min(n_prompt + n_reply, cap)
        return data.Example([rng.randrange(vocab_size) for _ in range(n)], min(n_prompt, n), [1] * n)

    def cb_example() -> data.Example:
        n_prompt, n_reply = turn(HARMFUL_REQUEST, HARMFUL_RESPONSE)
        return example(min(n_prompt, caps.request), min(n_reply, caps.response), caps.request + caps.response)

    def retain_example(kind: str) -> data.Example:
        if kind == "ultrachat" and keep_request():
            return example(draw(*ULTRACHAT_WHOLE), 0, caps.retain)  # the whole conversation is the "prompt"
        if kind == "ultrachat":
            return example(TEMPLATE, draw(*ULTRACHAT_REPLY), caps.retain)
        request, response = (XSTEST_REQUEST, XSTEST_COMPLETION) if kind == "xstest" else (HARMFUL_REQUEST, REFUSAL)
        return example(*turn(request, response), caps.retain)

    mix = {k: v for k, v in RETAIN_MIX.items() if k != "refusal" or cfg.refusal_retain}
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return [cb_example() for _ in range(n)], [retain_example(k) for k in kinds]


def real_examples(cfg: train.TrainConfig, tokenizer_path: str):
    """The training sets train.py builds from cfg.data_dir, and the tokenizer's pad id."""
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
    official_passes: bool   # every block and the head in every pass (the official code's forward)
    official_padding: bool  # 512 + 512 and 1024, masks passed
    autocast: bool          # bf16 autocast (CUDA only, as train.py)


def modes(cfg: train.TrainConfig, truncate: bool, reference: bool) -> list[Mode]:
    cuda = cfg.device.startswith("cuda")
    ours = Mode("ours", cfg, official_passes=not truncate, official_padding=False,
                autocast=cuda and cfg.dtype == "bf16")
    if not reference:
        return [ours]
    ref_cfg = dataclasses.replace(cfg, dtype="fp32", bucket=0, compile=False)
    return [ours, Mode("reference", ref_cfg, official_passes=True, official_padding=True, autocast=cuda)]


def mode_batches(mode: Mode, cb, retain, pad_id: int, steps: int, vocab_size: int) -> list[data.Batch]:
    cfg = mode.cfg
    if mode.official_padding:
        stream = data.batches(cb, retain, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, bucket=0,
                              pad_to=data.OFFICIAL_LENGTHS)
    else:
        stream = train.train_batches(cfg, cb, retain, pad_id)
    # Random weights: which token a row holds does not matter, so real ids fold into the shape's vocabulary.
    return [data.Batch(b.cb_tokens % vocab_size, b.cb_mask, b.retain_tokens % vocab_size, b.retain_mask,
                       b.cb_loss_mask) for b in itertools.islice(stream, steps)]


class OfficialPasses(Transformer):
    """The forward the official code calls (HF's, with output_hidden_states): every loaded block whatever
    last_layer asks, then the final norm and the logits over the vocabulary, cast to fp32 and never read."""

    def forward(self, tokens=None, attention_mask=None, *, input_embeds=None, last_layer=None):
        logits, hiddens = super().forward(tokens, attention_mask, input_embeds=input_embeds)
        logits.float()
        return logits, hiddens


def build_model(cfg: train.TrainConfig, args: ModelArgs, official: bool) -> Transformer:
    """train.load_model with random weights: the same blocks, dtype, LoRA, checkpointing and compile."""
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = (OfficialPasses if official else Transformer)(args, train.n_blocks_needed(cfg), lm_head=official)
    return train.prepare_model(model.to(hf.pick_dtype(cfg.dtype, cfg.device)), cfg)


def train_step(model, batch, step, cfg, params, optimizer, autocast):
    """One iteration of train.py's loop, without its logging."""
    batch = batch.to(cfg.device)
    model.train()
    with autocast:
        loss, _ = train.step_loss(model, batch, step, cfg, losses.rerouting_loss)  # the paper's term
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# 4. FLOPs of one step from the shapes the passes run: matmuls and attention, 2 per multiply-add (the rest
# is under 1% at 8B). BENCHMARKS.md derives each term; tests/test_bench.py checks them against torch's count.


def flop_parts(args: ModelArgs, cfg: train.TrainConfig, cb_lengths, retain_lengths, *, official: bool,
               recompute: bool) -> dict[str, float]:
    """FLOPs of one step whose rows have these lengths (padded or real): linear, lora, attention, head."""
    sizes = projection_shapes(args)  # (out, in) of each projection
    linear_per_token = sum(2 * o * i for o, i in sizes.values())
    lora_per_token = sum(2 * cfg.lora_r * sum(sizes[t]) for t in cfg.lora_targets)
    n_loaded, n_target = train.n_blocks_needed(cfg), max(cfg.target_layers)

    def lora_blocks(n_run: int) -> int:
        return sum(1 for layer in cfg.lora_layers if layer < n_run)

    parts = dict(linear=0.0, lora=0.0, attention=0.0, head=0.0)
    for lengths, n_fwd, n_bwd in ((cb_lengths, n_loaded if official else n_target, n_target),
                                  (retain_lengths, n_loaded, n_loaded)):
        tokens = sum(lengths)
        attention = sum(2 * args.n_heads * args.head_dim * T * (T + 1) for T in lengths)  # one block
        # reference forward + LoRA forward + backward (1x frozen linear, 2x the rest) + recomputation
        passes_fwd, passes_bwd = 2 * n_fwd, (1 + recompute) * n_bwd
        parts["linear"] += linear_per_token * tokens * (passes_fwd + passes_bwd)
        parts["attention"] += attention * (passes_fwd + (2 + recompute) * n_bwd)
        parts["lora"] += lora_per_token * tokens * (lora_blocks(n_fwd) + (2 + recompute) * lora_blocks(n_bwd))
        parts["head"] += 2 * args.dim * args.vocab_size * tokens * 2 if official else 0  # two forwards
    return parts


def batch_lengths(batch: data.Batch, padded: bool) -> tuple[list[int], list[int]]:
    if padded:
        (B, Tc), (_, Tr) = batch.cb_tokens.shape, batch.retain_tokens.shape
        return [Tc] * B, [Tr] * B
    return batch.cb_mask.sum(1).tolist(), batch.retain_mask.sum(1).tolist()


def total_flops(args: ModelArgs, mode: Mode, batches: list[data.Batch], useful: bool = False) -> float:
    """FLOPs of these steps as run (rows as padded); useful=True: the work both modes share, our passes
    over the real tokens without recomputation."""
    official, recompute = mode.official_passes and not useful, mode.cfg.grad_ckpt and not useful
    return sum(sum(flop_parts(args, mode.cfg, *batch_lengths(b, padded=not useful), official=official,
                              recompute=recompute).values()) for b in batches)


# -----------------------------------------------------------------------------
# 5. The machine: names, peak FLOP/s, peak memory

# Dense bf16 peaks in TFLOP/s (data sheets); the first key in the device's name wins, so longer keys first.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10", 125.0), ("L4", 121.0)]


def proc_field(path: str, key: str) -> str | None:
    """The value of the first "key: value" line of a /proc file; None where there is none (not Linux)."""
    with contextlib.suppress(OSError):
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(key)), None)
    return None


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"


def reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    # glibc keeps freed memory, so the resident set remembers earlier steps: hand it back, then reset VmHWM.
    with contextlib.suppress(OSError, AttributeError):  # not Linux with glibc: the peak covers the process
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    hwm = proc_field("/proc/self/status", "VmHWM")  # "1234 kB"
    return int(hwm.split()[0]) / 2**20 if hwm else train.peak_memory_mb("cpu") / 2**10


# -----------------------------------------------------------------------------
# 6. Timing


class Runner:
    """One mode's model, optimizer and batches, and what was measured on them."""

    def __init__(self, mode: Mode, args: ModelArgs, batches: list[data.Batch]):
        self.mode, self.args, self.batches, cfg = mode, args, batches, mode.cfg
        self.model = build_model(cfg, args, official=mode.official_passes)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.autocast)
        self.times, self.peaks, self.warmup_s = [], [], 0.0

    def step(self, i: int, batch: data.Batch) -> float:
        """Run step i on a batch; its wall time (on a GPU, of the kernels, not of their launch)."""
        cuda = self.mode.cfg.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(self.model, batch, i, self.mode.cfg, self.params, self.optimizer, self.autocast)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def warm_up(self, n: int):
        """Untimed steps on the batches with the most padded tokens, which set the peak memory (a CPU's
        resident set keeps it for later steps); compilation, allocator and caches settle too."""
        device = self.mode.cfg.device
        largest = sorted(self.batches, key=lambda b: b.cb_tokens.numel() + b.retain_tokens.numel(), reverse=True)
        for i in range(n):
            reset_peak_memory(device)
            self.warmup_s += self.step(i + 1, largest[i % len(largest)])
            self.peaks.append(peak_memory_gib(device))

    def report(self, peak: float | None, loadavg: list[float]) -> dict:
        mode, cfg, times, batches = self.mode, self.mode.cfg, self.times, self.batches
        total, mean = sum(times), sum(times) / len(times)
        real = sum(int(b.cb_mask.sum() + b.retain_mask.sum()) for b in batches)
        flops, useful = total_flops(self.args, mode, batches), total_flops(self.args, mode, batches, useful=True)
        return {
            "settings": dict(dtype=cfg.dtype, autocast_bf16=mode.autocast, grad_ckpt=cfg.grad_ckpt,
                             truncate=not mode.official_passes, bucket=cfg.bucket, compile=cfg.compile,
                             padding="official 512+512 / 1024" if mode.official_padding else "longest row"),
            "step_s_median": statistics.median(times), "step_s_mean": mean, "step_s": [round(t, 3) for t in times],
            "warmup_s": self.warmup_s,
            "tokens_real": real,
            "tokens_padded": sum(b.cb_mask.numel() + b.retain_mask.numel() for b in batches),
            "tokens_per_s": real / total,
            "peak_mem_gib": max(self.peaks),
            "tflops_per_step": flops / len(times) / 1e12,
            "useful_tflops_per_step": useful / len(times) / 1e12,
            "tflops_per_s": flops / total / 1e12,
            "mfu": flops / total / (peak * 1e12) if peak else None,
            "useful_mfu": useful / total / (peak * 1e12) if peak else None,
            "projected_min_for_steps": mean * cfg.steps / 60,
            "loadavg_1min": loadavg,
        }


def time_modes(modes_: list[Mode], args: ModelArgs, batches: dict[str, list], warmup: int, interleave: bool,
               peak: float | None, log) -> dict:
    """{mode name: its report, or the GPU's out-of-memory error}. Interleaved, the modes take turns step by
    step, so that the drifting load of other processes on a shared CPU falls on both; otherwise each runs
    alone in memory."""
    reports = {}
    for group in [modes_] if interleave else [[m] for m in modes_]:
        try:
            reports.update(time_group(group, args, batches, warmup, peak, log))
        except torch.cuda.OutOfMemoryError:
            reports.update({m.name: {"error": "CUDA out of memory"} for m in group})
        gc.collect()  # this group's models go before the next group's are built
        if group[0].cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return reports


def time_group(group: list[Mode], args: ModelArgs, batches: dict[str, list], warmup: int, peak: float | None,
               log) -> dict:
    runners = [Runner(m, args, batches[m.name]) for m in group]
    load = [os.getloadavg()[0]]
    for r in runners:
        r.warm_up(warmup)
    for i in range(len(runners[0].batches)):
        for r in runners:
            r.times.append(r.step(i + 1, r.batches[i]))
            log(f"{r.mode.name}: step {i + 1}/{len(r.batches)} {r.times[-1]:.2f} s")
    load.append(os.getloadavg()[0])
    return {r.mode.name: r.report(peak, load) for r in runners}


# -----------------------------------------------------------------------------
# 7. The command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    add, on_off = p.add_argument, argparse.BooleanOptionalAction
    add("--shape", choices=list(SHAPES), default="small", help="model shape (default: small)")
    add("--device", default=train.TrainConfig.device, help="cuda or cpu (default: %(default)s)")
    add("--batch-size", type=int, help="examples of each set per step (default: 16 for 7-8B, 4 small, 2 tiny)")
    add("--steps", type=int, default=8, help="timed steps per mode, a multiple of --bucket (default: %(default)s)")
    add("--warmup", type=int, default=1, help="untimed steps first, per mode (default: %(default)s)")
    add("--data-dir", help="the official files (as train.py --data-dir); default: synthetic lengths")
    add("--tokenizer", help="model directory or tokenizer.model, with --data-dir")
    add("--dtype", default="auto", choices=train.TrainConfig.__dataclass_fields__["dtype"].metadata["choices"],
        help="our base weights (default: auto, bf16 on CUDA, fp32 on CPU, as train.py)")
    add("--grad-ckpt", action=on_off, help="gradient checkpointing, both modes (default: on for CUDA)")
    add("--truncate", action=on_off, default=True, help="cb passes stop at the deepest target layer and no "
        "head runs (default: on); --no-truncate runs the official full passes with everything else ours")
    add("--bucket", type=int, default=train.TrainConfig.bucket,
        help="length-bucketing window in batches, 0: off (default: %(default)s, as train.py)")
    add("--compile", action=on_off, default=False, help="torch.compile each block (default: off, as train.py)")
    add("--reference", action=on_off, default=True, help="also time the official layout (default: on)")
    add("--interleave", action=on_off, help="the modes take turns step by step (default: on for CPU)")
    add("--flops-only", action="store_true", help="count each mode's FLOPs and stop: no model, no timing")
    add("--threads", type=int, help="torch CPU threads (default: torch's)")
    add("--peak-tflops", type=float, help="the device's bf16 peak, for MFU (default: from its name)")
    add("--seed", type=int, default=42)
    add("--out", help="also write the JSON record to this file")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> train.TrainConfig:
    """The TrainConfig of our mode, after checking the arguments."""
    if a.steps < 1 or a.warmup < 1:
        raise ValueError(f"--steps {a.steps} / --warmup {a.warmup}: need at least one of each (the warm-up "
                         "step measures peak memory)")
    if a.data_dir and not a.tokenizer:
        raise ValueError("--data-dir needs --tokenizer (the model directory or its tokenizer.model)")
    if a.device.startswith("cuda") and not a.flops_only and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}, but torch sees no CUDA device (--flops-only needs none)")
    if a.out and Path(a.out).is_dir():
        raise ValueError(f"--out {a.out}: a directory; give a file name")
    if a.out and (blocker := next((p for p in Path(a.out).parents if p.is_file()), None)):
        raise ValueError(f"--out {a.out}: {blocker} is a file, not a directory")
    cfg = train_config(a.shape, device=a.device, dtype=a.dtype, grad_ckpt=a.grad_ckpt, bucket=a.bucket,
                       compile=a.compile, seed=a.seed, **({"batch_size": a.batch_size} if a.batch_size else {}),
                       **({"data_dir": a.data_dir} if a.data_dir else {}))
    if cfg.bucket and a.steps % cfg.bucket:
        raise ValueError(f"--steps {a.steps} is not a multiple of --bucket {cfg.bucket}: both modes must time "
                         f"whole bucket windows to see the same examples")
    if a.threads:
        torch.set_num_threads(a.threads)
    return cfg


def bench(a: argparse.Namespace, log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Run what the arguments ask for; the record."""
    cfg, args = config_from_args(a), SHAPES[a.shape]
    if a.data_dir:
        cb, retain, pad_id = real_examples(cfg, a.tokenizer)
    else:
        cb, retain = synthetic_examples(cfg, a.steps * cfg.batch_size, args.vocab_size, cfg.seed)
        pad_id = 0
    modes_ = modes(cfg, a.truncate, a.reference)
    batches = {m.name: mode_batches(m, cb, retain, pad_id, a.steps, args.vocab_size) for m in modes_}
    real = {name: sum(int(b.cb_mask.sum() + b.retain_mask.sum()) for b in bs) for name, bs in batches.items()}
    if len(set(real.values())) > 1:
        raise ValueError(f"the modes would time different examples ({real} real tokens)")

    peak = a.peak_tflops
    if peak is None and cfg.device.startswith("cuda"):
        peak = next((tf for key, tf in PEAK_BF16_TFLOPS if key in device_name(cfg.device)), None)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": dict(device=device_name(cfg.device), cpu=device_name("cpu"), threads=torch.get_num_threads(),
                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), torch=torch.__version__,
                        python=platform.python_version()),
        "shape": a.shape, "blocks_loaded": train.n_blocks_needed(cfg), "target_layers": list(cfg.target_layers),
        "batch_size": cfg.batch_size, "steps": a.steps, "warmup": a.warmup, "data": a.data_dir or "synthetic",
        "lengths": length_summary(batches["ours"]),
        "peak_bf16_tflops": peak,
    }
    if a.flops_only:
        record.update({m.name: {"tflops_per_step": total_flops(args, m, batches[m.name]) / a.steps / 1e12}
                       for m in modes_})
    else:
        interleave = a.interleave if a.interleave is not None else not cfg.device.startswith("cuda")
        record["interleaved"] = interleave
        log(f"{a.shape}: {a.steps} steps of {cfg.batch_size} + {cfg.batch_size} rows per mode, "
            f"{'interleaved' if interleave else 'one mode after the other'}")
        record.update(time_modes(modes_, args, batches, a.warmup, interleave, peak, log))

    ours, ref = record["ours"], record.get("reference")
    if ref and "error" not in ref and "error" not in ours:
        record["flops_ratio"] = ref["tflops_per_step"] / ours["tflops_per_step"]
        if not a.flops_only:
            record["speedup"] = ref["step_s_mean"] / ours["step_s_mean"]
    return record


def length_summary(batches: list[data.Batch]) -> dict:
    """Real row lengths of the timed examples: the distribution the numbers hold for."""
    cb = [n for b in batches for n in b.cb_mask.sum(1).tolist()]
    retain = [n for b in batches for n in b.retain_mask.sum(1).tolist()]
    cap = data.OFFICIAL_LENGTHS.retain
    return dict(cb_mean=statistics.mean(cb), cb_max=max(cb), retain_mean=statistics.mean(retain),
                retain_max=max(retain), retain_share_at_cap=sum(n >= cap for n in retain) / len(retain))


def write_atomic(path: Path, text: str):
    """A temporary file beside path, renamed over it: the old file stays whole until the new one is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        record = {"command": " ".join(["python bench.py", *argv]), **bench(a)}
        print(json.dumps(record, indent=2))
        if a.out:
            write_atomic(Path(a.out), json.dumps(record, indent=2) + "\n")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"bench.py: error: {e}")


if __name__ == "__main__":
    main()
