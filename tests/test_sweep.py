"""sweep.py on the small world (conftest.py), two seeds of 3 steps: the base model evaluated once, its
refusal direction searched once, each seed trained and evaluated, the JSON written whole, the table;
bad flags refused before anything is trained."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

import hf
import sweep
import toy
import toy_eval
import train
from conftest import no_space_left
from test_toy_eval import FAST, stand_in_search

SEEDS = [1, 2]


@pytest.fixture(scope="module")
def swept(toy_world, tmp_path_factory):
    """-> (the sweep's result, its JSON file, the models refusal.py's search ran on)."""
    out = tmp_path_factory.mktemp("sweep") / "sweep" / "sweep.json"
    search, searches = stand_in_search(toy_world)
    flags = ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data"), "--steps", "3"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toy_eval, "toy_direction", search)
        result = sweep.run(SEEDS, flags, out, cfg=FAST, log=lambda *a: None)
    return result, out, searches


def test_base_evaluated_once_and_each_seed_trained_and_evaluated(swept, toy_world):
    result, out, searches = swept
    assert searches == [toy_world / "model"]  # one direction, for the base model and every seed's ablate attack
    assert result["seeds"] == SEEDS and [r["seed"] for r in result["runs"]] == SEEDS
    assert "layer_cos" not in result["base"] and "ablate_asr" in result["base"]
    n_layers = toy.SIZES["small"].n_layers
    for run in result["runs"]:
        assert list(run) == ["seed", "out", "circuit_breaker"]
        cb = run["circuit_breaker"]
        assert "ablate_asr" in cb and len(cb["layer_cos"]["harmful"]) == n_layers + 1 and cb["generations"]
        for key in ("nll_threshold", "orthogonalized_nll_threshold"):  # the base evaluation's, found once
            assert cb[key] == result["base"][key]
        config = json.loads((out.parent / f"seed{run['seed']}" / "run.json").read_text())
        assert config["seed"] == run["seed"] and config["steps"] == 3 and config["model"] == "toy"
        assert (out.parent / f"seed{run['seed']}" / "adapter" / "adapter_model.safetensors").is_file()
    assert [t["seed"] for t in result["timings"]["seeds"]] == SEEDS
    assert all(t["train_seconds"] >= 0 and t["eval_seconds"] >= 0 for t in result["timings"]["seeds"])


def test_json_is_the_result(swept):
    result, out, _ = swept
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["train_flags"][-2:] == ["--steps", "3"] and result["target_layer"] == 3
    assert result["direction"] == {"layer": 2, "position": -1}


def metric_value(evaluation, metric):
    """A summary row's number, read back from an evaluation."""
    if "_cos_" in metric:
        return evaluation["layer_cos"][metric.split("_")[0]][3]
    attack, _, kind = metric.rpartition("_")
    return evaluation["outcomes"][attack][kind] if kind in ("broken", "refusal") else evaluation[metric]


def test_summary_spans_the_seeds_beside_the_base(swept):
    result, _, _ = swept
    summary = result["summary"]
    rates = [m for m in toy_eval.TOY_METRICS if not m.endswith("_asr")]
    asrs = [m for m in toy_eval.TOY_METRICS if m.endswith("_asr")]
    outcome_rows = [row for m in asrs for row in (m, m.replace("_asr", "_broken"), m.replace("_asr", "_refusal"))]
    assert list(summary) == [*rates, *outcome_rows, "harmful_cos_3", "benign_cos_3"]  # each ASR, then its outcomes
    for metric, s in summary.items():
        values = [metric_value(r["circuit_breaker"], metric) for r in result["runs"]]
        assert s["n"] == 2 and (s["min"], s["max"]) == (min(values), max(values))
        assert s["mean"] == pytest.approx(sum(values) / 2)
        assert s["base"] == (None if "_cos_" in metric else metric_value(result["base"], metric))
    table = sweep.summary_table(result)
    assert all(metric in table for metric in summary) and table.count("n=2") == len(summary)


