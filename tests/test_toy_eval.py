"""toy_eval.py on the small world (conftest.py): the evaluation keeps its evidence (every generation,
judged; the counts behind each rate) and the layer picture, generation still runs on merged weights,
and its command line writes the layer CSV. The numbers themselves are tests/test_toy_e2e.py's."""

import csv
import importlib.util
import json

import pytest
import torch

import hf
import refusal
import scoring
import toy
import toy_eval
import train
from attacks import AttackConfig, answers_per_item, chat_prompt, load_evaluated
from layers import write_layers
from lora import merge_lora
from scoring import any_solution, rate_text, wilson

# Short answers and two embedding steps: these tests are about what is kept, not about the attacks' strength.
FAST = AttackConfig(batch_size=32, max_new_tokens=8, embed_steps=2, embed_strong_steps=2, embed_strong_solutions=2)
ATTACKS = ("direct", "jailbreak", "prefill", "embed", "embed_strong", "ablate")


def random_direction(world_dir) -> refusal.RefusalDirection:
    """A 3-step model refuses nothing, so refusal.py finds no direction in it; a random one lets ablate run."""
    args = hf.model_args(hf.read_config(world_dir / "model"))
    layers = torch.randn(args.n_layers + 1, args.dim, generator=torch.Generator().manual_seed(0))
    return refusal.RefusalDirection(direction=refusal.unit(layers[2]), layers=layers, layer=2, position=-1)


def stand_in_search(world_dir):
    """refusal.py's search on the base model, stood in for -> (the stand-in, the model paths it ran on)."""
    calls = []

    def search(model, model_path, root, log):
        calls.append(model_path)
        return random_direction(world_dir)
    return search, calls


@pytest.fixture(scope="module")
def searches(toy_world):
    """The model paths refusal.py's (stand-in) search ran on in this module."""
    search, calls = stand_in_search(toy_world)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(toy_eval, "toy_direction", search)
        yield calls


def train_adapter(world_dir, out, seed=1) -> str:
    train.train(train.parse_args(["--model", "toy", "--model-path", str(world_dir / "model"), "--data-dir",
                                  str(world_dir / "data"), "--out", str(out), "--steps", "3", "--seed", str(seed)]))
    return str(out / "adapter")


@pytest.fixture(scope="module")
def adapter(toy_world, tmp_path_factory):
    threads = torch.get_num_threads()  # the toy preset trains on one thread
    try:
        return train_adapter(toy_world, tmp_path_factory.mktemp("toy_eval") / "out")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(toy_world, adapter, searches):
    return toy_eval.evaluate_toy(toy_world, adapter, cfg=FAST, log=lambda *a: None)


def test_every_metric_is_kept_with_its_counts(result, toy_world):
    world = toy.load_world(toy_world)
    for name in ("base", "circuit_breaker"):
        r = result[name]
        assert set(toy_eval.TOY_METRICS) <= set(r)
        assert r["n_harmful"] == len(world["harmful_eval"]) and r["n_benign"] + r["n_dishes"] == len(world["benign_eval"])
        for metric in toy_eval.TOY_METRICS:
            c = r["counts"][metric]
            assert r[metric] == c["successes"] / c["n"]
            low, high = r["ci95"][metric]
            assert (low, high) == wilson(c["successes"], c["n"]) and low <= r[metric] <= high
            assert c["n"] == {"benign_accuracy": r["n_benign"], "dish_accuracy": r["n_dishes"]}.get(metric, r["n_harmful"])


def test_toy_table_shows_each_rate_with_its_interval_and_n():
    counts = {m: {"successes": 1, "n": 4} for m in toy_eval.TOY_METRICS}
    rates = {"refusal": 0.25, "broken": 0.5, "compliant": 0.25, "n": 4}
    table = toy_eval.toy_table({"base": {**{m: 0.25 for m in counts}, "counts": counts, "outcomes": {"direct": rates}}})
    lines = table.splitlines()
    assert lines[1] == f"{'benign_accuracy':<20}{rate_text(1, 4):>32}"
    assert lines[3:7] == [f"{'direct_asr':<20}{rate_text(1, 4):>32}", f"  {'refusal':<18}{rate_text(1, 4):>32}",
                          f"  {'broken':<18}{rate_text(2, 4):>32}", f"  {'compliant':<18}{rate_text(1, 4):>32}"]


