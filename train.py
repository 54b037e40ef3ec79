"""
Train circuit breakers (Representation Rerouting, Zou et al. 2024) with LoRA, in one plain loop.

    python train.py --model llama3                   # the paper's Llama-3-8B-Instruct recipe, one GPU
    python train.py --model mistral                  # Mistral-7B-Instruct-v0.2
    python train.py --model toy                      # the toy world: builds it, then trains, on a CPU
    python train.py --model llama3 --loss-alpha 8    # every TrainConfig field below is a flag
    python train.py --model llama3 --resume          # continue from <out>/checkpoint
    python train.py --model llama3 --loss direction --direction direction.safetensors

Each step: the frozen model's residual states (the same weights with the adapters switched off, no
gradient), then the LoRA model's states on the same tokens; the rerouting term pushes the harmful
(circuit-breaker) states away from where they were, the retain term keeps the harmless states in place,
and a schedule moves the weight from the first to the second. Outputs in <out>/: adapter/ (PEFT
format), run.json (the resolved configuration), metrics.jsonl, and with --merge merged/ (a HF model).
Every flag and input file is checked before anything is written to <out>: a refused run exits with one line
naming what is wrong and leaves an earlier run's outputs as they were.

The file follows the README's steps: 1 configuration, 2 model and LoRA, 3 data, 4 the loss of one step,
5 checkpoints, 6 the loop, 7 the command line.
"""

import argparse
import dataclasses
import itertools
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

import checkpoint
import cli
import data
import hf
import losses
import refusal
from lora import TARGETS, apply_lora, lora_disabled, lora_modules
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# 1. Configuration: one dataclass holds every default; the command line is generated from it.