def test_flags_the_sweep_sets_itself_are_refused(toy_world, tmp_path):
    for flag in ("--seed", "--out"):
        with pytest.raises(ValueError, match=f"{flag}: the sweep sets"):
            sweep.run([1], ["--model-path", str(toy_world / "model"), flag, "3"], tmp_path / "s.json")
    with pytest.raises(ValueError, match="different seeds"):
        sweep.run([1, 1], [], tmp_path / "s.json")
    with pytest.raises(ValueError, match="comma-separated integers"):
        sweep.parse_seeds("1,x")
    with pytest.raises(ValueError, match="a chat model's sweep needs --harmbench FILE and --benign FILE"):
        sweep.run([1], ["--model", "llama3", "--model-path", str(tmp_path / "m" / "model")], tmp_path / "s.json")
    with pytest.raises(ValueError, match="--attack-direction: the toy's sweep finds"):
        sweep.run([1], ["--model-path", str(toy_world / "model")], tmp_path / "s.json", attack_direction="d.safetensors")
    with pytest.raises(ValueError, match="--base-from: the toy's base evaluation takes seconds"):
        sweep.run([1], ["--model-path", str(toy_world / "model")], tmp_path / "s.json", base_from="b.json")
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("text, match", [("1,,2", "--seeds 1,,2: expected comma-separated integers"),
                                         ("1,", "--seeds 1,: expected comma-separated integers"),
                                         (f"1,{2**64}", f"--seeds {2**64}: expected a whole number from 0 to 2**64 - 1")])
def test_seeds_are_refused_by_flag(text, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        sweep.parse_seeds(text)


def test_bad_attack_settings_are_refused_before_anything_runs(toy_world, tmp_path, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("bad attack settings reached the evaluation")
    monkeypatch.setattr(sweep, "toy_evaluation", refuse)
    monkeypatch.setattr(sweep, "chat_evaluation", refuse)
    flags = ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data")]
    with pytest.raises(ValueError, match=re.escape("--temperature inf: must be 0 (greedy) or a positive finite")):
        sweep.run([1], flags, tmp_path / "s.json", cfg=dataclasses.replace(FAST, temperature=float("inf")))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out, match", [("{tmp}", "is a directory; expected a file"),
                                        ("{file}/sweep.json", "is a file, not a directory")])
def test_cli_refuses_a_bad_out_before_training(toy_world, tmp_path, script_fails, out, match):
    (tmp_path / "file").write_text("x")
    out = out.format(tmp=tmp_path, file=tmp_path / "file")
    script_fails("tools/sweep.py", "--seeds", "1,2", "--model-path", toy_world / "model", "--data-dir", toy_world / "data",
                 "--out", out, match=match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture
def no_evaluation(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("bad input reached the base evaluation")
    monkeypatch.setattr(sweep, "toy_evaluation", refuse)
    monkeypatch.setattr(sweep, "chat_evaluation", refuse)


def test_every_runs_training_data_is_checked_before_the_base_evaluation(toy_world, tmp_path, no_evaluation):
    """The base evaluation takes minutes on a real model: bad data must stop the sweep before it."""
    (tmp_path / "data").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'data' / 'circuit_breakers_train.json'}: "
                                                          "no such file")):
        sweep.run([1, 2], ["--model-path", str(toy_world / "model"), "--data-dir", str(tmp_path / "data")],
                  tmp_path / "out" / "s.json")
    with pytest.raises(ValueError, match="--batch-size 100000 is more than the"):
        sweep.run([1, 2], ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data"),
                           "--batch-size", "100000"], tmp_path / "out" / "s.json")
    assert not (tmp_path / "out").exists()


def sweep_fails(argv, capsys) -> str:
    """sweep.py's one error line, run in this process."""
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert isinstance(e.value.code, str) and "Traceback" not in capsys.readouterr().err
    return e.value.code


def test_negative_n_embed_strong_is_refused(toy_world, tmp_path, capsys, no_evaluation):
    flags = ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data")]
    assert sweep_fails(["--seeds", "1", "--n-embed-strong", "-1", "--out", str(tmp_path / "s.json"), *flags],
                       capsys) == "sweep.py: error: --n-embed-strong -1: must be at least 0"
    assert not list(tmp_path.iterdir())


def test_read_only_out_is_refused_before_anything_runs(toy_world, read_only_dir, capsys, no_evaluation):
    out = read_only_dir / "s.json"
    flags = ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data")]
    assert sweep_fails(["--seeds", "1", "--out", str(out), *flags], capsys) == \
        f"sweep.py: error: --out {out}: cannot write into {read_only_dir} (permission denied)"


