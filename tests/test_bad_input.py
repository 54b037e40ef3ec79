"""Bad input to `python train.py`, through the real command line: each case must exit non-zero with one
line naming the flag, file or record at fault, without a traceback, and leave the output directory of an
earlier good run byte for byte as it was.

Every case gets its own copy of that output directory (and of a model or data directory it breaks), and
the cases run a few at a time: each is a fresh Python that imports torch."""

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import cli
import train
from conftest import no_space_left
from config import TrainConfig, check_values
from test_train import LLAMA3_TOKENIZER, SHARED, world  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
MISTRAL_TOKENIZER = SHARED / "tokenizers" / "mistral" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not (LLAMA3_TOKENIZER.is_file() and MISTRAL_TOKENIZER.is_file()),
                                reason="../shared not found: the real Llama-3 and Mistral tokenizers live there")


def train_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in the repository; a run that hangs comes back as a failed one."""
    argv = [sys.executable, "train.py", *map(str, args)]
    try:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, None, e.stdout or "", f"(no exit after {timeout} s)")


def digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under path (or of path itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def half(path: Path):
    """Cut a file to half its size, as a full disk or an interrupted copy would."""
    os.truncate(path, path.stat().st_size // 2)


# -----------------------------------------------------------------------------
# The cases. A case gets a Where (its own directory, a copy of the good run's output, the world) and
# returns the extra arguments and a pattern the error line must match.


class Where(NamedTuple):
    world: Path
    dir: Path  # the case's own directory
    out: Path  # a copy of the good run's output directory

    def model_copy(self, edit_config: Callable[[dict], None] | None = None, tokenizer=LLAMA3_TOKENIZER) -> Path:
        """A model directory like the world's: config.json copied (and edited), the other files linked."""
        model = self.dir / "model"
        model.mkdir()
        for f in (self.world / "model").iterdir():
            (model / f.name).symlink_to(f)
        (model / "tokenizer.model").unlink()
        (model / "tokenizer.model").symlink_to(tokenizer)
        if edit_config:
            (model / "config.json").unlink()
            config = json.loads((self.world / "model" / "config.json").read_text())
            edit_config(config)
            (model / "config.json").write_text(json.dumps(config))
        return model

    def data_copy(self) -> Path:
        shutil.copytree(self.world / "data", self.dir / "data")
        return self.dir / "data"


def flags(*args, says):
    return lambda w: (list(args), says)


def resume(*args, says):
    return lambda w: (["--resume", *args], says)


def edit_checkpoint(edit, says):
    def case(w):
        edit(w.out / "checkpoint")
        return ["--resume"], says
    return case


def out_is_a_file(w):
    (w.dir / "file").write_text("not a directory\n")
    return ["--out", w.dir / "file"], r"--out .*file: .*file is a file, not a directory"


def out_under_a_file(w):
    (w.dir / "file").write_text("not a directory\n")
    return ["--out", w.dir / "file" / "out"], r"--out .*file/out: .*file is a file, not a directory"


def resume_without_checkpoint(w):
    shutil.rmtree(w.out / "checkpoint")
    return ["--resume"], r"checkpoint: no checkpoint to resume from \(expected .*checkpoint/trainer\.json\)"


def truncated_model(w):
    model = w.model_copy()
    (model / "model.safetensors").unlink()
    shutil.copy(w.world / "model" / "model.safetensors", model)
    half(model / "model.safetensors")
    return ["--model-path", model], r"model/model\.safetensors: not a readable safetensors file"


def config_not_utf8(w):
    model = w.model_copy()
    (model / "config.json").unlink()
    (model / "config.json").write_bytes((w.world / "model" / "config.json").read_bytes().replace(b"silu", b"s\xefl\xfc"))
    return ["--model-path", model], r"model/config\.json: not valid JSON"


def small_vocabulary(w):
    model = w.model_copy(lambda c: c.update(vocab_size=1000))
    return ["--model-path", model], (r"model/tokenizer\.model: 128256 tokens, but .*model/config\.json gives the "
                                     r"model 1000 embeddings")


def truncated_direction(w):
    from safetensors.torch import save_file
    save_file({f"layer.{l}": torch.randn(32) for l in range(23)}, w.dir / "d.safetensors")
    half(w.dir / "d.safetensors")
    return ["--loss", "direction", "--direction", w.dir / "d.safetensors"], \
        r"d\.safetensors: not a safetensors direction file"


def xstest_not_utf8(w):
    csv_file = w.data_copy() / "xstest_v2_completions_gpt4_gpteval.csv"
    csv_file.write_bytes(csv_file.read_bytes().replace(b"process 0", b"pr\xf6cess 0"))  # row 1: line 2
    return ["--data-dir", csv_file.parent], r"xstest_v2_completions_gpt4_gpteval\.csv: not UTF-8 text \(line 2:"


def circuit_breakers_not_utf8(w):
    d = w.data_copy()
    records = json.loads((d / "circuit_breakers_train.json").read_text())
    text = json.dumps(records, indent=1).replace("device 3.", "d\xe9vice 3.")
    (d / "circuit_breakers_train.json").write_bytes(text.encode("latin-1"))
    line = text[:text.index("d\xe9vice 3.")].count("\n") + 1
    return ["--data-dir", d], rf"circuit_breakers_train\.json: not UTF-8 text \(line {line}:"


