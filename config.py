"""
What a training run is: TrainConfig, one dataclass whose fields are every setting train.py takes (each
field is a flag: `lora_r` is --lora-r), the presets that set the fields that differ between models, and
the checks that refuse a value no run could use, naming its flag, before anything is loaded or written.

    cfg = resolve(TrainConfig(**PRESETS["toy"], seed=3))   # what `python train.py --model toy --seed 3` runs
    cfg.target_layers, cfg.lora_layers                     # (2, 3), (0, 1, 2, 3): filled in by resolve

The presets' values are the official recipe's for Llama-3 and Mistral (GraySwanAI/circuit-breakers,
src/lorra_circuit_breaker.py and its scripts); docs/training.md lists them, and docs/differences.md says
where the toy and SmolLM2 presets depart from it, and why.
"""

import math
from dataclasses import dataclass, field, fields

import torch

import cli
import losses
from lora import TARGETS

# -----------------------------------------------------------------------------
# 1. The fields: one dataclass holds every default; train.py generates its command line from it.


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
                                       "official code), masked (mean over real tokens) or relative (each "
                                       "distance divided by the state's length, mean over real tokens; "
                                       "losses.py)", ("official", "masked", "relative"))
    retain_pad_to: int = opt(1024, "official retain normalisation: the padded row length it divides by "
                                   "(1024 officially, for rows that approach it)")
    retain_weight: float = opt(1.0, "multiplies the schedule's retain coefficient (1: the paper's schedule); "
                                    "with --retain-norm relative it sets the balance that pad_to sets "
                                    "officially")
    loss_on: str = opt("full", "tokens the rerouting loss sees: full (the whole text, official) or response",
                       ("full", "response"))
    ablate_direction: str = opt("", "a refusal.py direction file: the circuit-breaker rows' LoRA pass also runs "
                                    "with that direction ablated everywhere (the ablate attack; --ablate-mode), "
                                    "so that the rerouting cannot rest on it. A defence against that attack, "
                                    "not the paper's")
    ablate_mode: str = opt("alternate", "with --ablate-direction: alternate (every second step's rerouting term "
                                        "reads the ablated model instead of the plain one) or both (every "
                                        "step adds the ablated model's rerouting term to the plain one's)",
                           ("alternate", "both"))
    ablate_retain: bool = opt(False, "with --ablate-direction: every step, the retain rows run again with the "
                                     "direction ablated, their states held to the frozen model's under the same "
                                     "ablation (the orthogonalized model's), so that the ablated model keeps "
                                     "answering benign requests; its term adds to the logged retain loss. That "
                                     "pass is not checkpointed (as every ablated pass): more memory")
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
    compile: bool = opt(False, "torch.compile each block (off by default: on an H200 the packed step recompiled "
                               "nearly every step, BENCHMARKS.md; a block that fails to compile runs eagerly)")
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
    # The toy world (tools/toy.py), on a CPU; docs/toy.md, "What the toy needed", says how each value was
    # chosen. Two departures from the recipe: LoRA's B starts as small noise, so training leaves the zero-gradient
    # start deterministically (losses.py); the retain term divides by 128 padded positions, which the
    # toy's 37-token rows fill as the official rows (mean 324 tokens) fill 1024. XSTest x12 weighs its
    # 64 dish answers against 800 UltraChat conversations as the official x50 does.
    "toy": dict(model_path="toy/model", data_dir="toy/data", target_layers=(2, 3), loss_alpha=10.0,
                refusal_retain=True, with_request="random", steps=100, batch_size=8, lr=8.5e-4,
                lora_init_std=5e-2, retain_pad_to=128, n_ultrachat=2000, xstest_repeat=12, val_every=0,
                ckpt_every=0, log_every=10,
                threads=1),  # matrices this small gain nothing from threads; on a busy CPU they cost
    # A real chat model on 2 CPU cores (docs/smollm2.md, "The preset", says how each value was chosen):
    # the paper's relative depths (hidden states 10 and 20 of 30, LoRA on blocks 0-20), a set the model
    # wrote itself (`python tools/build_set.py`), no refusal retain (it does not refuse), and the toy's lesson
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


# -----------------------------------------------------------------------------
# 2. Resolving and checking a configuration, before anything is loaded


def resolve(cfg: TrainConfig, device_present: bool = True) -> TrainConfig:
    """Check every value (check_values), then fill the defaults that depend on other fields.
    device_present=False: the device need not be on this machine (counting FLOPs for it)."""
    check_values(cfg, device_present)
    cfg.out = cfg.out or f"out/{cfg.model}"
    if not cfg.lora_layers:
        cfg.lora_layers = tuple(range(max(cfg.target_layers) + 1))
    if cfg.grad_ckpt is None:
        cfg.grad_ckpt = cfg.device.startswith("cuda")
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
    "retain_pad_to": AT_LEAST_1, "retain_weight": POSITIVE,
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
        raise ValueError(f"{cli.as_flag('target_layers')} {show(cfg.target_layers)!r}: expected hidden-state indices "
                         "from 1 (0 is the embeddings, which LoRA cannot move), comma-separated")
    if cfg.lora_layers and min(cfg.lora_layers) < 0:
        raise ValueError(f"{cli.as_flag('lora_layers')} {show(cfg.lora_layers)}: expected block indices from 0")
    if cfg.micro_batch > cfg.batch_size:
        raise ValueError(f"--micro-batch {cfg.micro_batch}: expected at most --batch-size ({cfg.batch_size})")
    if cfg.ablate_mode != "alternate" and not cfg.ablate_direction:
        raise ValueError(f"--ablate-mode {cfg.ablate_mode}: expected --ablate-direction FILE beside it (the direction "
                         "to ablate)")
    if cfg.ablate_retain and not cfg.ablate_direction:
        raise ValueError("--ablate-retain: expected --ablate-direction FILE beside it (the direction to ablate)")
    unknown = [t for t in cfg.lora_targets if t not in TARGETS]
    if not cfg.lora_targets or unknown:
        raise ValueError(f"{cli.as_flag('lora_targets')} {show(cfg.lora_targets)!r}: expected some of {list(TARGETS)}")
    cli.check_seed(cfg.seed)
    if device_present:
        cli.check_device(cfg.device)


def show(value):
    """A value as the command line writes it: tuples (and JSON's lists) comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
