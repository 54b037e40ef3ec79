"""
Hugging Face and PEFT files: every on-disk format this project reads or writes.

A model directory, as the hub ships it and transformers' from_pretrained loads it:

    config.json         LlamaForCausalLM or MistralForCausalLM: hidden_size, num_hidden_layers,
                        num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, rms_norm_eps,
                        rope_theta, rope_scaling (Llama-3.1), sliding_window (Mistral v0.1),
                        tie_word_embeddings, bos/eos_token_id, torch_dtype. transformers >= 5 writes
                        rope_parameters and dtype instead, which older versions ignore (falling back to
                        theta 10000): both are read, the hub's keys are written.
    model.safetensors   every tensor under model.py's module names (model.layers.{i}.mlp.up_proj.weight, ...;
                        q/k rows in HF's order, loaded unpermuted), metadata {"format": "pt"}, without which
                        several transformers 4.x versions refuse the file
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json
                        the same in shards; the index is {"metadata": {"total_size": bytes},
                        "weight_map": {tensor name: shard file}}
    tokenizer files     read by tokenizer.py (Tokenizer.from_pretrained); copied along when a model is
                        exported (TOKENIZER_FILES)

A tied model stores no lm_head.weight; the rotary_emb.inv_freq buffers of old checkpoints are skipped.
Pickled weights (*.bin, *.pth, *.pt) are refused: unpickling can run code.

A PEFT LoRA adapter directory (peft 0.21, checked against peft itself by tests/test_hf.py):

    adapter_config.json
                        peft_type "LORA", r, lora_alpha, lora_dropout, target_modules (projection names),
                        layers_to_transform (block indices; null: all), bias "none", ... Only plain LoRA is
                        read: no DoRA, rsLoRA, per-layer ranks or extra saved modules.
    adapter_model.safetensors
                        base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight   (r, in)
                        base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_B.weight   (out, r)
                        fp32, metadata {"format": "pt"}; no adapter name in the keys (PEFT drops its
                        "default" on save and puts it back on load)

A merged export is a model directory whose adapted weights are W + (alpha / r) B A, with the base's
tokenizer files.

Every directory is written through `atomic_dir`, and every single output file (a record, a direction)
through `atomic_file`: into a temporary beside the target, moved into place once complete, so a crash
or a kill never leaves a half-written model, adapter, checkpoint or file where a reader would find it.
A directory's temporaries carry a marker, so that only they are ever removed, and the next write puts
back the newest complete directory a kill between atomic_dir's two renames left among them.

Read top to bottom: config.json, loading weights, writing directories and weights, PEFT adapters, the
merged export, and `load_model`, which puts them together, with the dtype names the command lines share.
"""

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora import PARENT, TARGETS, apply_lora, lora_modules, merge_lora
from model import ModelArgs, Transformer, projection_shapes
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# config.json


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


