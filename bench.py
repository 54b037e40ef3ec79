"""
Time circuit-breaker training steps: our fast path next to the official code's layout, on the same examples.

    python bench.py                                   # CPU: the small shape, realistic lengths, ~5 minutes
    python bench.py --shape llama3-8b --device cuda   # GPU: the paper's setting, batch 16, bf16, checkpointing
    python bench.py --bucket 0                        # one optimisation off: its speed-up against the default's
    python bench.py --shape llama3-8b --flops-only    # FLOPs of both modes on the same batches, no model built
    python bench.py --data-dir data --tokenizer checkpoints/Meta-Llama-3-8B-Instruct   # real lengths

Switches: --bucket 0 (no length bucketing), --no-truncate (the official full passes: block 20 for the
circuit-breaker set and the head), --grad-ckpt / --no-grad-ckpt, --compile, --dtype. Each run also times
the reference in the same process, so an optimisation's share is its run's speed-up next to the default's.
On a shared CPU, set OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while another process holds a
core made elementwise kernels ten times slower on our 2-core machine.

One step is what train.py's loop does: the frozen reference pass and the LoRA pass over both sets, both
losses, backward, gradient clipping and the AdamW step. Ours is train.py's own code: train.step_loss on a
model built as train.load_model builds it (random weights of the chosen shape, only the blocks
train.n_blocks_needed loads, LoRA applied the same way), on batches from train.train_batches. Random
weights change nothing in the timing.

The reference mode runs the official code's layout (GraySwanAI/circuit-breakers) on the same examples:
  - circuit-breaker rows padded to 512 + 512 tokens (request left, response right), retain rows to 1024,
    attention masks passed (data.batches with pad_to=OFFICIAL_LENGTHS); no bucketing;
  - every pass through all loaded blocks (the rerouting loss reads hiddens[20], block 20 runs anyway)
    and through HF's head: the final norm and fp32 logits over the whole vocabulary, never read;
  - fp32 base weights under bf16 autocast on a GPU (on a CPU both modes run fp32 unless --dtype says);
  - gradient checkpointing as ours (the official recipe has it on; on a CPU ours defaults to off, and so
    does the reference here, so that the ratio does not count the recomputation against it).

Both modes time the first --steps batches of the same seeded stream. data.batches draws an epoch's row
order before it groups rows, so those batches hold the same rows however they are grouped, as long as
--steps is a multiple of --bucket (a bucket sorts rows by length within windows of that many batches).
The speed-up is the reference's total time over ours: the same work, so also the ratio of tokens/s.

The record (printed as JSON, and written to --out): median and mean step time, real (unpadded) tokens
per second, peak memory (CUDA max allocated, or the peak resident set on a CPU), FLOPs per step and, on
a GPU, model FLOPs utilisation against the device's bf16 peak; the projected time of the recipe's 150
steps; the machine (CPU model, GPU, torch version, load average) and the date.
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
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import hf
import losses
import train
from lora import apply_lora, lora_disabled
from model import ModelArgs, Transformer, projection_shapes
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# 1. Shapes. The real models' configurations, and small ones with the same proportions for a CPU.

SHAPES = {
    # meta-llama/Meta-Llama-3-8B-Instruct config.json
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                           vocab_size=128256, rope_theta=500000.0),
    # mistralai/Mistral-7B-Instruct-v0.2 config.json (v0.2 has no sliding window)
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
                            vocab_size=32000, rope_theta=1000000.0),
    # Llama-3-8B at width 256: same depth (so target layers 10 and 20 and 21 loaded blocks), same GQA ratio
    # (4 query heads per kv head), same F/D = 3.5; the vocabulary is cut so that the head costs what it does
    # at 8B relative to 21 blocks (about 11%), which matters to the reference mode, the only one that runs it.
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
    settings = dict(SHAPE_CONFIG[shape])
    preset = settings["model"]
    cfg = train.TrainConfig(**{**train.PRESETS[preset], **settings, **given})
    return train.resolve(cfg)


# -----------------------------------------------------------------------------
# 2. Examples: the real files through data.py, or synthetic rows of realistic lengths.
#
# Synthetic lengths, in Llama-3 tokens, for when the official files are not at hand. Each part is drawn
# from a log-normal (median, sigma) clipped to [low, high], then capped as build_training_sets caps it
# (request 512, response 512, retain 1024). "Measured": counted with data.py's Llama-3 tokenizer and
# template on the XSTest, HarmBench and refusal_direction files in ../shared. "Estimated": from the
# datasets' descriptions; --data-dir replaces them all with the real files.
#   - chat template around one request, BOS to assistant header: 10 tokens (measured, Llama-3 template);
#   - harmful request: median 14 (measured: HarmBench behaviours 15.5 mean, refusal_direction harmful
#     instructions 12.7); kept on half the rows for Llama-3 (with_request random), always for Mistral;
#   - harmful response: median 300, sigma 0.45, so about 12% are cut at 512 (estimated: a few
#     paragraphs of instructions per circuit_breakers_train.json record);
#   - retain rows mixed as the official set (Llama-3: 10,000 UltraChat, 230 XSTest x 50, 2,000 refusals
#     x 2; Mistral: no refusals):
#       UltraChat, whole conversation (half the rows; all for Mistral, whose recipe always keeps the
#         request): median 1100, sigma 0.5, so about 57% are cut at 1024 (estimated: UltraChat
#         averages 3.9 turns and about 1,470 tokens of its tokenizer per dialogue, Llama-3's tokenizer
#         is ~10% shorter, plus 5 template tokens per message);
#       UltraChat, first reply after an empty user turn (Llama-3's other half): median 350, sigma 0.5
#         (estimated: about 310 tokens per utterance, replies longer than questions);
#       XSTest: request median 10, completion median 150, at most 256 (measured: completions average
#         160 tokens, 10th-90th percentile 50-256, GPT-4 answers cut at 256);
#       refusals: median 25 (estimated: Llama-3's one- or two-sentence refusals).

TEMPLATE = 10
HARMFUL_REQUEST = (14, 0.35, 4, 100)
HARMFUL_RESPONSE = (300, 0.45, 20, 4000)
ULTRACHAT_WHOLE = (1100, 0.5, 60, 8000)
ULTRACHAT_REPLY = (350, 0.5, 10, 4000)
XSTEST_REQUEST = (10, 0.2, 4, 20)
XSTEST_COMPLETION = (150, 0.6, 10, 256)
REFUSAL = (25, 0.3, 8, 80)
RETAIN_MIX = {"ultrachat": 10_000, "xstest": 230 * 50, "refusal": 2_000 * 2}


def draw(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(max(round(rng.lognormvariate(0.0, sigma) * median), low), high))


def synthetic_examples(cfg: train.TrainConfig, n: int, vocab_size: int, seed: int):
    """n circuit-breaker and n retain examples (data.Example) with the lengths above and random ids."""
    rng = random.Random(seed)
    caps = data.OFFICIAL_LENGTHS

    def ids(k: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(k)]

    def keep_request() -> bool:
        return cfg.with_request == "always" or rng.random() < 0.5

    def turn(request: tuple, response: tuple) -> tuple[int, int]:
        return TEMPLATE + (draw(rng, *request) if keep_request() else 0), draw(rng, *response)

    def cb_example() -> data.Example:
        n_prompt, n_reply = turn(HARMFUL_REQUEST, HARMFUL_RESPONSE)
        n_prompt, n_reply = min(n_prompt, caps.request), min(n_reply, caps.response)
        return data.Example(ids(n_prompt + n_reply), n_prompt, [1] * (n_prompt + n_reply))

    def retain_example(kind: str) -> data.Example:
        if kind == "ultrachat" and keep_request():
            n_prompt, n_reply = draw(rng, *ULTRACHAT_WHOLE), 0  # the whole conversation is the "prompt"
        elif kind == "ultrachat":
            n_prompt, n_reply = TEMPLATE, draw(rng, *ULTRACHAT_REPLY)
        elif kind == "xstest":
            n_prompt, n_reply = turn(XSTEST_REQUEST, XSTEST_COMPLETION)
        else:
            n_prompt, n_reply = turn(HARMFUL_REQUEST, REFUSAL)
        n = min(n_prompt + n_reply, caps.retain)
        return data.Example(ids(n), min(n_prompt, n), [1] * n)

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
# 3. The two modes


@dataclass
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


def build_model(cfg: train.TrainConfig, args: ModelArgs, head: bool) -> Transformer:
    """train.load_model with random weights: the same blocks, dtype, LoRA, checkpointing and compile."""
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = Transformer(args, n_layers=train.n_blocks_needed(cfg), lm_head=head)
    model.to(hf.pick_dtype(cfg.dtype, cfg.device))
    torch.manual_seed(cfg.seed)
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
               layers=cfg.lora_layers)
    model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.compile:
        for block in model.model.layers:
            block.compile(dynamic=True)
    return model


def official_step_loss(model, batch, step: int, cfg: train.TrainConfig, rerouting):
    """train.step_loss as the official code computes it: the same losses, from full forward passes."""
    cb_coeff, retain_coeff = losses.coefficients(step, cfg.steps, cfg.loss_alpha)
    with torch.no_grad(), lora_disabled(model):
        cb_orig = official_forward(model, batch.cb_tokens, batch.cb_mask)
        retain_orig = official_forward(model, batch.retain_tokens, batch.retain_mask)
    cb_new = official_forward(model, batch.cb_tokens, batch.cb_mask)
    retain_new = official_forward(model, batch.retain_tokens, batch.retain_mask)

    at_targets = lambda states: [states[l] for l in cfg.target_layers]  # noqa: E731
    cb_loss = rerouting(at_targets(cb_new), at_targets(cb_orig), batch.cb_loss_mask)
    retain_loss = losses.retain_loss_official(losses.official_retain_states(retain_new, model.model.norm),
                                              losses.official_retain_states(retain_orig, model.model.norm),
                                              batch.retain_mask, pad_to=data.OFFICIAL_LENGTHS.retain)
    loss = cb_coeff * cb_loss + retain_coeff * retain_loss
    return loss, dict(loss=loss.item(), cb_loss=cb_loss.item(), retain_loss=retain_loss.item())


def official_forward(model, tokens, mask):
    """HF's LlamaForCausalLM forward with output_hidden_states, as the official code calls it: every loaded
    block, then the final norm and the logits over the vocabulary, cast to fp32 and thrown away. The mask
    is dropped for right-padded rows, as train.py does (and HF's SDPA path, for rows without padding)."""
    logits, hiddens = model(tokens, None if train.right_padded(mask) else mask)
    logits.float()
    return hiddens


def train_step(model, batch, step, cfg, step_loss, params, optimizer, autocast):
    """One iteration of train.py's loop, without its logging."""
    batch = batch.to(cfg.device)
    model.train()
    with autocast:
        loss, _ = step_loss(model, batch, step, cfg, losses.rerouting_loss)  # the paper's term
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# 4. FLOPs of one step, from the shapes the passes run (2 FLOPs per multiply-add; norms, RoPE, softmax,
# dropout and the losses are left out: well under 1% at 8B).
#
#   per token and block:  linear    = 2 D (H E + 2 K E) + 2 H E D + 3 * 2 D F
#                         lora      = sum over wrapped projections of 2 r (in + out)   (LoRA on only)
#   per row of T tokens and block:  attention = 2 H E T (T + 1)   (QK^T and AV, each query over the
#                                                                   T(T+1)/2 causal pairs)
#   per token, head:      2 D V     (official passes only; forward only, its logits never reach a loss)
#   step = reference forward (LoRA off) + LoRA forward, for each set
#        + backward of the LoRA forward: 1x linear (the base weights are frozen, so only the input
#          gradient is computed, not the weight gradient), 2x lora and attention (both operands)
#        + one more LoRA forward where checkpointing recomputes each block during backward.
# Blocks run forward: the cb set max(target_layers) ours, all loaded blocks officially; the retain set all
# loaded blocks. Backward (and recomputation) reaches max(target_layers) blocks for the cb set and all for
# retain, in both modes: the official cb pass's last block feeds no loss.
# Two approximations, checked against torch's FLOP counter in tests/test_bench.py: block 0's q/k/v
# projections need no input gradient (their input, the embeddings, is frozen), and checkpointing stops
# recomputing a block once the tensors backward needs are back (its last matmul is not redone).
# "flops" counts the rows as padded (what the hardware ran); "useful flops" counts our passes on the real
# tokens without recomputation, the same work for both modes.


def step_flops(args: ModelArgs, cfg: train.TrainConfig, cb_lengths, retain_lengths, *, official: bool,
               recompute: bool) -> float:
    """FLOPs of one step whose rows have these lengths (padded or real)."""
    return sum(flop_parts(args, cfg, cb_lengths, retain_lengths, official=official, recompute=recompute).values())


def flop_parts(args: ModelArgs, cfg: train.TrainConfig, cb_lengths, retain_lengths, *, official: bool,
               recompute: bool) -> dict[str, float]:
    """The same, split into linear, lora, attention and head FLOPs."""
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


# -----------------------------------------------------------------------------
# 5. The machine: peak FLOP/s, memory, names


# Dense bf16 tensor-core peaks in TFLOP/s, from the vendor's data sheets; the first name found in the
# device's name wins (so "H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10", 125.0), ("L4", 121.0)]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None or not device.startswith("cuda"):
        return given
    name = device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        # glibc keeps freed memory for reuse, so the resident set remembers earlier, larger steps (or the
        # other mode's): hand free memory back first, then restart the peak (Linux: "5" resets VmHWM).
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        pass  # not Linux with glibc: the peak then covers the whole process


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 2**10 / 2**30  # kB
    except OSError:
        pass
    return train.peak_memory_mb("cpu") / 2**10


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory(device: str):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# 6. Timing
#
# On a GPU the modes run one after the other, each alone in memory. On a shared CPU the load of other
# processes drifts by more than the effect being measured, so there the modes take turns step by step
# (--interleave): the same drift then falls on both. Both models are resident then, so each mode's peak
# includes the other model's weights (a few MB at the small shape; on a GPU, use the default).


class Runner:
    """One mode's model, optimizer, batches and measurements."""

    def __init__(self, mode: Mode, args: ModelArgs, batches: list[data.Batch]):
        self.mode, self.args, self.batches, cfg = mode, args, batches, mode.cfg
        self.model = build_model(cfg, args, head=mode.official_passes)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step_loss = official_step_loss if mode.official_passes else train.step_loss
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.autocast)
        self.times, self.peaks, self.warmup_s = [], [], 0.0

    def step(self, i: int, batch: data.Batch) -> float:
        """Run step i on a batch; its wall time."""
        synchronize(self.mode.cfg.device)
        t0 = time.perf_counter()
        train_step(self.model, batch, i, self.mode.cfg, self.step_loss, self.params, self.optimizer, self.autocast)
        synchronize(self.mode.cfg.device)
        return time.perf_counter() - t0

    def warm_up(self, n: int):
        """Untimed steps on the batches with the most padded tokens, which set the peak memory: measured
        here, since on a CPU the resident set of later steps still holds what the largest one took.
        Compilation, the allocator and caches settle too."""
        device = self.mode.cfg.device
        largest = sorted(self.batches, key=lambda b: b.cb_tokens.numel() + b.retain_tokens.numel(), reverse=True)
        for i in range(n):
            reset_peak_memory(device)
            self.warmup_s += self.step(i + 1, largest[i % len(largest)])
            self.peaks.append(peak_memory_gib(device))

    def timed(self, i: int, log):
        self.times.append(self.step(i + 1, self.batches[i]))
        log(f"{self.mode.name}: step {i + 1}/{len(self.batches)} {self.times[-1]:.2f} s")

    def free(self):
        del self.model, self.params, self.optimizer
        free_memory(self.mode.cfg.device)

    def report(self, peak: float | None, loadavg: list[float]) -> dict:
        mode, cfg, times, batches = self.mode, self.mode.cfg, self.times, self.batches
        total, mean = sum(times), sum(times) / len(times)
        real = sum(int(b.cb_mask.sum() + b.retain_mask.sum()) for b in batches)
        flops = sum(step_flops(self.args, cfg, *batch_lengths(b, padded=True), official=mode.official_passes,
                               recompute=cfg.grad_ckpt) for b in batches)
        useful = sum(step_flops(self.args, cfg, *batch_lengths(b, padded=False), official=False, recompute=False)
                     for b in batches)
        return {
            "settings": dict(dtype=cfg.dtype, autocast_bf16=mode.autocast, grad_ckpt=cfg.grad_ckpt,
                             truncate=not mode.official_passes, bucket=cfg.bucket, compile=cfg.compile,
                             padding="official 512+512 / 1024" if mode.official_padding else "longest row"),
            "step_s_median": statistics.median(times),
            "step_s_mean": mean,
            "step_s": [round(t, 3) for t in times],
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
    """{mode name: its report}; a mode that runs out of GPU memory reports that instead."""
    reports = {}
    if interleave:
        runners = [Runner(m, args, batches[m.name]) for m in modes_]
        load = [os.getloadavg()[0]]
        for r in runners:
            r.warm_up(warmup)
        for i in range(len(runners[0].batches)):
            for r in runners:
                r.timed(i, log)
        load.append(os.getloadavg()[0])
        for r in runners:
            r.free()
            reports[r.mode.name] = r.report(peak, load)
        return reports
    for m in modes_:
        try:
            reports[m.name] = time_alone(m, args, batches[m.name], warmup, peak, log)
        except torch.cuda.OutOfMemoryError:
            reports[m.name] = {"error": "CUDA out of memory"}
        free_memory(m.cfg.device)
    return reports


def time_alone(mode: Mode, args: ModelArgs, batches: list, warmup: int, peak: float | None, log) -> dict:
    r = Runner(mode, args, batches)
    load = [os.getloadavg()[0]]
    r.warm_up(warmup)
    for i in range(len(batches)):
        r.timed(i, log)
    load.append(os.getloadavg()[0])
    r.free()
    return r.report(peak, load)


# -----------------------------------------------------------------------------
# 7. The command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="small", help="model shape (default: small)")
    p.add_argument("--device", default=train.TrainConfig.device, help="cuda or cpu (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="examples of each set per step (default: 16 for the 7-8B "
                                                  "shapes, 4 small, 2 tiny)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode, a multiple of --bucket "
                                                        "(default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, per mode (default: %(default)s)")
    p.add_argument("--data-dir", help="the official files (as train.py --data-dir); default: synthetic lengths")
    p.add_argument("--tokenizer", help="model directory or tokenizer.model, with --data-dir")
    p.add_argument("--dtype", default="auto", choices=["auto", *hf.DTYPES],
                   help="our base weights (default: auto, bf16 on CUDA, fp32 on CPU, as train.py)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing, both modes (default: on for CUDA, as train.py)")
    p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                   help="cb passes stop at the deepest target layer and no head runs (default: on); "
                        "--no-truncate runs the official full passes with everything else ours")
    p.add_argument("--bucket", type=int, default=train.TrainConfig.bucket,
                   help="length-bucketing window in batches, 0: off (default: %(default)s, as train.py)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each block (default: off, as train.py)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the official layout and report the speed-up (default: on)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="the modes take turns step by step (default: on for CPU, off for CUDA)")
    p.add_argument("--flops-only", action="store_true", help="count each mode's FLOPs on the batches and stop: "
                                                             "no model is built, no step is timed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 peak, for MFU (default: from its name)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="also write the JSON record to this file")
    return p.parse_args(argv)


def bench(a: argparse.Namespace, log=lambda line: print(line, file=sys.stderr)) -> dict:
    """Run what the arguments ask for; the record."""
    cfg = config_from_args(a)
    args = SHAPES[a.shape]
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

    peak = peak_tflops(cfg.device, a.peak_tflops)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": dict(device=device_name(cfg.device), cpu=cpu_model(), threads=torch.get_num_threads(),
                        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), torch=torch.__version__,
                        python=platform.python_version()),
        "shape": a.shape, "blocks_loaded": train.n_blocks_needed(cfg), "target_layers": list(cfg.target_layers),
        "batch_size": cfg.batch_size, "steps": a.steps, "warmup": a.warmup, "data": a.data_dir or "synthetic",
        "lengths": length_summary(batches["ours"]),
        "peak_bf16_tflops": peak,
    }
    if a.flops_only:
        for m in modes_:
            record[m.name] = {"tflops_per_step": sum(
                step_flops(args, m.cfg, *batch_lengths(b, padded=True), official=m.official_passes,
                           recompute=m.cfg.grad_ckpt) for b in batches[m.name]) / a.steps / 1e12}
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


