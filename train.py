"""
Train circuit breakers (Representation Rerouting, Zou et al. 2024) with LoRA, in one plain loop.

    python train.py --model llama3                   # the paper's Llama-3-8B-Instruct recipe, one GPU
    python train.py --model mistral                  # Mistral-7B-Instruct-v0.2
    python train.py --model toy                      # the toy world: builds it, then trains, on a CPU
    python train.py --model llama3 --loss-alpha 8    # every TrainConfig field below is a flag
    python train.py --model llama3 --resume          # continue from <out>/checkpoint
    python train.py --model llama3 --loss direction --direction direction.safetensors
    python train.py --model llama3 --ablate-direction direction.safetensors   # trained against ablation

Each step: the frozen model's residual states (the same weights with the adapters switched off, no
gradient), then the LoRA model's states on the same tokens; the rerouting term pushes the harmful
(circuit-breaker) states away from where they were, the retain term keeps the harmless states in place,
and a schedule moves the weight from the first to the second. Outputs in <out>/: adapter/ (PEFT
format), run.json (the resolved configuration), metrics.jsonl, and with --merge merged/ (a HF model).
Every flag and input file is checked before anything is written to <out>: a refused run exits with one line
naming what is wrong and leaves an earlier run's outputs as they were.

What a run is (TrainConfig, the presets, the checks of every value) is config.py. This file follows the
steps of a run: 1 model and LoRA, 2 data, 3 the loss of one step, 4 checkpoints, 5 the loop, 6 the
command line.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

import checkpoint
import cli
import data
import hf
import losses
import refusal
from config import HUB_IDS, PRESETS, TrainConfig, resolve, show
from lora import apply_lora, lora_disabled, lora_modules
from model import ModelArgs, Transformer

# -----------------------------------------------------------------------------
# 1. Model and LoRA


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
        raise ValueError(f"--target-layers {show(cfg.target_layers)}: expected hidden-state indices 1..{n} "
                         f"({config_file} has {n} layers)")
    if max(cfg.lora_layers) >= n:
        raise ValueError(f"--lora-layers {show(cfg.lora_layers)}: expected block indices 0..{n - 1} ({config_file} "
                         f"has {n} blocks; without --lora-layers, LoRA goes on 0..max(--target-layers))")
    return args


def build_model(cfg: TrainConfig) -> Transformer:
    model = hf.load_model(cfg.model_path, dtype=hf.pick_dtype(cfg.dtype, cfg.device), device=cfg.device,
                          n_layers=n_blocks_needed(cfg), lm_head=False)  # training never reads logits
    return prepare_model(model, cfg)


def prepare_model(model: Transformer, cfg: TrainConfig) -> Transformer:
    """The base model as training runs it: LoRA, gradient checkpointing, and compiled blocks with --compile."""
    torch.manual_seed(cfg.seed)  # LoRA A initialisation
    apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets,
               layers=cfg.lora_layers, b_std=cfg.lora_init_std)
    model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.compile:
        # Where compiling fails (no compiler, an unsupported op), the block runs eagerly: slower, same result.
        torch._dynamo.config.suppress_errors = True
        for block in model.model.layers:
            # Lengths vary from batch to batch: dynamic shapes; packed attention's loop over the rows stays
            # outside the graph (model.packed_attention), so a new number of rows is no new graph.
            block.compile(dynamic=True)
    return model


# -----------------------------------------------------------------------------
# 2. Data: see data.py for the formatting, masks and padding.


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
# 3. The loss of one step
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


def ablated_direction(cfg: TrainConfig, model):
    """--ablate-direction's unit direction (D,), read once; None without it."""
    if not cfg.ablate_direction:
        return None
    try:
        return refusal.load_direction(cfg.ablate_direction, model.args).direction
    except (OSError, ValueError) as e:
        raise ValueError(f"--ablate-direction {e}") from None


@contextlib.contextmanager
def ablated(model, direction):
    """The model as the ablate attack runs it (refusal.ablate: `direction` projected out of every block's
    input and outputs), its blocks not checkpointed: a checkpointed block runs its forward again in the
    backward pass, after the ablation's hooks are gone, and would give the gradients of another model."""
    checkpointing, model.gradient_checkpointing = model.gradient_checkpointing, False
    try:
        with refusal.ablate(model, direction):
            yield
    finally:
        model.gradient_checkpointing = checkpointing