def read_config(path) -> dict:
    """A model directory's config.json."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (a Hugging Face model directory holds config.json)")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def read_json(path: Path):
    """A JSON file, with a bad byte or bad syntax reported as one ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def model_args(config: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a config.json dict; refuse what model.py does not implement. `source` names the
    file in error messages."""
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"{source}: architectures {archs} not supported; "
                         f"expected one of {list(SUPPORTED_ARCHITECTURES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} not supported; expected 'silu'")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{source}: biased projections are not supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in config:
            raise ValueError(f"{source}: missing field {key!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "num_key_value_heads", "head_dim", "sliding_window"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{source}: field {key!r} is {value!r}; expected a positive integer")
    for key in ("rms_norm_eps", "rope_theta"):
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{source}: field {key!r} is {value!r}; expected a positive number")
    theta, scaling = _read_rope(config, source)
    eos = config.get("eos_token_id")
    n_heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        ffn_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=config.get("sliding_window"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        bos_id=config.get("bos_token_id"),
        eos_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
    )


def _read_rope(config: dict, source: str) -> tuple[float, dict | None]:
    """Hub configs keep `rope_theta` and `rope_scaling` at top level; transformers >= 5 writes a
    `rope_parameters` block instead. Read either."""
    params = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} not supported; expected one of "
                             f"{list(SUPPORTED_ROPE_TYPES)}")
        if rope_type == "default":
            scaling = None
        else:
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in scaling:
                    raise ValueError(f"{source}: llama3 rope scaling lacks {key!r}")
    return float(theta), scaling


def load_tokenizer(path) -> Tokenizer:
    """The tokenizer of model directory `path`, refused when it makes ids past the model's embeddings
    (config.json's vocab_size): a tokenizer for another model. Reads no weights, so a command checks it
    before it loads any."""
    config_file = Path(path) / "config.json"
    vocab_size = model_args(read_config(path), source=str(config_file)).vocab_size
    tokenizer = Tokenizer.from_pretrained(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, but {config_file} gives the model "
                         f"{vocab_size} embeddings (a tokenizer for another model?)")
    return tokenizer


# -----------------------------------------------------------------------------
# Loading safetensors weights


def load_pretrained(path, dtype=torch.bfloat16, device="cpu", n_layers=None, lm_head=True) -> Transformer:
    """Load a HF checkpoint directory (config.json + model.safetensors or an indexed set of shards).
    n_layers=k loads only the first k blocks; lm_head=False skips the output head. The model is built
    on the meta device and tensors are assigned file by file, so peak memory is one copy of the
    weights; every name and shape is checked first, so an error never leaves a half-loaded model."""
    path = Path(path)
    config = read_config(path)
    args = model_args(config, source=str(path / "config.json"))
    n = args.n_layers if n_layers is None else n_layers
    if not 1 <= n <= args.n_layers:
        raise ValueError(f"n_layers={n_layers}, but {path / 'config.json'} has {args.n_layers} layers")
    with torch.device("meta"):
        model = Transformer(args, n_layers=n, lm_head=lm_head)
    model.config = config
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if lm_head and args.tie_word_embeddings:
        expected.pop("lm_head.weight")  # tied: the embedding matrix is the head

    state = {}
    for file, names in weight_files(path).items():
        with open_safetensors(file) as f:
            for name in names:
                if _skipped(name, n, args.n_layers, lm_head):
                    continue
                if name not in expected:
                    raise ValueError(f"{file}: unexpected tensor {name!r} for this model")
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(expected[name]):
                    raise ValueError(f"{file}: tensor {name!r} has shape {list(found)}, "
                                     f"expected {list(expected[name])}")
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if lm_head and args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def weight_files(path) -> dict[Path, list[str]]:
    """{safetensors file: tensor names in it}, from model.safetensors.index.json or model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: not a safetensors index: expected a 'weight_map' object of "
                             "tensor name -> shard file")
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            # A shard is a file name in the model directory: never a path that leads elsewhere.
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise ValueError(f"{index}: tensor {name!r} maps to {shard!r}; expected a file name inside {path}")
            files.setdefault(path / shard, []).append(name)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index}: lists shard {file.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as f:
            return {single: list(f.keys())}
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
    if pickled:
        raise ValueError(f"{path}: only pickled weights found ({pickled[0]}); pickles can run code when "
                         "loaded, so this project reads safetensors only (download the .safetensors files)")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _skipped(name: str, n_loaded: int, n_total: int, lm_head: bool) -> bool:
    """Tensors a truncated or headless load leaves on disk, and buffers old checkpoints carry."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if name == "lm_head.weight":
        return not lm_head
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and n_loaded <= int(m.group(1)) < n_total


@contextmanager
def open_safetensors(file):
    """safe_open on the CPU; a truncated or corrupt file is one ValueError naming it (safetensors checks
    the header against the file's size when it opens it)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_safetensors(file) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    with open_safetensors(file) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


# -----------------------------------------------------------------------------
# Writing files, directories and safetensors weights


TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json", "generation_config.json")


@contextmanager
def atomic_dir(out_dir):
    """Yield a fresh directory to write into; when the block ends, it becomes out_dir, and an older
    out_dir is removed only after the new one is in place. On any exception it is removed and out_dir is
    left as it was. Readers thus only ever see a complete directory.

    It lies inside a temporary of its own beside out_dir, .{name}.<random>/, which holds MARKER: only
    directories so marked are ever removed or recovered, never a user's .{name}.backup/. A writer killed
    outright leaves at most its temporaries, which the next atomic_dir(out_dir) settles (recover)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    work = _temporary(out_dir, "writing")
    tmp = work / out_dir.name
    tmp.mkdir()
    tmp.chmod(0o755)  # what it becomes is an ordinary directory, whatever the umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _mark(work, "complete")
    # A directory cannot be renamed over a non-empty one: move the old one aside first, into a temporary
    # of its own. A kill between the two renames leaves both complete; recover() puts the new one in place.
    aside = None
    if out_dir.exists():
        aside = _temporary(out_dir, "previous")
        os.replace(out_dir, aside / out_dir.name)
    os.replace(tmp, out_dir)
    for done in (work, aside):
        if done is not None:
            shutil.rmtree(done, ignore_errors=True)


# The file in each temporary of atomic_dir's: {"writer": "hf.atomic_dir", "state": ..., "time_ns": ...}.
# "writing": its directory may be incomplete. "complete": the block ended; its directory is the newest
# output. "previous": it holds the out_dir that the complete one replaces.
MARKER = "atomic_dir.json"
STATES = ("writing", "complete", "previous")


def temporaries(out_dir) -> list[Path]:
    """The temporaries atomic_dir(out_dir) made beside out_dir: directories .{name}.<random> holding its
    MARKER. A directory of the user's, whatever its name, is none of them."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.iterdir()
                  if p.name.startswith(f".{out_dir.name}.") and _state(p) is not None)


def recoverable(out_dir) -> Path | None:
    """Where out_dir's content is, reading only: out_dir itself; where a kill between atomic_dir's two
    renames left no out_dir, the newest complete directory among its temporaries (a completed new one
    before the previous one moved aside), as train.py's resume picks the newest complete checkpoint;
    else None."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    found = [(state["state"] == "complete", state["time_ns"], p / out_dir.name)
             for p in temporaries(out_dir)
             if (state := _state(p))["state"] != "writing" and (p / out_dir.name).exists()]
    return max(found)[2] if found else None


def recover(out_dir):
    """Put in place what recoverable(out_dir) finds, then remove every temporary atomic_dir(out_dir) left."""
    out_dir = Path(out_dir)
    found = recoverable(out_dir)
    if found is not None and found != out_dir:
        os.replace(found, out_dir)
    for stale in temporaries(out_dir):
        shutil.rmtree(stale, ignore_errors=True)


def _temporary(out_dir: Path, state: str) -> Path:
    """A new marked temporary beside out_dir. A kill before its marker is written leaves it unmarked, so
    never removed: a leftover empty directory, never a lost one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    _mark(tmp, state)
    return tmp


def _mark(tmp: Path, state: str):
    part = tmp / (MARKER + ".part")
    part.write_text(json.dumps({"writer": "hf.atomic_dir", "state": state, "time_ns": time.time_ns()}))
    os.replace(part, tmp / MARKER)  # a marker is whole or the one before it


def _state(tmp: Path) -> dict | None:
    """A temporary's marker; None for a directory atomic_dir did not make (or anything else)."""
    if tmp.is_symlink() or not (tmp / MARKER).is_file():
        return None
    try:
        state = json.loads((tmp / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(state, dict) or state.get("writer") != "hf.atomic_dir" or state.get("state") not in STATES
            or not isinstance(state.get("time_ns"), int)):
        return None
    return state


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` to write; when the block ends it replaces `path`. On any
    exception it is removed, and an earlier file at `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp (and safetensors) make it private; what it becomes is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict, file, metadata: dict):
    """safetensors' save_file, giving equal files for equal content. safetensors orders the tensors by
    dtype and name, but writes the metadata in the order of a Rust hash map, which differs from one call
    to the next: two identical training runs wrote different adapter files. The header is rewritten in
    place with the metadata sorted; moving keys keeps its length, so the tensors' offsets hold."""
    save_file(tensors, str(file), metadata=metadata)
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")  # the header's length, then the header: JSON padded with spaces
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:
            raise ValueError(f"{file}: safetensors wrote a header of another spelling; cannot sort its metadata")
        f.seek(8)
        f.write(text.ljust(n))


def save_pretrained(out_dir, state_dict: dict, config: dict, max_shard_size: int = 5 * 2**30,
                    tokenizer_from=None):
    """Write a HF checkpoint directory: config.json and model.safetensors, or shards with an index, and
    the tokenizer files of model directory `tokenizer_from` if given. Written atomically (atomic_dir)."""
    config = hub_config(config, next(iter(state_dict.values())).dtype)
    if config.get("tie_word_embeddings"):
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    shards = _shard(state_dict, max_shard_size)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weight_map = {}
        for shard, name in zip(shards, names):
            # "format": "pt" is required by several transformers 4.x versions.
            save_safetensors({k: v.detach().contiguous() for k, v in shard.items()}, tmp / name, {"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(v.numel() * v.element_size() for v in state_dict.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_from is not None:
            for rel in TOKENIZER_FILES:
                if (Path(tokenizer_from) / rel).is_file():
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(Path(tokenizer_from) / rel, tmp / rel)


def hub_config(config: dict, dtype: torch.dtype) -> dict:
    """The hub's keys (rope_theta, rope_scaling, torch_dtype): older transformers and serving stacks
    ignore transformers 5's rope_parameters and would silently fall back to theta 10000."""
    config = dict(config)
    params = config.pop("rope_parameters", None) or {}
    config.setdefault("rope_theta", params.get("rope_theta", 10000.0))
    if params.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in params.items() if k != "rope_theta"})
    config.pop("dtype", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def _shard(state_dict: dict, max_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]


# -----------------------------------------------------------------------------
# PEFT LoRA adapters


PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> our model's names
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# Our adapters record their base model's depth in the safetensors header (PEFT ignores it), so that an
# adapter for a shallower model of the same width is refused, not silently applied to the first blocks.
BASE_LAYERS_KEY = "base_model_n_layers"
_ADAPTER_KEY = re.compile(re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


class AdapterKey(NamedTuple):
    """The name of one adapter tensor, taken apart."""

    layer: int  # block index
    parent: str  # "self_attn" or "mlp"
    target: str  # the projection: "q_proj", ..., "down_proj"
    part: str  # "A" (r, in) or "B" (out, r)

    @property
    def module(self) -> str:
        """The LoRALinear's name in our model, e.g. 'model.layers.3.mlp.up_proj'."""
        return f"model.layers.{self.layer}.{self.parent}.{self.target}"


def adapter_key(name: str) -> AdapterKey | None:
    """'base_model.model.model.layers.3.mlp.up_proj.lora_A.weight' -> AdapterKey(3, 'mlp', 'up_proj', 'A');
    None for any name that is not a LoRA matrix of a block's projection."""
    m = _ADAPTER_KEY.fullmatch(name)
    return None if m is None else AdapterKey(int(m[1]), m[2], m[3], m[4])


def save_adapter(model, out_dir, base_model_name_or_path: str | None = None):
    """Write the model's LoRA layers as PEFT does (adapter_config.json + adapter_model.safetensors),
    atomically (atomic_dir), so an interrupted save never leaves a half-written adapter."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA layers")
    first = next(iter(modules.values()))
    for name, m in modules.items():
        if (m.r, m.alpha, m.lora_dropout.p) != (first.r, first.alpha, first.lora_dropout.p):
            raise ValueError(f"save_adapter: {name} has r/alpha/dropout {m.r}/{m.alpha}/{m.lora_dropout.p}, "
                             f"others {first.r}/{first.alpha}/{first.lora_dropout.p}; PEFT's file holds one")
    tensors = {}
    for name, m in modules.items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(m, part).weight
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = weight.detach().to("cpu", torch.float32).contiguous()
    keys = [adapter_key(name) for name in tensors]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p,
        "target_modules": sorted({k.target for k in keys}),
        "layers_to_transform": sorted({k.layer for k in keys}),
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors(tensors, tmp / WEIGHTS_FILE, {"format": "pt", BASE_LAYERS_KEY: str(model.args.n_layers)})


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked for what lora.py implements (plain LoRA on named projections)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"{adapter_dir}: no such adapter directory")
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a PEFT adapter directory holds {CONFIG_FILE})")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path}: missing field {key!r}")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if cfg.get(key, plain) != plain:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (only plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} is not supported (one r and alpha for every layer)")
    targets = cfg["target_modules"]
    if not isinstance(targets, list) or any(t not in TARGETS for t in targets):
        raise ValueError(f"{path}: target_modules {targets!r} not supported; expected a list drawn from "
                         f"{list(TARGETS)}")
    layers = cfg.get("layers_to_transform")
    cfg["layers_to_transform"] = [layers] if isinstance(layers, int) else layers
    return cfg


def check_adapter(adapter_dir, model_path):
    """Refuse an adapter made for another base model, from config.json and the safetensors header alone
    (no weight is read): its recorded base model, its layer indices and every tensor shape."""
    adapter_dir, model_path = Path(adapter_dir), Path(model_path)
    cfg = read_adapter_config(adapter_dir)
    args = model_args(read_config(model_path), source=str(model_path / "config.json"))
    base = cfg.get("base_model_name_or_path")
    if base and Path(str(base)).name not in (model_path.resolve().name, model_path.absolute().name):
        raise ValueError(f"{adapter_dir / CONFIG_FILE}: made for base model {base!r}, not "
                         f"{str(model_path)!r} (pass that base model's directory as --model-path)")
    weights = _adapter_weights(adapter_dir)
    out_in, r = projection_shapes(args), cfg["r"]
    with open_safetensors(weights) as f:
        made_for = (f.metadata() or {}).get(BASE_LAYERS_KEY)
        for name in f.keys():
            key = adapter_key(name)
            if key is None or key.target not in out_in:
                raise ValueError(f"{weights}: unexpected tensor {name!r}")
            if key.layer >= args.n_layers:
                raise ValueError(f"{weights}: {name} is for layer {key.layer}, but {model_path} has "
                                 f"{args.n_layers} layers (an adapter for another base model?)")
            out_features, in_features = out_in[key.target]
            want = (r, in_features) if key.part == "A" else (out_features, r)
            found = tuple(f.get_slice(name).get_shape())
            if found != want:
                raise ValueError(f"{weights}: {name} has shape {list(found)}, but {model_path} needs "
                                 f"{list(want)} (an adapter for another base model?)")
    if made_for is not None and made_for != str(args.n_layers):
        raise ValueError(f"{weights}: made for a base model of {made_for} layers, but {model_path} has "
                         f"{args.n_layers} (an adapter for another base model?)")


def _adapter_weights(adapter_dir: Path) -> Path:
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        found = "adapter_model.bin is pickled; this project reads safetensors only" \
            if (adapter_dir / "adapter_model.bin").is_file() else "missing"
        raise FileNotFoundError(f"{weights}: {found}")
    return weights


def load_adapter(model, adapter_dir):
    """Load a PEFT LoRA adapter into the model (adding the LoRA layers if it has none). Every tensor's
    name and shape is checked first: an adapter made for another base model fails with a clear message
    and leaves the model untouched. Returns the model."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = _adapter_weights(adapter_dir)
    n_blocks = len(model.model.layers)
    layers = cfg["layers_to_transform"]
    layers = list(range(n_blocks)) if layers is None else layers
    if max(layers) >= n_blocks:
        raise ValueError(f"{adapter_dir / CONFIG_FILE}: LoRA on layer {max(layers)}, but the model has "
                         f"{n_blocks} blocks loaded (an adapter for a deeper model, or load more layers)")

    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_safetensors(weights).items()}
    expected = _expected_adapter_shapes(model, cfg["r"], cfg["target_modules"], layers)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {PEFT_PREFIX}{missing[0]}" if missing else f"has unexpected {PEFT_PREFIX}{unexpected[0]}"
        raise ValueError(f"{weights}: {what} (the tensors and {CONFIG_FILE}'s target_modules and "
                         "layers_to_transform disagree)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights}: {PEFT_PREFIX}{name} has shape {list(tensors[name].shape)}, the model "
                             f"expects {list(shape)} (an adapter for another base model?)")

    if not lora_modules(model):
        apply_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), cfg["target_modules"], layers)
    have = lora_modules(model)
    wanted = {name.rsplit(".", 2)[0] for name in expected}
    if set(have) != wanted or any((m.r, m.alpha) != (cfg["r"], cfg["lora_alpha"]) for m in have.values()):
        raise ValueError(f"{adapter_dir}: the model already has LoRA layers that differ from this adapter's")
    with torch.no_grad():
        for name, m in have.items():
            m.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
            m.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
    return model


