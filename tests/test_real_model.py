"""The method on a real chat model, end to end and short: SmolLM2-135M-Instruct writes a small circuit-breaker
set (`python data.py build`), `train.py --model smollm2` trains on it for a few steps, and the harmful states
at the deepest target layer have moved away from the base model's clearly more than benign ones.
The full recipe and its three-seed evaluation are README's "A real model on a CPU"; this is its smoke test."""
import json

import pytest

import build_set
import data
import train
from conftest import SHARED
from layers import evaluate_layers

REFUSAL_DIR = SHARED / "data" / "refusal_direction"


@pytest.fixture(scope="module")
def smollm2_set(tmp_path_factory, smollm2_model):
    """A small model-written set: 40 harmful instructions (8 for validation) and 24 harmless ones,
    32-token answers, filtered against HarmBench."""
    if not (REFUSAL_DIR / "harmful_train.json").is_file():
        pytest.skip(f"{REFUSAL_DIR} not found: the instruction files live there")
    out = tmp_path_factory.mktemp("smollm2_set") / "set"
    build_set.main(["build", "--model-path", str(smollm2_model), "--harmful", str(REFUSAL_DIR / "harmful_train.json"),
                    "--harmless", str(REFUSAL_DIR / "harmless_train.json"), "--exclude",
                    str(SHARED / "data" / "harmbench_test.json"), "--n-harmful", "40", "--n-val", "8",
                    "--n-harmless", "24", "--max-new-tokens", "32", "--out", str(out)])
    return out


def test_model_written_set(smollm2_set):
    """SmolLM2 has had no refusal training: it answers nearly every harmful instruction, so nearly all
    become circuit-breaker examples; none of them is a HarmBench paraphrase."""
    counts = json.loads((smollm2_set / "build.json").read_text())["counts"]
    assert counts["dropped_similar"] > 0
    assert counts["circuit_breaker"] >= 0.75 * 32 and counts["validation"] >= 4 and counts["retain"] >= 20
    assert len(data.load_circuit_breaker_set(smollm2_set / data.CB_TRAIN)) == counts["circuit_breaker"]


def test_short_run_reroutes_harmful_states(tmp_path, smollm2_model, smollm2_set):
    out = tmp_path / "run"
    cfg = train.resolve(train.parse_args([
        "--model", "smollm2", "--model-path", str(smollm2_model), "--data-dir", str(smollm2_set), "--out", str(out),
        "--steps", "12", "--batch-size", "4", "--lr", "2e-3", "--xstest-repeat", "0", "--ckpt-every", "0",
        "--log-every", "4"]))
    train.train(cfg)
    result = evaluate_layers(smollm2_model, out / "adapter", smollm2_set / data.CB_VAL,
                             benign=smollm2_set / data.ULTRACHAT, limit=8, batch_size=8)
    layer = max(cfg.target_layers)
    harmful, benign = result["harmful"][layer], result["benign"][layer]
    # Twelve steps at twice the preset's lr: a smoke test, not the recipe. Measured on the development
    # machine: harmful 0.08, benign 0.67; the full recipe's three-seed numbers are in README.
    assert harmful < 0.4 and benign - harmful > 0.3, (harmful, benign)
