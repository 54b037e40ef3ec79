"""
A seed sweep: train circuit breakers once per seed, evaluate each adapter, and report every metric's
spread over the seeds. One run is one draw: docs/toy.md says how far a seed can move the toy's numbers, so a
new loss or setting is judged on a sweep, not on a run.

    python tools/sweep.py --seeds 1,2,3,4,5 --out out/sweep/sweep.json                 # the toy preset
    python tools/sweep.py --seeds 1,2,3 --loss eot --lr 5e-4 --out out/eot/sweep.json  # any train.py flag
    python tools/sweep.py --seeds 1,2,3 --model smollm2 --out out/smollm2/sweep.json \\
        --harmbench harmbench_test.json --benign harmless_val.json                      # a real chat model

Each seed trains `train.py --model toy` (unless --model is given) with the other flags as they are, into
<out's folder>/seed<S>/, and is evaluated by toy_eval.py on the toy world, or by chat_eval.py on the
held-out --harmbench and --benign prompts for any other model. The base model is evaluated once: its
refusal direction (toy) is used for every seed's ablate attack, and its NLL threshold for the outcome
classes (scoring.py) and its own answers (chat) serve every seed, so the seeds differ only in their
training; a search over settings can reuse one base evaluation (--base-from an earlier sweep's JSON). The
JSON (written whole after each seed, so an interrupted sweep keeps its finished seeds):

    {"seeds": [1, 2], "train_flags": [...], "world": "toy", "target_layer": 3,
     "direction": {"layer": 3, "position": -1} or null,   # a chat model: "model_path", "harmbench", "benign",
                                                          # "attack_direction" (and "base_from")
     "summary": {metric: {"mean", "min", "max", "n", "base"}},   # each ASR followed by <attack>_broken, _refusal
     "base": <toy_eval.evaluate_toy's "base">,
     "runs": [{"seed": 1, "out": "out/sweep/seed1", "circuit_breaker": <its "circuit_breaker">}, ...],
     "timings": {"base_eval_seconds": s, "seeds": [{"seed": 1, "train_seconds": s, "eval_seconds": s}, ...]}}
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import torch

import cli
import toy
import train
from attacks import AttackConfig, check_attack
from chat_eval import CHAT_CONFIG, CHAT_METRICS, evaluate_chat
from scoring import THRESHOLDS
from toy_eval import TOY_CONFIG, TOY_METRICS, base_direction, evaluate_toy

# -----------------------------------------------------------------------------
# 1. The flags: the sweep's own, and train.py's, checked for every seed before anything is trained


def parse_seeds(text: str) -> list[int]:
    """--seeds 1,2,3; an empty item (1,,2) is refused, not skipped: it may be a seed left out."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text}: expected comma-separated integers, e.g. 1,2,3") from None
    for seed in seeds:
        cli.check_seed(seed, "--seeds")
    return seeds


def train_configs(seeds: list[int], train_args: list[str], out: Path) -> dict[int, train.TrainConfig]:
    """{seed: the run's train.TrainConfig}; train.py's own checks run here, before any training."""
    taken = [f for f in ("--seed", "--out") if any(a == f or a.startswith(f + "=") for a in train_args)]
    if taken:
        raise ValueError(f"{taken[0]}: the sweep sets each run's; use --seeds, and --out for the results file")
    if "--model" not in train_args and not any(a.startswith("--model=") for a in train_args):
        train_args = ["--model", "toy", *train_args]
    return {s: train.resolve(train.parse_args([*train_args, "--seed", str(s), "--out", str(out.parent / f"seed{s}")]))
            for s in seeds}


def toy_root(cfg: train.TrainConfig) -> Path:
    """The toy world the runs train on (the one that holds --model-path), built if it is not there yet."""
    root = Path(cfg.model_path).parent
    if not (root / "world.json").is_file():
        toy.ensure_world(root)
    return root


# -----------------------------------------------------------------------------
# 2. The sweep