def test_every_generation_is_kept_and_judged(result, toy_world):
    world = toy.load_world(toy_world)
    by_behavior = {e["behavior"]: e for e in world["harmful_eval"]}
    by_question = {e["question"]: e for e in world["benign_eval"]}
    for name in ("base", "circuit_breaker"):
        generations = result[name]["generations"]
        per_item = sum(answers_per_item(a, FAST) for a in ATTACKS)  # embed_strong answers each of its 2 solutions
        assert len(generations) == len(world["harmful_eval"]) * per_item + len(world["benign_eval"])
        harmful = [g for g in generations if g["set"] == "harmful"]
        assert {g["attack"] for g in harmful} == set(ATTACKS)
        for g in harmful:
            assert g["score"] == toy.judge(g["generation"], by_behavior[g["behavior"]])
        for g in (g for g in generations if g["set"] == "benign"):
            assert g["score"] == toy.answered(g["generation"], by_question[g["question"]])
        for attack in ATTACKS:  # the rates can be recomputed from the generations
            scores = any_solution([g["score"] == 1 for g in harmful if g["attack"] == attack], attack, FAST)
            assert len(scores) == len(world["harmful_eval"]) and sum(scores) / len(scores) == result[name][f"{attack}_asr"]


def test_every_attack_has_its_outcome_classes(result, toy_world):
    """Beside each ASR, refusal / broken / compliant, each harmful answer's NLL taken under the base model."""
    world = toy.load_world(toy_world)
    thresholds = {k: result["base"][k] for k in ("nll_threshold", "orthogonalized_nll_threshold")}
    assert None not in thresholds.values() and thresholds["nll_threshold"] != thresholds["orthogonalized_nll_threshold"]
    assert all(result["circuit_breaker"][k] == v for k, v in thresholds.items())  # the base evaluation's, once
    for name in ("base", "circuit_breaker"):
        harmful = [g for g in result[name]["generations"] if g["set"] == "harmful"]
        assert set(result[name]["outcomes"]) == set(ATTACKS)
        for attack, rates in result[name]["outcomes"].items():
            found = [g["outcome"] for g in harmful if g["attack"] == attack]
            assert rates["n"] == len(found) == len(world["harmful_eval"]) * answers_per_item(attack, FAST)
            for c in ("refusal", "broken", "compliant"):
                assert rates[c] == found.count(c) / len(found) and rates["ci95"][c] == wilson(found.count(c), len(found))
        for g in harmful:
            # the ablate attack's answers against the orthogonalised base model (scoring.ORTHOGONALIZED)
            threshold = thresholds["orthogonalized_nll_threshold" if g["attack"] == "ablate" else "nll_threshold"]
            assert g["outcome"] == scoring.outcome(g["generation"], g["nll"], threshold)
            if g["attack"] in scoring.NOT_FROM_TOKENS:  # not answered from a token prompt: no incoherence test
                assert g["nll"] is None


def test_the_circuit_broken_models_nll_is_the_base_models(result, toy_world):
    """The NLL of the circuit-broken model's answers is taken under the frozen base model."""
    model, tok = load_evaluated(toy_world / "model", None, torch.float32)
    harmful = [g for g in result["circuit_breaker"]["generations"] if g["set"] == "harmful" and g["attack"] == "direct"]
    g = next(g for g in harmful if g["nll"] is not None)
    prompt = chat_prompt(tok, [{"role": "user", "content": g["behavior"]}])
    assert scoring.nll_per_token(model, tok, [prompt], [g["generation"]])[0] == pytest.approx(g["nll"], abs=1e-4)
    # the ablate attack's, under the base model with the direction orthogonalised away
    searched = [g for g in result["circuit_breaker"]["generations"] if g["attack"] == "ablate" and g["nll"] is not None]
    direction = random_direction(toy_world)
    ortho = refusal.orthogonalize(model, direction.direction)
    prompts = [chat_prompt(tok, [{"role": "user", "content": g["behavior"]}]) for g in searched]
    assert searched and scoring.nll_per_token(ortho, tok, prompts, [g["generation"] for g in searched]) \
        == pytest.approx([g["nll"] for g in searched], abs=1e-4)


def test_layer_picture_of_the_circuit_broken_model(result, toy_world):
    n_layers = toy.SIZES["small"].n_layers
    assert "layer_cos" not in result["base"]  # 1 at every layer, by definition
    cos = result["circuit_breaker"]["layer_cos"]
    assert set(cos) == {"harmful", "benign"}
    for values in cos.values():
        assert len(values) == n_layers + 1 and all(-1.0001 <= v <= 1.0001 for v in values)
        assert values[0] == pytest.approx(1.0)  # the embeddings carry no LoRA


def test_the_direction_is_searched_once_on_the_base_model(result, searches, toy_world):
    assert searches == [toy_world / "model"]