def step_loss(model, batch, step: int, cfg: TrainConfig, rerouting, whole=None, ablation=None):
    """The circuit-breaker objective for one batch -> (loss, metrics). See losses.py for the math.

    whole: the step's whole batch when `batch` is one of its micro-batches (--micro-batch). Each mean is
    then weighted by this piece's share of the whole batch's tokens (rows, for the official retain term),
    so that the pieces' losses, gradients and metrics add up to the whole batch's.
    ablation: --ablate-direction's direction, under which the circuit-breaker rows run again (--ablate-mode
    both) or instead, every second step (alternate), and the retain rows run again (--ablate-retain)."""
    cb_coeff, retain_coeff = losses.coefficients(step, cfg.steps, cfg.loss_alpha)
    retain_coeff *= cfg.retain_weight
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

    # (b) where the LoRA model's states are, with gradients. With --ablate-direction, the harmful states of
    # the model with the refusal direction ablated, as the ablate attack runs it, are rerouted too: the
    # frozen states stay the plain model's, so the adapter must move harmful states that no longer carry
    # the direction, and cannot stop them by writing it. `alternate` reroutes them instead of the plain
    # states every second step; `both` adds their term to the plain one's every step.
    alternate = ablation is not None and cfg.ablate_mode == "alternate"
    with ablated(model, ablation) if alternate and step % 2 == 0 else contextlib.nullcontext():
        cb_new = cb_states(model, batch.cb_tokens, cfg, **cb_run)
    retain_new = retain_states(model, batch.retain_tokens, **retain_run)

    # (c) the two terms, weighted by the schedule
    cb_loss = rerouting(cb_new, cb_orig, batch.cb_loss_mask) * cb_share
    if ablation is not None and cfg.ablate_mode == "both":
        with ablated(model, ablation):
            cb_ablated = cb_states(model, batch.cb_tokens, cfg, **cb_run)
        cb_loss = cb_loss + rerouting(cb_ablated, cb_orig, batch.cb_loss_mask) * cb_share
    retain_loss = retain_term(retain_new, retain_orig, batch, whole, retain_share, cfg)
    if ablation is not None and cfg.ablate_retain:
        # The ablated model's benign states held to the frozen model's under the same ablation (the
        # orthogonalized model's): without it, rerouting the ablated model can break it on every input.
        with torch.no_grad(), lora_disabled(model), refusal.ablate(model, ablation):
            retain_orig_ablated = retain_states(model, batch.retain_tokens, **retain_run)
        with ablated(model, ablation):
            retain_ablated = retain_states(model, batch.retain_tokens, **retain_run)
        retain_loss = retain_loss + retain_term(retain_ablated, retain_orig_ablated, batch, whole, retain_share, cfg)
    loss = cb_coeff * cb_loss + retain_coeff * retain_loss

    # Metrics stay on the device (0-d tensors), read all at once after the step's backward (on_host).
    at_targets = lambda states: [states[l] for l in cfg.target_layers]  # noqa: E731
    cb_cos = losses.cosine_mean(cb_new, cb_orig, batch.cb_loss_mask)
    retain_cos = losses.cosine_mean(at_targets(retain_new), at_targets(retain_orig), batch.retain_mask)
    metrics = dict(loss=loss.detach(), cb_loss=cb_loss.detach(), retain_loss=retain_loss.detach(),
                   cb_coeff=cb_coeff, retain_coeff=retain_coeff, cb_cos=cb_cos * cb_share,
                   retain_cos=retain_cos * retain_share)
    return loss, metrics


def retain_term(retain_new, retain_orig, batch, whole, retain_share, cfg: TrainConfig):
    """The retain term of --retain-norm for one batch, or for one piece of `whole` weighted by its share."""
    if cfg.retain_norm == "official":
        # Rows, not tokens: a padded whole batch's rows are its examples; packed or in pieces, say how many.
        n_rows = None if whole is None and batch.retain_lengths is None else (whole or batch).size
        return losses.retain_loss_official(retain_new, retain_orig, batch.retain_mask,
                                           pad_to=cfg.retain_pad_to, n_rows=n_rows)
    relative = cfg.retain_norm == "relative"
    return losses.retain_loss(retain_new, retain_orig, batch.retain_mask, relative=relative) * retain_share


def share(part, whole):
    """The fraction of `whole`'s ones (a mask) that `part` holds: a micro-batch's weight in a token mean."""
    return part.sum() / whole.sum().clamp_min(1)


def step_gradients(model, batch, step: int, cfg: TrainConfig, rerouting, autocast, ablation=None) -> dict:
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
            loss, m = step_loss(model, piece, step, cfg, rerouting, whole, ablation)
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
# 4. Checkpoints: see checkpoint.py. Before one is saved, the weights are checked.


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
# 5. The loop


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
    ablation = ablated_direction(cfg, model)
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
        m = step_gradients(model, batch, step, cfg, rerouting, autocast, ablation)
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
# 6. The command line, generated from TrainConfig (config.py)


def parse_args(argv=None) -> TrainConfig:
    """The preset is read first, so that --help shows the values this run would use."""
    model = preset_name(argv)
    defaults = {**{f.name: f.default for f in fields(TrainConfig)}, **PRESETS[model]}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for f in fields(TrainConfig):
        default, choices = defaults[f.name], f.metadata["choices"]
        shown = f" (default: {show(default)})"
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


def main(argv=None):
    """One line on stderr and exit status 1 for a refused run, as argparse does for a bad flag."""
    cfg = parse_args(argv)
    try:
        train(cfg)
    except torch.cuda.OutOfMemoryError:
        sys.exit("train.py: error: CUDA out of memory. Lower memory with --batch-size (e.g. 8), keep --grad-ckpt "
                 "on, or shorten examples, or run the batch in pieces with --micro-batch 4 (the same gradients).")
    except (ValueError, TrainingError) as e:
        sys.exit(f"train.py: error: {e}")
    except OSError as e:  # a missing file, or an --out the system could not write (a full disk)
        sys.exit(f"train.py: error: {cli.os_error(e, '--out', cfg.out)}")


if __name__ == "__main__":
    main()
