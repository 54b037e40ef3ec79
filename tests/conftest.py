"""Fixtures every test file shares: commands that must fail in one line, a read-only directory, a full disk,
and the small toy world and SmolLM2, each built once per run. (pytest.ini puts the root and tools/ on the
import path, as the commands themselves have them.)"""

import dataclasses
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting made elementwise kernels ten times slower on a 2-core machine
# shared with other jobs (BENCHMARKS.md); passive waiting costs nothing on an idle one. Set before torch
# is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def script_fails():
    """check(script, *argv, match=...): `python SCRIPT ARGV` in a fresh process, with no GPU visible, fails as
    the command lines promise: a non-zero exit and one line on stderr, "SCRIPT: error: ...", containing
    `match`; no traceback, and nothing else printed there (no model was loaded, nothing generated)."""
    def check(script, *argv, match):
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True,
                              text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"{Path(script).name}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert match in proc.stderr, proc.stderr
    return check


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory of mode 0o555, which this user may not write into; the test is skipped where
    permissions are not enforced (root writes into such a directory anyway, so no command can refuse it)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        path.chmod(0o755)
        pytest.skip("permissions are not enforced here (running as root): a directory of mode 0o555 stays writable")
    yield path
    path.chmod(0o755)  # so that pytest can remove it


def no_space_left(*args, **kwargs):
    """A writer (hf.atomic_file, hf.atomic_dir, ...) on a full disk: what the system raises, naming no file."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what they deselect
def pytest_collection_modifyitems(config, items):
    """The toy world's end-to-end run (minutes on one thread) starts as soon as it is known to be wanted, in a
    process of its own, so that the rest of the suite runs beside it."""
    if any(item.path.name == "test_toy_e2e.py" for item in items):
        from test_toy_e2e import Background
        Background.start()


def pytest_sessionfinish(session, exitstatus):
    """An end-to-end run the session no longer waits for (a failure, ^C) is stopped, and its files removed."""
    e2e = sys.modules.get("test_toy_e2e")
    if e2e is not None and e2e.Background.process is not None:
        if e2e.Background.process.poll() is None:
            e2e.Background.process.kill()
            e2e.Background.process.wait()
        shutil.rmtree(e2e.Background.dir, ignore_errors=True)


TOY_SEED = 0  # the seed of the small world below; tests/test_toy.py rebuilds parts of it with this seed


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """The small toy world's directory, its model pretrained for 3 steps only (seconds, where the real
    400 take minutes): enough for formats, splits, reproducibility and the evaluation's plumbing, and
    shared by every test that reads one. The trained model's behaviour is tests/test_toy_e2e.py's subject."""
    import toy

    root = tmp_path_factory.mktemp("toy") / "toy"
    toy.SIZES["short"] = dataclasses.replace(toy.SIZES["small"], steps=3)
    try:
        toy.build_world(root, size="short", seed=TOY_SEED, log=lambda _: None)
    finally:
        del toy.SIZES["short"]
    return root


SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def smollm2_model(tmp_path_factory):
    """SmolLM2-135M-Instruct as a hub-format directory (../shared/models/materialize.py, seconds), shared by
    every test that needs a real chat model; skips where ../shared/models or the gguf package is absent."""
    script = SHARED / "models" / "materialize.py"
    if not script.is_file():
        pytest.skip(f"{script} not found: the real chat model lives in ../shared/models")
    pytest.importorskip("gguf", reason="materialize.py needs the gguf package (requirements-test.txt)")
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True, timeout=300)
    return out