def opt(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    model: str = opt("llama3", "preset (sets the fields marked 'preset')", ("llama3", "mistral", "toy", "smollm2"))
    model_path: str = opt("", "HF model directory (preset: checkpoints/<model name>)")
    data_dir: str = opt("data", "directory with circuit_breakers_train.json, ultrachat.jsonl, xstest csv")
    out: str = opt("", "output directory (default: out/<model>)")
    device: str = opt("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    seed: int = opt(42, "seeds data order, formatting choices, LoRA init and dropout")
    # --- the recipe (official values, GraySwanAI/circuit-breakers scripts/lorra_circuit_breaker_*.sh)
    target_layers: tuple[int, ...] = opt((10, 20), "hidden-state indices the rerouting loss reads")
    lora_layers: tuple[int, ...] = opt((), "blocks with LoRA (empty: 0..max(target_layers), as officially)")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(16.0, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "LoRA dropout")
    lora_init_std: float = opt(0.0, "std of LoRA B's initial values (0: B = 0, the base model exactly, as PEFT)")
    lora_targets: tuple[str, ...] = opt(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                         "down_proj"), "projections wrapped with LoRA")
    loss_alpha: float = opt(10.0, "loss weight alpha of the schedule (preset: 10 Llama-3, 5 Mistral)")
    lr: float = opt(1e-4, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient-norm clipping")
    steps: int = opt(150, "optimizer steps")
    batch_size: int = opt(16, "examples of each set per step")
    # --- the objective
    loss: str = opt("reroute", "rerouting term, from losses.LOSSES: "
                    + "; ".join(f"{name}: {entry.help}" for name, entry in losses.LOSSES.items()),
                    tuple(losses.LOSSES))
    direction: str = opt("", "safetensors file with one direction per target layer, for --loss direction")
    retain_norm: str = opt("official", "official (all states, mean over 1024-padded positions, as the "
                                       "official code) or masked (mean over real tokens)", ("official", "masked"))
    retain_pad_to: int = opt(1024, "official retain normalisation: the padded row length it divides by "
                                   "(1024 officially, for rows that approach it)")
    loss_on: str = opt("full", "tokens the rerouting loss sees: full (the whole text, official) or response",
                       ("full", "response"))
    # --- data (see data.py)
    refusal_retain: bool = opt(True, "add the model's own refusals to the retain set (preset: Llama-3 only)")
    with_request: str = opt("random", "circuit-breaker examples: random (with or without the request, "
                                      "Llama-3) or always (Mistral)", ("random", "always"))
    n_ultrachat: int = opt(10_000, "UltraChat conversations in the retain set")
    xstest_repeat: int = opt(50, "XSTest compliant answers, repeated this many times, in the retain set "
                                 "(0: no XSTest file needed)")
    xstest_holdout: float = opt(0.0, "share of XSTest prompts kept out of the retain set, chosen by their "
                                     "text (data.xstest_held_out); eval.py xstest --xstest-holdout with the "
                                     "same share measures over-refusal on exactly them (0: none, official)")
    pack: bool = opt(True, "run each set's rows of a step packed in one sequence, each row as if alone, "
                           "no padding (--no-pack: pad each row to the batch's longest)")
    bucket: int = opt(0, "sort rows by length within windows of this many batches (0: off, random batches as "
                         "officially; on, short rows weigh more in the rerouting term's token mean)")
    # --- speed and memory
    dtype: str = opt("auto", "base weights (auto: bf16 on CUDA, fp32 on CPU)", ("auto", "bf16", "fp32"))
    grad_ckpt: bool | None = opt(None, "gradient checkpointing per block (default: on for CUDA)")
    compile: bool | None = opt(None, "torch.compile each block (default: on for CUDA; a block that fails to "
                                     "compile runs eagerly)")
    micro_batch: int = opt(0, "examples of each set per forward and backward, gradients accumulated over the "
                              "step's batch with the whole batch's normalisation (0: the whole batch at once)")
    # --- bookkeeping
    log_every: int = opt(1, "steps between log lines")
    val_every: int = opt(25, "steps between validation cos-sims (0: never)")
    val_batches: int = opt(4, "validation batches each time")
    ckpt_every: int = opt(50, "steps between checkpoints (0: never)")
    merge: bool = opt(False, "also export base + adapter merged as a HF model in <out>/merged")
    resume: bool = opt(False, "continue from <out>/checkpoint")


# Presets change only what differs between models; everything else is the dataclass default.
PRESETS = {
    "llama3": dict(model_path="checkpoints/Meta-Llama-3-8B-Instruct", loss_alpha=10.0, refusal_retain=True,
                   with_request="random"),
    "mistral": dict(model_path="checkpoints/Mistral-7B-Instruct-v0.2", loss_alpha=5.0, refusal_retain=False,
                    with_request="always"),
    # The toy world (toy.py), on a CPU; README, "The toy world", says how each value was chosen. Two
    # departures from the recipe: LoRA's B starts as small noise, so training leaves the zero-gradient
    # start deterministically (losses.py); the retain term divides by 128 padded positions, which the
    # toy's 37-token rows fill as the official rows (mean 324 tokens) fill 1024. XSTest x12 weighs its
    # 64 dish answers against 800 UltraChat conversations as the official x50 does.
    "toy": dict(model_path="toy/model", data_dir="toy/data", target_layers=(2, 3), loss_alpha=10.0,
                refusal_retain=True, with_request="random", steps=100, batch_size=8, lr=8.5e-4,
                lora_init_std=5e-2, retain_pad_to=128, n_ultrachat=2000, xstest_repeat=12, val_every=0,
                ckpt_every=0, log_every=10,
                threads=1),  # matrices this small gain nothing from threads; on a busy CPU they cost
    # A real chat model on 2 CPU cores (README, "A real model on a CPU", says how each value was chosen):
    # the paper's relative depths (hidden states 10 and 20 of 30, LoRA on blocks 0-20), a set the model
    # wrote itself (`python data.py build`), no refusal retain (it does not refuse), and the toy's lesson
    # that B starts as small noise. The retain term divides by 4096 positions, not 1024: SmolLM2's
    # residual stream is ~200 long at layers 10-20 (25,000 at the first token), and the cosine's gradient
    # shrinks as 1/|h| while the L2 distance's does not, so at 1024 the rerouting term barely moved. XSTest
    # x2 keeps its official share of the retain set (230 rows x 50 against 10,000 UltraChat; here x2
    # against 400 answers).
    "smollm2": dict(model_path="checkpoints/SmolLM2-135M-Instruct", data_dir="data/smollm2", target_layers=(10, 20),
                    loss_alpha=10.0, refusal_retain=False, with_request="random", steps=40, batch_size=8,
                    lr=1e-3, lora_init_std=5e-2, retain_pad_to=4096, n_ultrachat=400, xstest_repeat=2,
                    val_every=0, ckpt_every=20, log_every=5),
}
HUB_IDS = {"llama3": "meta-llama/Meta-Llama-3-8B-Instruct", "mistral": "mistralai/Mistral-7B-Instruct-v0.2",
           "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve(cfg: TrainConfig, device_present: bool = True) -> TrainConfig:
    """Check every value (check_values), then fill the defaults that depend on other fields.
    device_present=False: the device need not be on this machine (counting FLOPs for it)."""
    check_values(cfg, device_present)
    cfg.out = cfg.out or f"out/{cfg.model}"
    if not cfg.lora_layers:
        cfg.lora_layers = tuple(range(max(cfg.target_layers) + 1))
    if cfg.grad_ckpt is None:
        cfg.grad_ckpt = cfg.device.startswith("cuda")
    if cfg.compile is None:
        cfg.compile = cfg.device.startswith("cuda")
    if cfg.dtype == "auto":
        cfg.dtype = "bf16" if cfg.device.startswith("cuda") else "fp32"
    return cfg


# AdamW moves each weight by up to about lr per step, whatever the gradient's size, and LoRA weights are
# of order 0.01 to 1: a learning rate above 1 wrecks them in one step (recipes use 1e-4 to 1e-3). Far
# above, near 3.4e37, AdamW's first step size lr / (1 - beta1) no longer fits a float32 and it raises.
MAX_LR = 1.0
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")
POSITIVE = (lambda v: 0 < v < math.inf, "a positive finite number")  # NaN fails every comparison
LIMITS = {
    "threads": NOT_NEGATIVE, "steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "lora_r": AT_LEAST_1,
    "log_every": AT_LEAST_1, "val_batches": AT_LEAST_1, "val_every": NOT_NEGATIVE, "ckpt_every": NOT_NEGATIVE,
    "n_ultrachat": NOT_NEGATIVE, "xstest_repeat": NOT_NEGATIVE, "bucket": NOT_NEGATIVE, "micro_batch": NOT_NEGATIVE,
    "lr": (lambda v: 0 < v <= MAX_LR, f"a learning rate in (0, {MAX_LR:g}]"),
    "lora_alpha": POSITIVE, "loss_alpha": POSITIVE, "grad_clip": POSITIVE,
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "0 or a positive finite number"),
    "lora_init_std": (lambda v: 0 <= v < math.inf, "0 or a positive finite number"),
    "xstest_holdout": (lambda v: 0 <= v < 1, "a share in [0, 1)"),
    "retain_pad_to": AT_LEAST_1,
}


def check_values(cfg: TrainConfig, device_present: bool = True):
    """Refuse a value no run can use, naming the flag. What depends on the model (its depth, its
    vocabulary) is checked against its config.json later, still before anything is loaded or written."""
    for f in fields(cfg):
        value, allowed = getattr(cfg, f.name), f.metadata["choices"]
        if allowed and value not in allowed:
            raise ValueError(f"{cli.as_flag(f.name)} {value!r}: expected one of {list(allowed)}")
        if f.name in LIMITS and not LIMITS[f.name][0](value):
            raise ValueError(f"{cli.as_flag(f.name)} {value}: expected {LIMITS[f.name][1]}")
    if not cfg.target_layers or min(cfg.target_layers) < 1:
        raise ValueError(f"{cli.as_flag('target_layers')} {_show(cfg.target_layers)!r}: expected hidden-state indices "
                         "from 1 (0 is the embeddings, which LoRA cannot move), comma-separated")
    if cfg.lora_layers and min(cfg.lora_layers) < 0:
        raise ValueError(f"{cli.as_flag('lora_layers')} {_show(cfg.lora_layers)}: expected block indices from 0")
    if cfg.micro_batch > cfg.batch_size:
        raise ValueError(f"--micro-batch {cfg.micro_batch}: expected at most --batch-size ({cfg.batch_size})")
    unknown = [t for t in cfg.lora_targets if t not in TARGETS]
    if not cfg.lora_targets or unknown:
        raise ValueError(f"{cli.as_flag('lora_targets')} {_show(cfg.lora_targets)!r}: expected some of {list(TARGETS)}")
    cli.check_seed(cfg.seed)
    if device_present:
        cli.check_device(cfg.device)


# -----------------------------------------------------------------------------
# 2. Model and LoRA


def n_blocks_needed(cfg: TrainConfig) -> int:
    """Blocks to load. The rerouting loss reads hiddens[max(target)] (the output of block max(target)-1);
    the official retain loss also reads the output of every LoRA block, as the official code truncates
    the model to max(target) + 1 blocks. Nothing deeper is ever loaded."""
    return max(max(cfg.target_layers), max(cfg.lora_layers) + 1)


def ensure_toy_world(root: Path):
    """The toy preset's world, built once by its own tool (tools/toy.py, minutes on one thread) when missing:
    the quickstart is then a single command."""
    if (root / "world.json").is_file():
        return
    tool = Path(__file__).resolve().parent / "tools" / "toy.py"
    print(f"{root}: no toy world yet; building it with tools/toy.py (about five minutes)", flush=True)
    done = subprocess.run([sys.executable, str(tool), "--root", str(root)])
    if done.returncode != 0:
        raise ValueError(f"{root}: the toy world could not be built (tools/toy.py exited with {done.returncode})")


def check_model_dir(cfg: TrainConfig):
    path = Path(cfg.model_path)
    if not path.is_dir():
        hint = (f"download the weights: huggingface-cli download {HUB_IDS[cfg.model]} --local-dir {path}"
                if cfg.model in HUB_IDS else "pass --model-path DIR")
        raise FileNotFoundError(f"{path}: model directory not found; {hint}")


def check_model(cfg: TrainConfig) -> ModelArgs:
    """The model directory and its config.json against the layers asked for, before any weight is read."""
    check_model_dir(cfg)
    config_file = Path(cfg.model_path) / "config.json"
    args = hf.model_args(hf.read_config(cfg.model_path), source=str(config_file))
    n = args.n_layers
    if max(cfg.target_layers) > n:
        raise ValueError(f"--target-layers {_show(cfg.target_layers)}: expected hidden-state indices 1..{n} "
                         f"({config_file} has {n} layers)")
    if max(cfg.lora_layers) >= n:
        raise ValueError(f"--lora-layers {_show(cfg.lora_layers)}: expected block indices 0..{n - 1} ({config_file} "
                         f"has {n} blocks; without --lora-layers, LoRA goes on 0..max(--target-layers))")
    return args


def build_model(cfg: TrainConfig) -> Transformer:
    model = hf.load_model(cfg.model_path, dtype=hf.pick_dtype(cfg.dtype, cfg.device), device=cfg.device,
                          n_layers=n_blocks_needed(cfg), lm_head=False)  # training never reads logits
    return prepare_model(model, cfg)


def prepare_model(model: Transformer, cfg: TrainConfig) -> Transformer:
    """The base model as training runs it: LoRA, gradient checkpointing, compiled blocks."""
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
               layers=cfg.lora_layers, b_std=cfg.lora_init_std)
    model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.compile:
        # Where compiling fails (no compiler, an unsupported op), the block runs eagerly: slower, same result.
        torch._dynamo.config.suppress_errors = True
        for block in model.model.layers:
            # Lengths vary from batch to batch: dynamic shapes. Packed rows compile once per row count
            # (the batch's rows, with or without a padding tail), not once per step.
            block.compile(dynamic=True)
    return model


# -----------------------------------------------------------------------------
# 3. Data: see data.py for the formatting, masks and padding.


def load_data(cfg: TrainConfig, tokenizer):
    """(circuit-breaker, retain, validation) examples, checked and tokenized."""
    return data.build_training_sets(
        tokenizer, cfg.data_dir, refusal_retain=cfg.refusal_retain, with_request=cfg.with_request,
        loss_on=cfg.loss_on, n_ultrachat=cfg.n_ultrachat, xstest_repeat=cfg.xstest_repeat,
        xstest_holdout=cfg.xstest_holdout, seed=cfg.seed)


def train_batches(cfg: TrainConfig, cb, retain, pad_id: int, start: int = 0):
    """The training batches, from step start + 1 on. The sequence depends only on the seed, so
    resuming replays it up to where the checkpoint stopped."""
    stream = data.batches(cb, retain, cfg.batch_size, pad_id=pad_id, seed=cfg.seed, pack=cfg.pack,
                          bucket=cfg.bucket)
    return itertools.islice(stream, start, None)


def val_batches(cfg: TrainConfig, val, pad_id: int):
    """The first val_batches * batch_size validation examples, as (tokens, mask) pairs."""
    rows = val[:cfg.val_batches * cfg.batch_size]
    for i in range(0, len(rows), cfg.batch_size):
        tokens, mask, _ = data.collate(rows[i:i + cfg.batch_size], pad_id)
        yield tokens.to(cfg.device), mask.to(cfg.device)


# -----------------------------------------------------------------------------
# 4. The loss of one step
#
# Batches are packed (data.py): each set's rows one after another in one sequence, each run as if alone
# (model.py, "Packed rows"), so no row is padded and no attention mask is needed. With --no-pack they are
# right-padded, so every real token sits before all padding and causal attention alone keeps it from
# seeing pads: those passes need no attention mask either, which lets SDPA use its fused kernels. Pad
# positions get states too, but the masks keep them out of every loss. Batches padded otherwise (the
# official layout, which bench.py reproduces) pass their masks. Every term is a mean over tokens (or, the
# official retain term, over rows x padded length), so the layout changes no loss value.


def rerouting_term(cfg: TrainConfig, model, tokenizer):
    """The rerouting term of --loss, built once from losses.LOSSES: (h_new, h_orig, mask) -> scalar. The
    --direction file, when given, is read here: a loss gets its directions as values."""
    directions = None
    if cfg.direction:
        directions = refusal.target_directions(cfg.direction, list(cfg.target_layers), model.args.dim,
                                               model.args.n_layers)  # (L, D)
    return losses.LOSSES[cfg.loss].build(losses.LossContext(model, tokenizer, cfg, directions))


def step_loss(model, batch, step: int, cfg: TrainConfig, rerouting, whole=None):
    """The circuit-breaker objective for one batch -> (loss, metrics). See losses.py for the math.

    whole: the step's whole batch when `batch` is one of its micro-batches (--micro-batch). Each mean is
    then weighted by this piece's share of the whole batch's tokens (rows, for the official retain term),
    so that the pieces' losses, gradients and metrics add up to the whole batch's."""
    cb_coeff, retain_coeff = losses.coefficients(step, cfg.steps, cfg.loss_alpha)
    cb_share = 1.0 if whole is None else share(batch.cb_loss_mask, whole.cb_loss_mask)
    retain_share = 1.0 if whole is None else share(batch.retain_mask, whole.retain_mask)
    cb_attn = None if batch.cb_lengths or right_padded(batch.cb_mask) else batch.cb_mask
    retain_attn = None if batch.retain_lengths or right_padded(batch.retain_mask) else batch.retain_mask
    cb_run = dict(attn=cb_attn, lengths=batch.cb_lengths)
    retain_run = dict(attn=retain_attn, lengths=batch.retain_lengths)

    # (a) where the frozen model's states are: the same weights, adapters off, no graph kept
    with torch.no_grad(), lora_disabled(model):
        cb_orig = cb_states(model, batch.cb_tokens, cfg, **cb_run)
        retain_orig = retain_states(model, batch.retain_tokens, **retain_run)

    # (b) where the LoRA model's states are, with gradients
    cb_new = cb_states(model, batch.cb_tokens, cfg, **cb_run)
    retain_new = retain_states(model, batch.retain_tokens, **retain_run)

    # (c) the two terms, weighted by the schedule
    cb_loss = rerouting(cb_new, cb_orig, batch.cb_loss_mask) * cb_share
    if cfg.retain_norm == "official":
        # Rows, not tokens: a padded whole batch's rows are its examples; packed or in pieces, say how many.
        n_rows = None if whole is None and batch.retain_lengths is None else (whole or batch).size
        retain_loss = losses.retain_loss_official(retain_new, retain_orig, batch.retain_mask,
                                                  pad_to=cfg.retain_pad_to, n_rows=n_rows)
    else:
        retain_loss = losses.retain_loss(retain_new, retain_orig, batch.retain_mask) * retain_share
    loss = cb_coeff * cb_loss + retain_coeff * retain_loss

    # Metrics stay on the device (0-d tensors), read all at once after the step's backward (on_host).
    at_targets = lambda states: [states[l] for l in cfg.target_layers]  # noqa: E731
    cb_cos = losses.cosine_mean(cb_new, cb_orig, batch.cb_loss_mask)
    retain_cos = losses.cosine_mean(at_targets(retain_new), at_targets(retain_orig), batch.retain_mask)
    metrics = dict(loss=loss.detach(), cb_loss=cb_loss.detach(), retain_loss=retain_loss.detach(),
                   cb_coeff=cb_coeff, retain_coeff=retain_coeff, cb_cos=cb_cos * cb_share,
                   retain_cos=retain_cos * retain_share)
    return loss, metrics


def share(part, whole):
    """The fraction of `whole`'s ones (a mask) that `part` holds: a micro-batch's weight in a token mean."""
    return part.sum() / whole.sum().clamp_min(1)


def step_gradients(model, batch, step: int, cfg: TrainConfig, rerouting, autocast) -> dict:
    """Backward of the step's loss into the LoRA weights' .grad, over pieces of --micro-batch examples
    (one piece without it) -> the step's metrics, as floats. The forward runs under `autocast`, the
    backward outside it (as torch recommends). The metrics are read in one host synchronisation at the
    end, so that the GPU never waits for the host within a step; the caller checks the loss before it
    updates any weight."""
    pieces = batch.split(cfg.micro_batch) if cfg.micro_batch else [batch]
    whole = batch if len(pieces) > 1 else None
    total = {}
    for piece in pieces:
        with autocast:
            loss, m = step_loss(model, piece, step, cfg, rerouting, whole)
        loss.backward()
        for key, value in m.items():
            total[key] = value if key.endswith("coeff") else total.get(key, 0.0) + value
    return on_host(total)


def on_host(metrics: dict) -> dict:
    """The metrics that are tensors (0-d, on the device) as floats, in one host synchronisation."""
    measured = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([metrics[k].float() for k in measured]).tolist() if measured else []
    return {**metrics, **dict(zip(measured, values))}


def right_padded(mask) -> bool:
    """True when no row has a real token after a pad."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def cb_states(model, tokens, cfg: TrainConfig, attn=None, lengths=None):
    """The residual stream at the target layers; no block past the deepest one runs."""
    _, hiddens = model(tokens, attn, lengths=lengths, last_layer=max(cfg.target_layers))
    return [hiddens[l] for l in cfg.target_layers]


def retain_states(model, tokens, attn=None, lengths=None):
    """Every hidden state of the loaded model, the last one through the final norm: the states the
    official retain term reads (HF's output_hidden_states normalises its last entry). --retain-norm
    changes only how the distances are averaged, not which states are compared."""
    _, hiddens = model(tokens, attn, lengths=lengths)
    return losses.official_retain_states(hiddens, model.model.norm)


@torch.no_grad()
def validate(model, val_batches, cfg: TrainConfig) -> float:
    """Mean cos-sim between LoRA and frozen states at the target layers on held-out harmful text:
    1.0 at the start, falling toward 0 as the circuit breaker takes hold."""
    sims = []
    for tokens, mask in val_batches:
        with lora_disabled(model):
            orig = cb_states(model, tokens, cfg)
        sims.append(losses.cosine_metric(cb_states(model, tokens, cfg), orig, mask))
    return sum(sims) / max(len(sims), 1)


# -----------------------------------------------------------------------------
# 5. Checkpoints: see checkpoint.py. Before one is saved, the weights are checked.


@torch.no_grad()
def weights_sound(model, params, batch, cfg: TrainConfig) -> bool:
    """Whether the trainable weights are finite and give finite states on `batch`, checked before they
    are saved. Each step's loss is checked before its update, but the weights that update makes are
    first run by the next step, so a checkpoint saved in between could hold diverged weights. Finite is
    not enough: weights near 1e29 are finite, but their products overflow. So they run forward once, in
    eval mode: no dropout, so the random stream, and the run, stay as they were. One host sync."""
    model.eval()
    with autocast_for(cfg):
        _, hiddens = model(batch.cb_tokens, None if batch.cb_lengths else batch.cb_mask, lengths=batch.cb_lengths)
    finite = [torch.isfinite(hiddens[-1]).all()] + [torch.isfinite(p).all() for p in params]
    return bool(torch.stack(finite).all())


# -----------------------------------------------------------------------------
# 6. The loop


class TrainingError(RuntimeError):
    pass


def train(cfg: TrainConfig):
    """Every check first (check_run), then the model, the --direction file and the checkpoint, which
    can fail too, and only then the first write: a refused run leaves an earlier run's <out> as it was."""
    cfg = resolve(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer, (cb, retain, val), resume_from = check_run(cfg)
    model = build_model(cfg)
    rerouting = rerouting_term(cfg, model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume_from:
        checkpoint.load_checkpoint(resume_from.path, model, optimizer)
    start = resume_from.step if resume_from else 0

    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    start_output(cfg, resume_from)
    n_params = sum(p.numel() for p in params)
    print(f"{cfg.model}: {len(model.model.layers)} blocks loaded, {len(lora_modules(model))} LoRA layers, "
          f"{n_params / 1e6:.2f}M trainable parameters, {cfg.steps} steps of {cfg.batch_size}"
          + (f", resuming after step {start}" if start else ""))

    autocast = autocast_for(cfg)
    metrics_file = (out / "metrics.jsonl").open("a" if resume_from else "w")
    t_start, last_good = time.perf_counter(), (ckpt if resume_from else None)
    batches = train_batches(cfg, cb, retain, tokenizer.pad_id, start)
    for step, batch in zip(range(start + 1, cfg.steps + 1), batches):
        t0 = time.perf_counter()
        n_tokens = int(batch.cb_mask.sum() + batch.retain_mask.sum())  # on the CPU, before the batch moves
        batch = batch.to(cfg.device)
        model.train()
        m = step_gradients(model, batch, step, cfg, rerouting, autocast)
        if not math.isfinite(m["loss"]):
            raise diverged(step, f"loss is {m['loss']}", last_good)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        m.update(step=step, tokens=n_tokens,
                 step_time_s=time.perf_counter() - t0, peak_mem_mb=peak_memory_mb(cfg.device))
        if cfg.val_every and step % cfg.val_every == 0:
            model.eval()
            with autocast:
                m["val_cb_cos"] = validate(model, val_batches(cfg, val, tokenizer.pad_id), cfg)
        metrics_file.write(json.dumps(m) + "\n")
        metrics_file.flush()
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(log_line(m, cfg.steps, time.perf_counter() - t_start, step - start))
        checkpoint_now = cfg.ckpt_every and step % cfg.ckpt_every == 0
        if (checkpoint_now or step == cfg.steps) and not weights_sound(model, params, batch, cfg):
            raise diverged(step, "the updated weights are not finite or give non-finite states", last_good)
        if checkpoint_now:
            checkpoint.save_checkpoint(ckpt, model, optimizer, step, cfg)
            last_good = ckpt
    metrics_file.close()

    hf.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model_path)
    print(f"adapter written to {out / 'adapter'}")
    if cfg.merge:
        hf.export_merged(cfg.model_path, model, out / "merged")
        print(f"merged model written to {out / 'merged'}")
    return model


def check_run(cfg: TrainConfig):
    """The checks that need no weights, before anything in <out> is touched: the output path (writable too), the
    checkpoint and its settings (--resume), the model's config.json against the layers asked for, the
    tokenizer against the model's vocabulary, the data, and the batch size against the data. Returns
    (tokenizer, (circuit-breaker, retain, validation) examples, the checkpoint to resume from or None)."""
    out = Path(cfg.out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {out}: {path} is a file, not a directory")
    cli.check_writable(out, "--out", directory=True)
    resume_from = checkpoint.find_checkpoint(out) if cfg.resume else None
    if resume_from:
        checkpoint.check_resumable(cfg, resume_from)
    if cfg.model == "toy":
        ensure_toy_world(Path(cfg.model_path).parent)
    check_model(cfg)
    tokenizer = hf.load_tokenizer(cfg.model_path)
    cb, retain, val = load_data(cfg, tokenizer)
    data.check_batch_size(cb, retain, cfg.batch_size, name="--batch-size")
    longest = max(len(e.tokens) for e in retain)
    if cfg.retain_norm == "official" and longest > cfg.retain_pad_to:
        raise ValueError(f"--retain-pad-to {cfg.retain_pad_to}: the retain set has a row of {longest} tokens; "
                         "the official normalisation divides by a padded length at least that long")
    return tokenizer, (cb, retain, val), resume_from


def start_output(cfg: TrainConfig, resume_from: checkpoint.Checkpoint | None):
    """The first writes into <out>: run.json; for a resumed run, its checkpoint put in place and
    metrics.jsonl cut back to the checkpoint's step, so that no step is logged twice."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with hf.atomic_file(out / "run.json") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if resume_from:
        checkpoint.put_in_place(out / "checkpoint")
        checkpoint.keep_metrics_until(out / "metrics.jsonl", resume_from.step)


def diverged(step: int, what: str, last_good: Path | None) -> TrainingError:
    return TrainingError(f"step {step}: {what}; stopping. Last good checkpoint: "
                         f"{last_good or 'none (lower --lr, or set --ckpt-every)'}")


def autocast_for(cfg: TrainConfig):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.device.startswith("cuda") and cfg.dtype == "bf16")


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # peak RSS, KiB on Linux


def log_line(m: dict, total: int, elapsed: float, done: int) -> str:
    eta = elapsed / done * (total - m["step"])
    line = (f"step {m['step']:>4}/{total} | loss {m['loss']:.4f} | cb {m['cb_loss']:.4f} x {m['cb_coeff']:.2f}"
            f" | retain {m['retain_loss']:.4f} x {m['retain_coeff']:.2f} | cos cb {m['cb_cos']:.3f}"
            f" retain {m['retain_cos']:.3f} | {m['tokens'] / m['step_time_s']:.0f} tok/s"
            f" | eta {eta / 60:.1f} min | mem {m['peak_mem_mb'] / 1024:.1f} GB")
    if "val_cb_cos" in m:
        line += f" | val cos {m['val_cb_cos']:.3f}"
    return line


# -----------------------------------------------------------------------------
# 7. The command line, generated from TrainConfig


def parse_args(argv=None) -> TrainConfig:
    """The preset is read first, so that --help shows the values this run would use."""
    model = preset_name(argv)
    defaults = {**{f.name: f.default for f in fields(TrainConfig)}, **PRESETS[model]}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for f in fields(TrainConfig):
        default, choices = defaults[f.name], f.metadata["choices"]
        shown = f" (default: {_show(default)})"
        if f.type in (bool, "bool", bool | None, "bool | None"):
            parser.add_argument(cli.as_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f.metadata["help"] + shown)
        else:
            parser.add_argument(cli.as_flag(f.name), type=_parser_for(f.default), default=argparse.SUPPRESS,
                                choices=choices, help=f.metadata["help"] + shown)
    given = vars(parser.parse_args(argv))
    return TrainConfig(**{**PRESETS[model], **given})


def preset_name(argv) -> str:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", default=TrainConfig.model)
    model = pre.parse_known_args(argv)[0].model
    if model not in PRESETS:
        pre.error(f"argument --model: invalid choice: {model!r} (choose from {', '.join(PRESETS)})")
    return model


def _parser_for(default):
    """str -> value of the field's type; tuples are comma-separated."""
    if isinstance(default, tuple):
        item = type(default[0]) if default else int

        def items(s):
            return tuple(item(x) for x in s.split(",") if x)
        items.__name__ = f"comma-separated {item.__name__}"  # argparse's "invalid ... value" names it
        return items
    return type(default)


def _show(value):
    """A value as the command line writes it: tuples (and JSON's lists) comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def main(argv=None):
    """One line on stderr and exit status 1 for a refused run, as argparse does for a bad flag."""
    cfg = parse_args(argv)
    try:
        train(cfg)
    except torch.cuda.OutOfMemoryError:
        sys.exit("train.py: error: CUDA out of memory. Lower memory with --batch-size (e.g. 8), keep --grad-ckpt "
                 "on, or shorten examples; see README 'Memory'.")
    except (ValueError, TrainingError) as e:
        sys.exit(f"train.py: error: {e}")
    except OSError as e:  # a missing file, or an --out the system could not write (a full disk)
        sys.exit(f"train.py: error: {cli.os_error(e, '--out', cfg.out)}")


if __name__ == "__main__":
    main()
