"""Training checkpoints: what --ckpt-every saves and --resume continues from.

A checkpoint is a directory: the adapter (PEFT format), optimizer and RNG state as safetensors, then the
step and the configuration in trainer.json, written last. It is written to a temporary directory and
renamed (hf.atomic_dir), so a kill mid-write leaves the previous one intact. Batches are a pure function
of (seed, step), so the step is the whole data position.
"""

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

import cli
import hf


class Checkpoint(NamedTuple):
    path: Path
    step: int     # the last completed step
    config: dict  # the TrainConfig it was written with, as JSON


def save_checkpoint(path: Path, model, optimizer, step: int, cfg):
    """cfg: the run's TrainConfig."""
    state = {}
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            state[f"optimizer.{i}.{k}"] = torch.as_tensor(v).cpu()
    state["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng.cuda"] = torch.cuda.get_rng_state()
    with hf.atomic_dir(path) as tmp:
        hf.save_adapter(model, tmp / "adapter", base_model_name_or_path=cfg.model_path)
        hf.save_safetensors(state, tmp / "trainer.safetensors", {"format": "pt"})
        (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}, indent=2))


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint directory's trainer.json. It is written last: a directory whose trainer.json parses
    is complete."""
    file = path / "trainer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (expected {file})")
    state = hf.read_json(file)
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"{file}: expected an object whose 'step' is the last completed step, found {step!r}")
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{file}: expected a 'config' object, the settings the run was made with")
    return Checkpoint(path, step, state["config"])


def find_checkpoint(out: Path) -> Checkpoint:
    """The checkpoint --resume continues from: <out>/checkpoint, or where a kill between the two renames of
    hf.atomic_dir left none, the newest complete one among its temporaries (hf.recoverable). Reads only:
    put_in_place moves it."""
    ckpt = out / "checkpoint"
    found = hf.recoverable(ckpt)
    if found is None:
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from (expected {ckpt / 'trainer.json'})")
    return read_checkpoint(found)


# Fields that do not change what training computes, so a resumed run may change them. Every other field
# must be the checkpoint's, or the resumed run would silently be another run (the schedule depends on
# steps, the batches on seed and batch size, ...). A future field that changes only how a step is
# computed, not its result, belongs here too. `pack` and `micro_batch` do not: they give the same losses
# and gradients, but LoRA dropout draws its masks over tensors of other shapes, so the run would differ.
FREE_ON_RESUME = ("out", "resume", "threads", "log_every", "val_every", "val_batches", "ckpt_every", "compile",
                  "grad_ckpt", "merge")


def check_resumable(cfg, found: Checkpoint):
    """Refuse to resume with settings that change the result, naming each with both values."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as the lists trainer.json holds
    changed = [name for name, value in now.items()
               if name not in FREE_ON_RESUME and (name not in found.config or found.config[name] != value)]
    if changed:
        def was(name):
            return show(found.config[name]) if name in found.config else "(not recorded)"
        raise ValueError(f"--resume: {found.path / 'trainer.json'} was written with other settings: "
                         + "; ".join(f"{cli.as_flag(name)} {was(name)} there, {show(now[name])} now"
                                     for name in changed)
                         + ". Resume with the checkpoint's values, or train afresh into another --out")


def load_checkpoint(path: Path, model, optimizer):
    """Restore adapter, optimizer and RNG state."""
    hf.load_adapter(model, path / "adapter")
    file = path / "trainer.safetensors"
    tensors = hf.read_safetensors(file)
    if "rng.cpu" not in tensors:
        raise ValueError(f"{file}: no 'rng.cpu' tensor (not a train.py checkpoint?)")
    opt_state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, i, k = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[k] = value.to(
                value.device if k == "step" else next(model.parameters()).device)
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def put_in_place(ckpt: Path):
    """Make the checkpoint find_checkpoint found <out>/checkpoint, and remove the temporaries beside it."""
    hf.recover(ckpt)


def keep_metrics_until(path: Path, step: int):
    """Keep the rows of steps up to `step`; drop later ones and a line that a kill cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, TypeError, KeyError):
            pass  # not a whole row
    with hf.atomic_file(path) as tmp:
        tmp.write_text("".join(kept))


def show(value) -> str:
    """A setting as the command line spells it: lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
