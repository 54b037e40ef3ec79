"""
What the command lines of eval.py, refusal.py and bench.py share, and every command's seed check. A flag
and the parameter it feeds have one name (`--max-length` feeds `max_length`), so the function's signature
holds the default, and a command calls its function with the flags of the same names. Bad flags are
refused before any model is loaded (a run that fails at its last step loses hours of generation), and
output files are written whole or not at all (hf.atomic_file).
"""

import inspect
import json
import os
from pathlib import Path

import torch

import hf


def keyword_defaults(fn) -> dict:
    """{parameter: default} of fn: the defaults of the flags that feed it."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def call(fn, args, **values):
    """fn called with the parsed flags named like its parameters, and with `values`."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in vars(args).items() if k in names}, **values)


def add_model_flags(p, adapter_required=False, required=True):
    """The flags of the model under evaluation."""
    p.add_argument("--model-path", required=required, help="base model directory (HF format)")
    p.add_argument("--adapter", required=adapter_required, help="PEFT adapter directory from train.py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", *hf.DTYPES], help="auto: bf16 on CUDA, fp32 on CPU")
    add_threads_flag(p)


def add_threads_flag(p, default: int = 0):
    p.add_argument("--threads", type=int, default=default, help=f"CPU threads for torch (0: torch's default, one "
                   f"per core; default {default}). On a machine other jobs share, fewer: threads that wait for "
                   "each other on a busy CPU cost more than they add")


def use_threads(threads: int):
    """Refuse a negative --threads, then give torch that many CPU threads (0: leave torch's default)."""
    check_least(threads, 0, "--threads")
    if threads:
        torch.set_num_threads(threads)


def check_device(device: str):
    """Refuse a device that does not parse, or a GPU this machine does not have."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; expected cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def check_flags(args, minimums: dict, outputs: dict):
    """What every command checks before it loads a model: the device, the least value of each counting
    flag ({dest: least}), and each output path given ({dest: True for a directory, False for a file})."""
    check_device(args.device)
    for dest, least in minimums.items():
        check_least(getattr(args, dest, None), least, as_flag(dest))
    for dest, directory in outputs.items():
        if getattr(args, dest, None) is not None:
            check_output(getattr(args, dest), as_flag(dest), directory)


def check_least(value, least, flag: str):
    """Refuse a counting flag below its least value (None: not given)."""
    if value is not None and value < least:
        raise ValueError(f"{flag} {value}: must be at least {least}")


def as_flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# torch's generators take a seed of 64 bits; a larger one would fail deep in the run, naming no flag.
MAX_SEED = 2**64 - 1


def check_seed(seed: int, flag: str = "--seed"):
    """Refuse a seed torch cannot take, naming the flag (every command with a seed checks it here)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{flag} {seed}: expected a whole number from 0 to 2**64 - 1")


def check_output(path, flag: str, directory: bool = False):
    """Refuse an output path that cannot be written: a directory where a file goes (or the reverse), a
    path under a regular file, or one this user may not write (check_writable)."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{flag} {path}: is a {'file' if directory else 'directory'}; expected "
                         f"{'a directory' if directory else 'a file'} to write")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, not a directory")
    check_writable(path, flag, directory)


def check_writable(path, flag: str, directory: bool = False):
    """Refuse an output this user may not write, before any work: a read-only directory would otherwise fail
    only at the end, after hours of generation or training. What is checked is the directory the output is
    written into: a directory output itself, when it exists (train.py writes into it, and moving it aside
    rewrites its '..'); else the nearest existing directory above it, where the missing ones will be made."""
    path = Path(path)
    nearest = next(p for p in [*([path] if directory else []), *path.parents] if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write into {nearest} (permission denied)")


def os_error(e: OSError, flag: str, path) -> str:
    """The message of an OSError that stopped a command, for its one error line. The project's own (a
    missing input, raised with a message) say what they are; the system's name their file, or, where they
    name none (a full disk while writing), the output being written."""
    if e.errno is None:
        return str(e)
    if e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return f"{flag} {path}: could not write ({e.strerror})" if path is not None else str(e)


def write_json(path, result: dict):
    with hf.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