def test_full_disk_names_the_output(toy_world, tmp_path, capsys, monkeypatch):
    """Stand-ins for the evaluation and the training; the results file finds no space left."""
    evaluation = {"benign_accuracy": 0.5}
    monkeypatch.setattr(sweep, "toy_evaluation", lambda *a: (evaluation, lambda cfg: evaluation, {}))
    monkeypatch.setattr(train, "train", lambda cfg: None)
    monkeypatch.setattr(hf, "atomic_file", no_space_left)
    out = tmp_path / "s.json"
    flags = ["--model-path", str(toy_world / "model"), "--data-dir", str(toy_world / "data")]
    assert sweep_fails(["--seeds", "1", "--out", str(out), *flags], capsys) == \
        f"sweep.py: error: --out {out}: could not write (No space left on device)"
    assert not out.exists()


def test_a_chat_sweep_gives_every_evaluation_the_attack_direction(monkeypatch):
    """--attack-direction reaches the base evaluation and each seed's (chat_eval.evaluate_chat's `direction`)."""
    calls = []

    def evaluate_chat(model_path, adapter=None, **kw):
        calls.append((adapter, kw["direction"]))
        return {"base": {"stand-in": True}} if adapter is None else {"circuit_breaker": {}}

    monkeypatch.setattr(sweep, "evaluate_chat", evaluate_chat)
    first = train.TrainConfig(model="smollm2", model_path="m", out="out/seed1")
    base, evaluate, extra = sweep.chat_evaluation(first, sweep.CHAT_CONFIG, "hb.json", "benign.json", 0,
                                                  "d.safetensors", None, log=lambda *a: None)
    evaluate(first)
    assert base == {"stand-in": True} and extra["attack_direction"] == "d.safetensors"
    assert [d for _, d in calls] == ["d.safetensors", "d.safetensors"] and calls[1][0] == Path("out/seed1/adapter")


def test_a_chat_sweep_reuses_an_earlier_base_of_the_same_inputs_only(monkeypatch, tmp_path):
    """--base-from: the earlier sweep's base serves every seed and the base model is not evaluated again;
    a sweep of another model, prompt file, direction or strong-attack budget is refused, naming what differs."""
    calls = []

    def evaluate_chat(model_path, adapter=None, **kw):
        calls.append((adapter, kw.get("base_result")))
        return {"circuit_breaker": {}}

    monkeypatch.setattr(sweep, "evaluate_chat", evaluate_chat)
    earlier = {"model_path": "m", "harmbench": "hb.json", "benign": "benign.json", "attack_direction": "d.safetensors",
               "base": {"nll_threshold": 0.7, "orthogonalized_nll_threshold": 0.9,
                        "counts": {"embed_strong_asr": {"successes": 3, "n": 4}}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    first = train.TrainConfig(model="smollm2", model_path="m", out="out/seed1")
    base, evaluate, extra = sweep.chat_evaluation(first, sweep.CHAT_CONFIG, "hb.json", "benign.json", 4,
                                                  "d.safetensors", path, log=lambda *a: None)
    evaluate(first)
    assert base == earlier["base"] and extra["base_from"] == str(path)
    assert calls == [(Path("out/seed1/adapter"), earlier["base"])]  # no base evaluation, the earlier one passed on
    for args, match in [(("hb.json", "other.json", 4, "d.safetensors"),
                         "its benign is 'benign.json', this sweep's 'other.json'"),
                        (("hb.json", "benign.json", 4, None), "its attack_direction is 'd.safetensors'"),
                        (("hb.json", "benign.json", 0, "d.safetensors"),
                         "strong embedding attack on 4 behaviours, this sweep on 0")]:
        with pytest.raises(ValueError, match=match):
            sweep.chat_evaluation(first, sweep.CHAT_CONFIG, *args, path, log=lambda *a: None)
    older = {**earlier, "base": {k: v for k, v in earlier["base"].items() if k != "orthogonalized_nll_threshold"}}
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match="older.json: its base evaluation predates the orthogonalised model's NLL"):
        sweep.chat_evaluation(first, sweep.CHAT_CONFIG, "hb.json", "benign.json", 4, "d.safetensors",
                              tmp_path / "older.json", log=lambda *a: None)
    with pytest.raises(ValueError, match="missing.json: could not read it"):
        sweep.chat_evaluation(first, sweep.CHAT_CONFIG, "hb.json", "benign.json", 0, None, tmp_path / "missing.json",
                              log=lambda *a: None)
    (tmp_path / "toy.json").write_text(json.dumps({"world": "w", "base": {}}))
    with pytest.raises(ValueError, match="not a chat model's sweep"):
        sweep.chat_evaluation(first, sweep.CHAT_CONFIG, "hb.json", "benign.json", 0, None, tmp_path / "toy.json",
                              log=lambda *a: None)