def ultrachat_turn_order_for_mistral(w):
    model = w.model_copy(lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral",
                                            vocab_size=32000), tokenizer=MISTRAL_TOKENIZER)
    d = w.data_copy()
    lines = (d / "ultrachat.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    (d / "ultrachat.jsonl").write_text("\n".join(lines) + "\n")
    return ["--model-path", model, "--data-dir", d], \
        r"ultrachat\.jsonl: line 5: messages\[1\]: the mistral template needs .* user and assistant turns"


NO_GPU = not torch.cuda.is_available()

CASES = {
    # numbers no run can use
    "steps 0": flags("--steps", "0", says=r"--steps 0: expected at least 1"),
    "batch size 0": flags("--batch-size", "0", says=r"--batch-size 0: expected at least 1"),
    "lora r 0": flags("--lora-r", "0", says=r"--lora-r 0: expected at least 1"),
    "log every 0": flags("--log-every", "0", says=r"--log-every 0: expected at least 1"),
    "threads -1": flags("--threads", "-1", says=r"--threads -1: expected 0 or more"),
    "lr 1e38": flags("--lr", "1e38", says=r"--lr 1e\+38: expected a learning rate in \(0, 1\]"),
    "lora alpha 0": flags("--lora-alpha", "0", says=r"--lora-alpha 0\.0: expected a positive finite number"),
    "lora dropout 1": flags("--lora-dropout", "1", says=r"--lora-dropout 1\.0: expected a probability in \[0, 1\)"),
    "grad clip 0": flags("--grad-clip", "0", says=r"--grad-clip 0\.0: expected a positive finite number"),
    "retain weight nan": flags("--retain-weight", "nan", says=r"--retain-weight nan: expected a positive finite number"),
    "val every -1": flags("--val-every", "-1", says=r"--val-every -1: expected 0 or more"),
    "ckpt every -1": flags("--ckpt-every", "-1", says=r"--ckpt-every -1: expected 0 or more"),
    "n ultrachat -1": flags("--n-ultrachat", "-1", says=r"--n-ultrachat -1: expected 0 or more"),
    "xstest repeat -1": flags("--xstest-repeat", "-1", says=r"--xstest-repeat -1: expected 0 or more"),
    "bucket -1": flags("--bucket", "-1", says=r"--bucket -1: expected 0 or more"),
    "micro batch -1": flags("--micro-batch", "-1", says=r"--micro-batch -1: expected 0 or more"),
    "micro batch over the batch": flags("--micro-batch", "32", says=r"--micro-batch 32: expected at most "
                                                                     r"--batch-size \(4\)"),
    "lora targets": flags("--lora-targets", "q_proj,bogus", says=r"--lora-targets 'q_proj,bogus': expected some of"),
    # layers
    "target layers -1": flags("--target-layers", "-1", says=r"--target-layers '-1': expected hidden-state indices"),
    "target layers empty": flags("--target-layers", "", says=r"--target-layers '': expected hidden-state indices"),
    "target layers deeper than the model": flags(
        "--target-layers", "2,30", says=r"--target-layers 2,30: expected hidden-state indices 1\.\.22 \(.*"
                                        r"model/config\.json has 22 layers\)"),
    "lora layers deeper than the model": flags(
        "--lora-layers", "0,25", says=r"--lora-layers 0,25: expected block indices 0\.\.21 \(.*model/config\.json"),
    # the device
    "device gpu": flags("--device", "gpu", says=r"--device gpu: not a device; expected cpu, cuda or cuda:N"),
    "device cuda": flags("--device", "cuda" if NO_GPU else "cuda:99",
                         says=r"--device cuda: no CUDA GPU is available here" if NO_GPU else r"--device cuda:99: this machine has"),
    # the output directory and --resume
    "out is a file": out_is_a_file,
    "out under a file": out_under_a_file,
    "batch size above the data": flags("--batch-size", "33",
                                       says=r"--batch-size 33 is more than the 32 examples each set can give"),
    "resume without a checkpoint": resume_without_checkpoint,
    "resume with other settings": resume(
        "--seed", "7", "--lr", "2e-4", "--target-layers", "2,3",
        says=r"--resume: .*checkpoint/trainer\.json was written with other settings: --seed 42 there, 7 now; "
             r"--target-layers 2,4 there, 2,3 now; .*--lr 0\.0001 there, 0\.0002 now"),
    "trainer.json without step": edit_checkpoint(
        lambda c: (c / "trainer.json").write_text('{"config": {}}'),
        says=r"checkpoint/trainer\.json: expected an object whose 'step' is the last completed step, found None"),
    "trainer.json cut short": edit_checkpoint(lambda c: (c / "trainer.json").write_text('{"step": 2, "conf'),
                                              says=r"checkpoint/trainer\.json: not valid JSON"),
    "trainer.safetensors truncated": edit_checkpoint(
        lambda c: half(c / "trainer.safetensors"),
        says=r"checkpoint/trainer\.safetensors: not a readable safetensors file"),
    "checkpoint adapter truncated": edit_checkpoint(
        lambda c: half(c / "adapter" / "adapter_model.safetensors"),
        says=r"checkpoint/adapter/adapter_model\.safetensors: not a readable safetensors file"),
    # the model, its tokenizer and the data
    "model directory missing": lambda w: (["--model-path", w.dir / "nope"], r"nope: model directory not found"),
    "model weights truncated": truncated_model,
    "config.json not UTF-8": config_not_utf8,
    "tokenizer larger than the model": small_vocabulary,
    "direction file truncated": truncated_direction,
    "xstest not UTF-8": xstest_not_utf8,
    "circuit breakers not UTF-8": circuit_breakers_not_utf8,
    "ultrachat turn order (mistral)": ultrachat_turn_order_for_mistral,
}


class Outcome(NamedTuple):
    result: subprocess.CompletedProcess
    says: str
    before: dict
    after: dict


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory) -> dict[str, Outcome]:
    """One good run, then every case against a copy of its output, a few at a time."""
    base = ["--model-path", world / "model", "--data-dir", world / "data", "--steps", "2", "--batch-size", "4",
            "--target-layers", "2,4", "--n-ultrachat", "32", "--ckpt-every", "1"]
    good = tmp_path_factory.mktemp("good") / "out"
    done = train_cli(*base, "--out", good)
    assert done.returncode == 0, done.stderr
    prepared = {}
    for i, (name, case) in enumerate(CASES.items()):
        case_dir = tmp_path_factory.mktemp(f"case{i}")
        where = Where(world, case_dir, case_dir / "out")
        shutil.copytree(good, where.out)
        args, says = case(where)
        watched = where.dir / "file" if (where.dir / "file").exists() else where.out
        prepared[name] = (base + ["--out", where.out] + args, says, watched, digest(watched))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(prepared, pool.map(lambda p: train_cli(*p[0]), prepared.values())))
    return {name: Outcome(results[name], says, before, digest(watched))
            for name, (_, says, watched, before) in prepared.items()}


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line_and_the_output_is_untouched(outcomes, case):
    o = outcomes[case]
    assert o.result.returncode != 0, o.result.stdout[-2000:]
    assert "Traceback" not in o.result.stderr, o.result.stderr
    last = o.result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: "), o.result.stderr
    assert re.search(o.says, last), last
    assert o.after == o.before