def _expected_adapter_shapes(model, r, targets, layers) -> dict[str, tuple]:
    """{'model.layers.i.<parent>.<target>.lora_A.weight': (r, in), ...lora_B.weight: (out, r)}."""
    shapes = {}
    for i in layers:
        for t in targets:
            name = f"model.layers.{i}.{PARENT[t]}.{t}"
            out_features, in_features = model.get_submodule(name).weight.shape
            shapes[f"{name}.lora_A.weight"] = (r, in_features)
            shapes[f"{name}.lora_B.weight"] = (out_features, r)
    return shapes


# -----------------------------------------------------------------------------
# Export of the merged model
#
# Training loads only the first blocks, so the trained model cannot write a whole checkpoint. Only the
# LoRA-wrapped weights changed, though, so the export is the base checkpoint read tensor by tensor with
# W + (alpha / r) B A in place of each adapted weight: later blocks, final norm and lm_head come
# unchanged from the base files, in the base's dtype.


def export_merged(base_path, adapter_or_model, out_dir, max_shard_size: int = 5 * 2**30):
    """Write base + adapter as a HF model directory that transformers' from_pretrained loads: config.json
    with the hub's keys, safetensors shards with an index, and the base's tokenizer files.

    adapter_or_model: a PEFT adapter directory, or a model carrying LoRA layers (not modified).
    Holds one copy of the full model in CPU memory while writing (16 GB for Llama-3-8B in bf16).
    """
    base_path = Path(base_path)
    config = read_config(base_path)
    deltas = (_deltas_from_model(adapter_or_model) if isinstance(adapter_or_model, nn.Module)
              else _deltas_from_adapter(adapter_or_model))
    state = {}
    for file, names in weight_files(base_path).items():
        with open_safetensors(file) as f:
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                t = f.get_tensor(name)
                if name in deltas:
                    delta = deltas.pop(name)
                    if delta.shape != t.shape:
                        raise ValueError(f"{file}: tensor {name!r} has shape {list(t.shape)}, the adapter's "
                                         f"update has {list(delta.shape)} (an adapter for another base model?)")
                    t = (t.float() + delta).to(t.dtype)
                state[name] = t
    if deltas:
        raise ValueError(f"{base_path}: no tensor {next(iter(deltas))!r} for the adapter to update")
    save_pretrained(out_dir, state, config, max_shard_size, tokenizer_from=base_path)