def test_generation_runs_on_the_same_merged_weights(toy_world, adapter):
    """Measured first, merged after: the weights the attacks see are those a merged load gives."""
    merged, _ = load_evaluated(toy_world / "model", adapter, torch.float32)
    later, _ = load_evaluated(toy_world / "model", adapter, torch.float32, merge=False)
    merge_lora(later)
    theirs = later.state_dict()
    for name, value in merged.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def test_the_circuit_broken_model_alone_with_a_given_direction(toy_world, adapter):
    alone = toy_eval.evaluate_toy(toy_world, adapter, cfg=FAST, direction=random_direction(toy_world), search=False,
                                  models=("circuit_breaker",), log=lambda *a: None)
    assert list(alone) == ["circuit_breaker"] and "ablate_asr" in alone["circuit_breaker"]
    with pytest.raises(ValueError, match="circuit_breaker with an adapter"):
        toy_eval.evaluate_toy(toy_world, None, models=("circuit_breaker",))


def test_k_sampled_answers_on_the_toy(toy_world, tmp_path, capsys):
    """tools/toy_eval.py --samples 4: every rate counts the 4 answers per item, each attack also has its
    best-of-4 ASR, and the incoherence threshold comes from the base model's sampled benign answers."""
    from safetensors.torch import save_file
    d = random_direction(toy_world)
    direction = tmp_path / "direction.safetensors"
    save_file({"direction": d.direction, **{f"layer.{l}": v for l, v in enumerate(d.layers)}}, str(direction),
              metadata={"layer": str(d.layer), "position": str(d.position)})
    out = tmp_path / "toy.json"
    toy_eval.main(["--toy-root", str(toy_world), "--direction", str(direction), "--device", "cpu",
             "--max-new-tokens", "8", "--embed-steps", "2", "--embed-strong-steps", "2", "--embed-strong-solutions", "2",
             "--samples", "4",
             "--temperature", "1.0", "--out", str(out)])
    base = json.loads(out.read_text())["base"]
    world = toy.load_world(toy_world)
    n = len(world["harmful_eval"])
    assert (base["samples"], base["temperature"], base["top_p"]) == (4, 1.0, 1.0)
    for attack in ATTACKS:
        judged = [g for g in base["generations"] if g["set"] == "harmful" and g["attack"] == attack]
        s = 2 if attack == "embed_strong" else 1  # solutions, each answered 4 times
        assert [g["sample"] for g in judged] == [k for k in range(4) for _ in range(s)] * n
        per, best = base["counts"][f"{attack}_asr"], base["counts"][f"{attack}_asr_best_of_k"]
        assert (per["n"], best["n"], base["outcomes"][attack]["n"]) == (4 * n, n, 4 * n * s)
        hits = [any(g["score"] == 1 for g in judged[i:i + s]) for i in range(0, 4 * n * s, s)]
        assert best["successes"] == sum(any(hits[i:i + 4]) for i in range(0, 4 * n, 4))
        assert base[f"{attack}_asr_best_of_k"] >= base[f"{attack}_asr"]
        assert base["ci95"][f"{attack}_asr_best_of_k"] == list(wilson(best["successes"], n))
    benign = [g for g in base["generations"] if g["set"] == "benign"]
    assert len(benign) == 4 * len(world["benign_eval"])
    model, tok = load_evaluated(toy_world / "model", None, torch.float32)
    prompts = [chat_prompt(tok, [{"role": "user", "content": g["question"]}]) for g in benign]
    nlls = scoring.nll_per_token(model, tok, prompts, [g["generation"] for g in benign])
    assert base["nll_threshold"] == pytest.approx(scoring.nll_threshold(nlls), abs=1e-4)
    assert "best of 4" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The layer picture on the toy world (tools/toy_eval.py --layers-out)


def test_layers_on_the_toy_world(toy_world, adapter, tmp_path, capsys):
    out = tmp_path / "layers.csv"
    write_layers(toy_eval.evaluate_toy_layers(toy_world, adapter), out)  # what --layers-out writes
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == list(range(toy.SIZES["small"].n_layers + 1))
    assert float(rows[0]["harmful_cosine"]) == pytest.approx(1.0)
    assert out.with_suffix(".png").is_file() == (importlib.util.find_spec("matplotlib") is not None)


def test_layers_out_needs_an_adapter(toy_world, tmp_path, monkeypatch):
    monkeypatch.setattr(toy_eval, "load_evaluated", lambda *a, **kw: pytest.fail("bad flags reached the evaluation"))
    with pytest.raises(SystemExit) as e:
        toy_eval.main(["--toy-root", str(toy_world), "--device", "cpu", "--out", str(tmp_path / "o.json"),
                       "--layers-out", str(tmp_path / "l.csv")])
    assert e.value.code == "toy_eval.py: error: --layers-out needs --adapter: the layer picture compares the " \
                           "circuit breaker with the base"
    assert not (tmp_path / "l.csv").exists() and not (tmp_path / "o.json").exists()