def run(seeds: list[int], train_args: list[str], out, *, cfg: AttackConfig | None = None, harmbench=None,
        benign=None, n_embed_strong=0, attack_direction=None, base_from=None, log=print) -> dict:
    """Train and evaluate once per seed (see the module's docstring) -> the JSON's dict, also written to `out`.
    `harmbench`, `benign`: the held-out files of a chat model's evaluation (chat_eval.py); the toy's are its world's.
    `n_embed_strong`: a chat model's behaviours under the strong embedding attack (0: not run).
    `attack_direction`: a chat model's refusal direction (refusal.py's, of the base model) for the ablate and
    orthogonalized attacks (chat_eval.py); the toy finds its own.
    `base_from`: an earlier chat sweep's JSON whose base evaluation (of the same model and inputs) is reused."""
    out = Path(out)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: expected one or more different seeds")
    cli.check_output(out, "--out")
    cli.check_least(n_embed_strong, 0, "--n-embed-strong")
    if cfg is not None:
        check_attack(cfg)
    configs = train_configs(seeds, list(train_args), out)
    first = configs[seeds[0]]
    on_toy = first.model == "toy" or (Path(first.model_path).parent / "world.json").is_file()
    if on_toy and attack_direction:
        raise ValueError("--attack-direction: the toy's sweep finds the base model's direction itself")
    if on_toy and base_from:
        raise ValueError("--base-from: the toy's base evaluation takes seconds; it runs in every sweep")
    if not on_toy and not (harmbench and benign):
        raise ValueError(f"--model {first.model}: a chat model's sweep needs --harmbench FILE and --benign FILE "
                         "(held-out prompts; see chat_eval.py)")
    for run_cfg in configs.values():  # every run's output, model and data, before the base evaluation's minutes
        train.check_run(run_cfg)
    threads = torch.get_num_threads()  # the toy preset sets one thread for its run; the caller keeps its own
    try:
        t0 = time.perf_counter()
        if on_toy:
            base, evaluate, extra = toy_evaluation(first, cfg or TOY_CONFIG, log)
        else:
            base, evaluate, extra = chat_evaluation(first, cfg or CHAT_CONFIG, harmbench, benign, n_embed_strong,
                                                    attack_direction, base_from, log)
        result = {"seeds": list(seeds), "train_flags": list(train_args), **extra,
                  "target_layer": max(first.target_layers), "summary": {}, "base": base,
                  "runs": [], "timings": {"base_eval_seconds": round(time.perf_counter() - t0, 1), "seeds": []}}
        for i, (seed, run_cfg) in enumerate(configs.items()):
            log(f"sweep: seed {seed} ({i + 1}/{len(seeds)})")
            t1 = time.perf_counter()
            train.train(run_cfg)
            t2 = time.perf_counter()
            result["runs"].append({"seed": seed, "out": run_cfg.out, "circuit_breaker": evaluate(run_cfg)})
            result["timings"]["seeds"].append({"seed": seed, "train_seconds": round(t2 - t1, 1),
                                               "eval_seconds": round(time.perf_counter() - t2, 1)})
            result["summary"] = summarize(result)
            cli.write_json(out, result)
    finally:
        torch.set_num_threads(threads)
    return result


def toy_evaluation(first, cfg, log):
    """The toy world's evaluation: (the base model's result, one run's evaluation, the JSON's world keys).
    The base model's refusal direction and NLL thresholds serve every seed."""
    root = toy_root(first)
    direction = base_direction(root, first.device, log)
    base = evaluate_toy(root, cfg=cfg, device=first.device, direction=direction, search=False, log=log)["base"]

    def evaluate(run_cfg):
        return evaluate_toy(root, Path(run_cfg.out) / "adapter", cfg=cfg, device=run_cfg.device, direction=direction,
                            search=False, models=("circuit_breaker",),
                            thresholds={k: base[k] for k in THRESHOLDS.values() if k in base},
                            log=log)["circuit_breaker"]

    found = None if direction is None else {"layer": direction.layer, "position": direction.position}
    return base, evaluate, {"world": str(root), "direction": found}


def chat_evaluation(first, cfg, harmbench, benign, n_embed_strong, direction, base_from, log):
    """A chat model's evaluation (chat_eval.py), in the same shape as toy_evaluation's. The base model's
    answers are the reference texts and NLL threshold of every seed."""
    files = dict(harmbench=harmbench, benign=benign, n_embed_strong=n_embed_strong, direction=direction, cfg=cfg,
                 device=first.device, log=log)
    extra = {"model_path": first.model_path, "harmbench": str(harmbench), "benign": str(benign),
             "attack_direction": direction}
    if base_from:
        base = reused_base(base_from, extra, n_embed_strong)
        extra["base_from"] = str(base_from)
    else:
        base = evaluate_chat(first.model_path, **files)["base"]

    def evaluate(run_cfg):
        return evaluate_chat(run_cfg.model_path, Path(run_cfg.out) / "adapter", base_result=base,
                             **files)["circuit_breaker"]

    return base, evaluate, extra