def config_from_args(a: argparse.Namespace) -> train.TrainConfig:
    """The TrainConfig of our mode, after checking the arguments."""
    if a.steps < 1 or a.warmup < 1:
        raise ValueError(f"--steps {a.steps} / --warmup {a.warmup}: need at least one of each (the warm-up "
                         "step measures peak memory)")
    if a.data_dir and not a.tokenizer:
        raise ValueError("--data-dir needs --tokenizer (the model directory or its tokenizer.model)")
    if a.device.startswith("cuda") and not a.flops_only and not torch.cuda.is_available():
        raise ValueError(f"--device {a.device}, but torch sees no CUDA device (--flops-only needs none)")
    given = dict(device=a.device, dtype=a.dtype, grad_ckpt=a.grad_ckpt, bucket=a.bucket, compile=a.compile,
                 seed=a.seed, **({"batch_size": a.batch_size} if a.batch_size else {}),
                 **({"data_dir": a.data_dir} if a.data_dir else {}))
    cfg = train_config(a.shape, **given)
    if cfg.bucket and a.steps % cfg.bucket:
        raise ValueError(f"--steps {a.steps} is not a multiple of --bucket {cfg.bucket}: both modes must time "
                         f"whole bucket windows to see the same examples")
    if a.threads:
        torch.set_num_threads(a.threads)
    return cfg


def length_summary(batches: list[data.Batch]) -> dict:
    """Real row lengths of the timed examples: the distribution the numbers hold for."""
    cb = [n for b in batches for n in b.cb_mask.sum(1).tolist()]
    retain = [n for b in batches for n in b.retain_mask.sum(1).tolist()]
    cap = data.OFFICIAL_LENGTHS.retain
    return dict(cb_mean=statistics.mean(cb), cb_max=max(cb), retain_mean=statistics.mean(retain),
                retain_max=max(retain), retain_share_at_cap=sum(n >= cap for n in retain) / len(retain))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    try:
        record = {"command": " ".join(["python bench.py", *argv]), **bench(a)}
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    text = json.dumps(record, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
