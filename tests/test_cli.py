"""cli.py: flags fed to the function of the same parameter names, the checks that run before a model is
loaded, and output files that are replaced whole or not at all."""

import argparse
import errno
import os

import pytest

import cli


def evaluate(data, *, limit=100, batch_size=8):
    return data, limit, batch_size


def test_flags_take_their_defaults_from_the_function_they_feed():
    assert cli.keyword_defaults(evaluate) == {"limit": 100, "batch_size": 8}
    args = argparse.Namespace(data="x.json", limit=3, batch_size=2, out="o.json", command="layers")
    assert cli.call(evaluate, args) == ("x.json", 3, 2)  # out and command feed nothing here
    assert cli.call(evaluate, argparse.Namespace(limit=5), data="y.json") == ("y.json", 5, 8)


def test_write_json_makes_its_directory(tmp_path):
    cli.write_json(tmp_path / "new" / "results.json", {"asr": 0.5})
    assert (tmp_path / "new" / "results.json").read_text() == '{\n "asr": 0.5\n}\n'
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["results.json"]


@pytest.mark.parametrize("dest, value, match", [
    ("batch_size", 0, "--batch-size 0: must be at least 1"),
    ("start", -1, "--start -1: must be at least 0"),
    ("device", "gpu", "--device gpu: not a device"),
])
def test_check_flags_names_the_flag(tmp_path, dest, value, match):
    args = argparse.Namespace(device="cpu", batch_size=8, start=0, out=str(tmp_path / "o.json"))
    cli.check_flags(args, {"batch_size": 1, "start": 0}, {"out": False})  # all good
    setattr(args, dest, value)
    with pytest.raises(ValueError, match=match):
        cli.check_flags(args, {"batch_size": 1, "start": 0}, {"out": False})


def test_check_output(tmp_path):
    (tmp_path / "file").write_text("x")
    cli.check_output(tmp_path / "new" / "o.json", "--out")  # a directory that does not exist yet is fine
    cli.check_output(tmp_path, "--export", directory=True)
    with pytest.raises(ValueError, match="is a directory; expected a file"):
        cli.check_output(tmp_path, "--out")
    with pytest.raises(ValueError, match="file is a file, not a directory"):
        cli.check_output(tmp_path / "file" / "deeper" / "o.json", "--out")
    with pytest.raises(ValueError, match="--export .*: is a file; expected a directory"):
        cli.check_output(tmp_path / "file", "--export", directory=True)


def test_check_output_refuses_a_read_only_directory(read_only_dir):
    """The directory the output goes into: a file's, a missing directory's nearest existing one, or an
    existing directory output itself."""
    for path, directory in [(read_only_dir / "o.json", False), (read_only_dir / "new" / "deeper", True),
                            (read_only_dir, True)]:
        with pytest.raises(ValueError, match=f"--out {path}: cannot write into {read_only_dir} "
                                             r"\(permission denied\)"):
            cli.check_output(path, "--out", directory)


def test_os_error_names_the_file_or_else_the_output():
    assert cli.os_error(FileNotFoundError("data.json: no such file"), "--out", "o.json") == "data.json: no such file"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "model/config.json")
    assert cli.os_error(denied, "--out", "o.json") == "model/config.json: Permission denied"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert cli.os_error(full, "--out", "o.json") == "--out o.json: could not write (No space left on device)"


def test_threads_are_set_when_given_and_left_to_torch_otherwise(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.torch, "set_num_threads", calls.append)
    cli.use_threads(0)
    cli.use_threads(3)
    assert calls == [3]
    with pytest.raises(ValueError, match="--threads -1: must be at least 0"):
        cli.use_threads(-1)
    parser = argparse.ArgumentParser()
    cli.add_threads_flag(parser, default=1)
    assert parser.parse_args([]).threads == 1 and parser.parse_args(["--threads", "2"]).threads == 2