def reused_base(path, expected: dict, n_embed_strong: int) -> dict:
    """The base evaluation of an earlier chat sweep (`path`), which must have had this sweep's model, prompt
    files, attack direction and strong-attack budget: each candidate of a search then costs its seeds only."""
    try:
        prior = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--base-from {path}: not JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"--base-from {path}: could not read it ({e.strerror})") from None
    if not isinstance(prior, dict) or "model_path" not in prior or "base" not in prior:
        raise ValueError(f"--base-from {path}: not a chat model's sweep (expected the keys 'model_path' and 'base')")
    for key, value in expected.items():
        if prior.get(key) != value:
            raise ValueError(f"--base-from {path}: its {key} is {prior.get(key)!r}, this sweep's {value!r}; the base "
                             "model must have been evaluated on the same model and inputs")
    strong = prior["base"].get("counts", {}).get("embed_strong_asr", {}).get("n", 0)
    if strong != n_embed_strong:
        raise ValueError(f"--base-from {path}: its base ran the strong embedding attack on {strong} behaviours, "
                         f"this sweep on {n_embed_strong} (--n-embed-strong)")
    if expected["attack_direction"] and THRESHOLDS["orthogonalized"] not in prior["base"]:
        raise ValueError(f"--base-from {path}: its base evaluation predates the orthogonalised model's NLL "
                         "threshold, which classes the ablate and orthogonalized answers; evaluate the base again")
    return prior["base"]


# -----------------------------------------------------------------------------
# 3. The summary: each metric's mean and range over the seeds, beside the base model's value


# Beside each ASR, the shares of its answers that were broken or refused: a broken model looks safe to an ASR.
OUTCOME_ROWS = ("broken", "refusal")


def metric_values(evaluation: dict, target_layer: int) -> dict:
    """One evaluation's numbers: its rates, each attack's broken and refusal rates after its ASR, and its
    layer cosines at the deepest target layer."""
    values = {}
    for m in (m for m in TOY_METRICS + CHAT_METRICS if m in evaluation):
        values[m] = evaluation[m]
        rates = evaluation.get("outcomes", {}).get(m.removesuffix("_asr"), {})
        values.update({f"{m.removesuffix('_asr')}_{c}": rates[c] for c in OUTCOME_ROWS if c in rates})
    for name, change in evaluation.get("nll_change", {}).items():
        values[f"{name}_nll_change"] = change
    for name, cosines in evaluation.get("layer_cos", {}).items():
        values[f"{name}_cos_{target_layer}"] = cosines[target_layer]
    return values


def summarize(result: dict) -> dict:
    layer = result["target_layer"]
    runs = [metric_values(r["circuit_breaker"], layer) for r in result["runs"]]
    base = metric_values(result["base"], layer)
    summary = {}
    for metric in dict.fromkeys(m for r in runs for m in r):  # in the evaluation's order
        values = [r[metric] for r in runs if metric in r]
        summary[metric] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                           "n": len(values), "base": base.get(metric)}  # the base's cosine is 1 by definition
    return summary


def summary_table(result: dict) -> str:
    lines = [f"{'':<20}{'base':>6}   circuit_breaker over seeds: mean [min, max]"]
    for metric, s in result["summary"].items():
        base = "-" if s["base"] is None else f"{s['base']:.2f}"
        lines.append(f"{metric:<20}{base:>6}   {s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}]  n={s['n']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 4. The command line


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's flags, and the rest: train.py's flags, passed through."""
    p = argparse.ArgumentParser(prog="sweep.py", allow_abbrev=False, description=__doc__,
                                usage="%(prog)s --seeds S,S,... --out FILE.json [train.py flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", required=True, help="comma-separated seeds, one training run each")
    p.add_argument("--out", required=True, help="results JSON; each run trains into seed<S>/ beside it")
    p.add_argument("--harmbench", help="chat models: HarmBench behaviours JSON (its standard ones are attacked)")
    p.add_argument("--benign", help="chat models: held-out benign instructions, [{\"instruction\"}]")
    p.add_argument("--n-embed-strong", type=int, default=0,
                   help="chat models: behaviours the embed_strong attack optimises (0: not run)")
    p.add_argument("--attack-direction", help="chat models: refusal.py's direction file of the base model, for "
                   "the ablate and orthogonalized attacks")
    p.add_argument("--base-from", help="chat models: an earlier sweep's JSON, of the same model, prompt files, "
                   "--attack-direction and --n-embed-strong, whose base evaluation is reused")
    return p.parse_known_args(argv)


def main(argv=None):
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = run(parse_seeds(args.seeds), train_args, args.out, harmbench=args.harmbench, benign=args.benign,
                     n_embed_strong=args.n_embed_strong, attack_direction=args.attack_direction,
                     base_from=args.base_from)
    except (ValueError, train.TrainingError) as e:
        sys.exit(f"sweep.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"sweep.py: error: {cli.os_error(e, '--out', args.out)}")
    print(summary_table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