# -----------------------------------------------------------------------------
# More values of the flags above: the same check, so in-process


@pytest.mark.parametrize("field, value", [
    ("steps", -3), ("lr", 1e30), ("lr", 0.0), ("lr", -1e-4), ("lr", float("nan")), ("lr", math.inf),
    ("lora_alpha", math.inf), ("lora_alpha", -16.0), ("lora_dropout", -0.1), ("loss_alpha", float("nan")),
    ("grad_clip", -1.0), ("weight_decay", -0.01), ("val_batches", 0), ("lora_layers", (-1, 0)),
    ("target_layers", (0, 2)), ("lora_targets", ()), ("device", "cuda:x"), ("device", "meta"),
    ("xstest_holdout", 1.0), ("xstest_holdout", -0.1), ("xstest_holdout", float("nan")),
    ("seed", 2**64), ("seed", -1),
])
def test_values_no_run_can_use_are_refused_by_flag(field, value):
    with pytest.raises(ValueError, match="^" + re.escape(cli.as_flag(field)) + " "):
        check_values(TrainConfig(**{"device": "cpu", field: value}))


def test_the_limits_themselves_are_allowed():
    check_values(TrainConfig(device="cpu", lr=1.0, lora_dropout=0.0, threads=0, val_every=0, ckpt_every=0,
                                   n_ultrachat=0, xstest_repeat=0, bucket=0, weight_decay=0.0, target_layers=(1,)))
    check_values(TrainConfig(device="cpu", seed=0))
    check_values(TrainConfig(device="cpu", seed=2**64 - 1))


# -----------------------------------------------------------------------------
# An output the system will not write: refused before anything runs where it can be known (permissions),
# named in one line where it cannot (a full disk)

GOOD = ["--steps", "1", "--batch-size", "4", "--target-layers", "2,4", "--n-ultrachat", "32"]


@pytest.mark.parametrize("under", [False, True])
def test_read_only_out_is_refused_before_anything_runs(world, read_only_dir, under):
    out = read_only_dir / "out" if under else read_only_dir
    done = train_cli("--model-path", world / "model", "--data-dir", world / "data", *GOOD, "--out", out)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        f"train.py: error: --out {out}: cannot write into {read_only_dir} (permission denied)"
    assert not list(read_only_dir.iterdir())


def test_full_disk_names_the_output(world, tmp_path, monkeypatch):
    monkeypatch.setattr(train.hf, "atomic_file", no_space_left)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(["--model-path", str(world / "model"), "--data-dir", str(world / "data"), *GOOD, "--device", "cpu",
                    "--out", str(out)])
    assert e.value.code == f"train.py: error: --out {out}: could not write (No space left on device)"
    assert not list(out.iterdir())  # the first file found no space