@torch.no_grad()
def _deltas_from_model(model) -> dict[str, torch.Tensor]:
    """{'model.layers.i.self_attn.q_proj.weight': (alpha / r) B A on the CPU, fp32}."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("export_merged: the model has no LoRA layers")
    return {f"{name}.weight": m.delta().cpu() for name, m in modules.items()}


def _deltas_from_adapter(adapter_dir) -> dict[str, torch.Tensor]:
    """The same, from a PEFT adapter directory."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = _adapter_weights(adapter_dir)
    scale = cfg["lora_alpha"] / cfg["r"]
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": (r, in), "B": (out, r)}
    for name, tensor in read_safetensors(weights).items():
        key = adapter_key(name)
        if key is None:
            raise ValueError(f"{weights}: unexpected tensor {name!r}")
        pairs.setdefault(key.module, {})[key.part] = tensor.float()
    deltas = {}
    for module, ab in pairs.items():
        A, B = ab.get("A"), ab.get("B")
        if A is None or B is None or B.shape[1] != A.shape[0]:
            raise ValueError(f"{weights}: {PEFT_PREFIX}{module} lacks a lora_A and lora_B of matching rank")
        deltas[f"{module}.weight"] = scale * (B @ A)  # (out, r) @ (r, in) -> (out, in)
    if not deltas:
        raise ValueError(f"{weights}: no lora_A tensors")
    return deltas


# -----------------------------------------------------------------------------
# Loading a model for use


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the --dtype names


def pick_dtype(name: str, device: str) -> torch.dtype:
    """A --dtype value: a name from DTYPES, or "auto": bf16 on CUDA (the dtype the checkpoints ship in),
    fp32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected auto or one of {list(DTYPES)}")
    return DTYPES[name]


def load_model(path, *, dtype: torch.dtype, device, n_layers=None, lm_head=True, adapter=None,
               merge=True) -> Transformer:
    """A checkpoint (load_pretrained), with a PEFT adapter on top if given: merged into the weights, or
    kept as LoRA layers (merge=False) that lora_disabled can switch off. The adapter is checked against
    the checkpoint (check_adapter) before any weight is read, so a mismatch fails fast."""
    if adapter is not None:
        check_adapter(adapter, path)
    model = load_pretrained(path, dtype=dtype, device=device, n_layers=n_layers, lm_head=lm_head)
    if adapter is not None:
        load_adapter(model, adapter)
        if merge:
            merge_lora(model)
    return model
