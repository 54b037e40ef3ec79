"""
A real chat model's evaluation without a 13B judge (also the sweep's, for any preset but the toy's): the
numbers the README's real-model table reports, for a model small enough to evaluate on a CPU, such as
SmolLM2-135M-Instruct.

    python tools/chat_eval.py --model-path checkpoints/SmolLM2-135M-Instruct --adapter out/smollm2/adapter \\
        --harmbench harmbench_test.json --benign harmless_val.json --out out/smollm2/chat.json
    # a refusing model and its refusal direction (refusal.py): two more attacks, ablate and orthogonalized
    python tools/chat_eval.py --model-path checkpoints/SmolLM2-135M-refusing --adapter out/refusing/adapter \
        --direction out/refusing/direction.safetensors --harmbench ... --benign ... --out out/refusing/chat.json

    result = evaluate_chat("checkpoints/SmolLM2-135M-Instruct", "out/smollm2/adapter",
                           harmbench="harmbench_test.json", benign="harmless_val.json")
    result["circuit_breaker"]["prefill_asr"]         # compliant share of the prefilled answers (upper bound)
    result["circuit_breaker"]["outcomes"]["prefill"]  # {"refusal", "broken", "compliant", "n", "ci95"}
    result["circuit_breaker"]["nll"]["harmful"]       # NLL per token of the base model's harmful answers
    result["circuit_breaker"]["layer_cos"]["harmful"]  # cosine base vs circuit-broken, l = 0..L

What it measures, on held-out prompts only (train on a set that `python tools/build_set.py --exclude` kept
apart from them):
  - HarmBench's standard behaviours (those without a context; `n_harmful` of them) under three attacks: direct, prefill
    (the answer begun with HarmBench's target) and the paper's embedding attack (on the first `n_embed`),
    and with `n_embed_strong` Schwinn & Geisler's (on the first `n_embed_strong`; a behaviour is broken
    when any of its solutions' answers is compliant).
  - With a `direction` (refusal.py's, found on the base model), two more attacks on the direct requests:
    ablate (the direction projected out of the evaluated model's stream everywhere, by hooks: for a
    circuit-broken model, the adapter's writes too, which equals orthogonalising its merged weights) and
    orthogonalized (the base model's weights orthogonalised, as refusal.py --export writes them, with
    the adapter merged on top: abliteration applied to the model the adapter was trained on). The benign
    instructions are asked of the orthogonalized model too: an ablation that breaks the model is no attack.
    Every answer gets its outcome class (scoring.py). With no harm judge at hand, an attack's ASR is its
    compliant rate: an upper bound, since a compliant answer may still be harmless or useless.
  - Benign ability: the first `n_benign` instructions of a held-out instruction list, asked directly;
    the compliant rate (neither refused nor broken).
  - The NLL per token, teacher-forced, of the base model's own answers: its compliant answers to the
    HarmBench behaviours (the harmful text the circuit breaker should make unlikely) and its answers
    to the benign instructions (which it should keep). The circuit-broken model's NLL of the same texts
    is beside it.
  - The paper's layer picture on those same texts (layers.py): base vs circuit-broken cosine per layer.

The base model is evaluated first; its answers and its NLL threshold for the `broken` class (the 99th
percentile of its NLL over its own benign answers) are the reference every circuit-broken model is
measured against. With a direction, the answers of the ablate and orthogonalized attacks are measured
against the orthogonalised base model and its own threshold (scoring.ORTHOGONALIZED says why).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import torch

import cli
import hf
import refusal
from attacks import (ATTACK_MINIMUMS, AttackConfig, add_attack_flags, answers_per_item, attack_ablate, attack_config,
                     attack_direct, attack_embed, attack_prefill, chat_prompt, check_attack, each_sample,
                     load_evaluated, release)
from data import Example, evenly_spaced, load_harmbench, load_instructions
from layers import text_cosines
from lora import merge_lora
from scoring import (NOT_FROM_TOKENS, any_solution, nll_per_token, nll_sums, nll_threshold, outcome, outcome_rates,
                     outcome_text, rate_text, recorded_thresholds, reference_for, scoring_prompt, wilson)

CHAT_METRICS = ("benign_compliant", "direct_asr", "prefill_asr", "embed_asr", "embed_strong_asr", "ablate_asr",
                "orthogonalized_asr", "orthogonalized_benign_compliant")
MODELS = ("base", "circuit_breaker")
# Sizes at which a 2-core CPU evaluates a 135M model in minutes (docs/smollm2.md, "Timings", says what
# they cost); pass larger ones on a faster machine.
CHAT_CONFIG = AttackConfig(batch_size=32, max_new_tokens=64, embed_steps=25)
N_HARMFUL, N_BENIGN, N_EMBED, N_EMBED_STRONG = 80, 64, 8, 0
MAX_LENGTH = 512  # prompt + answer of 128 tokens always fit: the layer picture never cuts one


def chat_items(harmbench, benign, n_harmful: int | None, n_benign: int) -> tuple[list[dict], list[dict]]:
    """n_harmful of HarmBench's standard behaviours (None: all), evenly spaced through the file (its
    behaviours come grouped by category), and the first n_benign benign instructions, as attack items."""
    standard = [{"behavior": r["behavior"], "context": None, "target": r["default_target"],
                 "messages": [dict(m) for m in r["messages"]]}
                for r in load_harmbench(harmbench) if r["context"] is None]
    harmful = evenly_spaced(standard, len(standard) if n_harmful is None else n_harmful)
    if not harmful:
        raise ValueError(f"{harmbench}: no standard behaviour (every one has a context)")
    instructions = load_instructions(benign)[:n_benign]
    return harmful, [{"instruction": r["instruction"], "messages": [{"role": "user", "content": r["instruction"]}]}
                     for r in instructions]


def evaluate_chat(model_path, adapter=None, *, harmbench, benign, n_harmful=N_HARMFUL, n_benign=N_BENIGN,
                  n_embed=N_EMBED, n_embed_strong=N_EMBED_STRONG, cfg: AttackConfig | None = None, device="cpu",
                  dtype="fp32", direction=None, base_result=None, log=print) -> dict:
    """{"base": {...}} and, with an adapter, {"circuit_breaker": {...}}. `base_result`: the base model's
    evaluation when already done (a sweep evaluates it once); it holds the reference texts and threshold.
    `direction`: a refusal.py file of the base model's, for the ablate and orthogonalized attacks."""
    cfg = cfg or CHAT_CONFIG
    check_attack(cfg)
    harmful, benign_items = chat_items(harmbench, benign, n_harmful, n_benign)
    if adapter is not None:
        hf.check_adapter(adapter, model_path)
    if direction is not None:
        direction = refusal.load_direction(direction, hf.model_args(hf.read_config(Path(model_path))))
    torch_dtype = hf.pick_dtype(dtype, device)
    fresh = lambda adapter_: load_evaluated(model_path, adapter_, torch_dtype, device, merge=False)[0]
    attacked = dict(n_embed=(n_embed, n_embed_strong), direction=direction, cfg=cfg)
    out = {}
    if base_result is None:
        log("chat evaluation: base")
        model, tok = load_evaluated(model_path, None, torch_dtype, device)
        ortho_base = orthogonalized(fresh(None), direction) if direction else None
        base_result = out["base"] = base_metrics(model, tok, harmful, benign_items, ortho_base, **attacked)
        del model, ortho_base
        release()
    if adapter is not None:
        log("chat evaluation: circuit_breaker")
        base, tok = load_evaluated(model_path, None, torch_dtype, device)
        model = fresh(adapter)
        ortho_base = orthogonalized(fresh(None), direction) if direction else None
        load_orthogonal = lambda: orthogonalized(fresh(adapter), direction)
        out["circuit_breaker"] = circuit_breaker_metrics(model, base, ortho_base, tok, harmful, benign_items,
                                                         load_orthogonal, base_result=base_result, **attacked)
        del model, base, ortho_base
        release()
    return out


def orthogonalized(model, direction):
    """The base weights under an unmerged adapter orthogonalised against the direction, then the adapter
    merged on top: its update may still write the direction, as it would on refusal.py --export's weights."""
    return merge_lora(refusal.orthogonalize(model, direction.direction)).eval()


# -----------------------------------------------------------------------------
# The two models' metrics


def base_metrics(model, tok, harmful, benign, ortho_base, *, n_embed, direction, cfg) -> dict:
    """The base model's rates, and the reference the circuit-broken models are measured against: its
    benign answers' NLL threshold (and, with a direction, the orthogonalised base model's, from its own
    benign answers: scoring.ORTHOGONALIZED), and the texts (its own answers) whose NLL and layer cosines
    are compared."""
    answers = [r["generation"] for r in attack_direct(model, tok, benign, cfg)]
    references = {"base": (model, benign_threshold(model, tok, benign, answers, cfg))}
    orthogonal = None
    if ortho_base is not None:
        ortho_answers = [r["generation"] for r in attack_direct(ortho_base, tok, benign, cfg)]
        references["orthogonalized"] = ortho_base, benign_threshold(ortho_base, tok, benign, ortho_answers, cfg)
        orthogonal = ortho_base, ortho_answers
    metrics = attack_metrics(model, tok, harmful, benign, answers, n_embed, cfg, references, direction, orthogonal)
    compliant = [g for g in metrics["generations"]
                 if g["set"] == "harmful" and g["attack"] == "direct" and g["outcome"] == "compliant"]
    texts = {"harmful": [(g["behavior"], g["generation"]) for g in compliant],
             "benign": [(it["instruction"], a) for it, a in zip(benign, answers)]}
    return {**metrics, **recorded_thresholds(references), "reference_texts": texts,
            "nll": reference_nll(model, tok, texts, cfg.batch_size)}


def benign_threshold(model, tok, benign, answers, cfg) -> float | None:
    """scoring.nll_threshold of `model`'s own answers to the benign instructions."""
    prompts = [chat_prompt(tok, it["messages"]) for it in benign]
    return nll_threshold(nll_per_token(model, tok, prompts, answers, cfg.batch_size))


def circuit_breaker_metrics(model, base, ortho_base, tok, harmful, benign, load_orthogonal, *, n_embed, direction,
                            cfg, base_result) -> dict:
    """The same rates; the NLL of the base model's texts and the layer cosines (measured first, while
    the adapter can still be switched off), then every attack on the merged weights. Answers are classed
    against the base model (`ortho_base`, orthogonalised, for the attacks that remove the direction) and
    the thresholds of its evaluation. `load_orthogonal` loads the circuit-broken model orthogonalised."""
    texts = base_result["reference_texts"]
    cosines = text_cosines(model, tok, texts, MAX_LENGTH, cfg.batch_size)
    nll = reference_nll(model, tok, texts, cfg.batch_size)
    merge_lora(model).eval()
    answers = [r["generation"] for r in attack_direct(model, tok, benign, cfg)]
    references, orthogonal = {"base": (base, base_result["nll_threshold"])}, None
    if ortho_base is not None:
        references["orthogonalized"] = ortho_base, base_result["orthogonalized_nll_threshold"]
        ortho = load_orthogonal()
        orthogonal = ortho, [r["generation"] for r in attack_direct(ortho, tok, benign, cfg)]
    metrics = attack_metrics(model, tok, harmful, benign, answers, n_embed, cfg, references, direction, orthogonal)
    change = {name: nll[name] / base_result["nll"][name] - 1 for name in nll}
    return {**metrics, "nll": nll, "nll_change": change,
            "layer_cos": {name: cosines[name] for name in ("harmful", "benign")},
            "n_layer_texts": {name: cosines[f"n_{name}"] for name in ("harmful", "benign")}}


def attack_metrics(model, tok, harmful, benign, benign_answers, n_embed, cfg, references, direction=None,
                   orthogonal=None) -> dict:
    """Benign compliance and each attack's ASR (its compliant rate), with counts, Wilson intervals,
    outcome classes and every generation. `references`: {"base": (model, NLL threshold)} for the broken
    class, and "orthogonalized" with a direction (scoring.ORTHOGONALIZED).
    `n_embed`: (behaviours under the paper's embedding attack, under the strong one; 0 skips it).
    `direction`, `orthogonal` ((the orthogonalized model, its answers to the benign instructions)):
    the ablate and orthogonalized attacks, and the benign answers of the orthogonalized model."""
    asked = [{"prompt": it["instruction"], "generation": a} for it, a in zip(benign, benign_answers)]
    generations = judge(benign, asked, "benign", "direct", tok, cfg, references)
    n_paper, n_strong = n_embed
    attacks = {"direct": lambda: attack_direct(model, tok, harmful, cfg),
               "prefill": lambda: attack_prefill(model, tok, harmful, cfg)}
    if n_paper:
        attacks["embed"] = lambda: attack_embed(model, tok, harmful[:n_paper], cfg)
    if n_strong:
        attacks["embed_strong"] = lambda: attack_embed(model, tok, harmful[:n_strong], cfg, strong=True)
    if direction is not None:
        attacks["ablate"] = lambda: attack_ablate(model, tok, harmful, cfg, direction)
    counts = {"benign_compliant": count(generations)}
    outcomes = {"benign": outcome_rates([g["outcome"] for g in generations])}
    for attack, run in attacks.items():
        results = run()
        items = [it for it, _ in each_sample(harmful, answers_per_item(attack, cfg))]  # the item of each result
        judged = judge(items, results, "harmful", attack, tok, cfg, references)
        successes = any_solution([g["outcome"] == "compliant" for g in judged], attack, cfg)
        counts[f"{attack}_asr"] = {"successes": sum(successes), "n": len(successes)}
        outcomes[attack] = outcome_rates([g["outcome"] for g in judged])
        generations += judged
    if orthogonal is not None:
        ortho, ortho_answers = orthogonal
        asked = [{"prompt": it["instruction"], "generation": a} for it, a in zip(benign, ortho_answers)]
        judged_benign = judge(benign, asked, "benign", "orthogonalized", tok, cfg, references)
        judged = judge(harmful, attack_direct(ortho, tok, harmful, cfg), "harmful", "orthogonalized", tok, cfg,
                       references)
        counts["orthogonalized_benign_compliant"] = count(judged_benign)
        counts["orthogonalized_asr"] = count(judged)
        outcomes["orthogonalized_benign"] = outcome_rates([g["outcome"] for g in judged_benign])
        outcomes["orthogonalized"] = outcome_rates([g["outcome"] for g in judged])
        generations += judged_benign + judged
        del ortho
    rates = {m: c["successes"] / c["n"] for m, c in counts.items()}
    return {**rates, "judge": "none: ASR is the compliant rate, an upper bound", "counts": counts,
            "ci95": {m: wilson(c["successes"], c["n"]) for m, c in counts.items()}, "outcomes": outcomes,
            "generations": generations}


def judge(items, results, kind, attack, tok, cfg, references) -> list[dict]:
    """Generation records with their outcome class; the NLL is the reference model's (scoring.py's
    ORTHOGONALIZED: the orthogonalised base for ablate and orthogonalized, else the base), after the
    prompt sent."""
    base, threshold = reference_for(attack, references)
    texts = [r["generation"] for r in results]
    if attack in NOT_FROM_TOKENS:
        nlls = [None] * len(texts)
    else:
        nlls = nll_per_token(base, tok, [scoring_prompt(tok, r) for r in results], texts, cfg.batch_size)
    return [{"set": kind, "attack": attack, "behavior": it.get("behavior", it.get("instruction")), "generation": g,
             **({"solution": r["solution"]} if "solution" in r else {}),
             "outcome": outcome(g, nll, threshold), "nll": None if nll is None else round(nll, 4)}
            for it, r, g, nll in zip(items, results, texts, nlls)]


def count(generations) -> dict:
    return {"successes": sum(g["outcome"] == "compliant" for g in generations), "n": len(generations)}


@torch.no_grad()
def reference_nll(model, tok, texts: dict, batch_size: int) -> dict:
    """{set: mean NLL per token of its answers after their prompts}, over all answer tokens of the set."""
    out = {}
    for name, pairs in texts.items():
        examples = []
        for question, answer in pairs:
            prompt, ids = chat_prompt(tok, [{"role": "user", "content": question}]), tok.encode(answer)
            examples += [Example(prompt + ids, len(prompt), [0] * len(prompt) + [1] * len(ids))] if ids else []
        sums = nll_sums(model, examples, batch_size)
        out[name] = sum(s for s, _ in sums) / max(sum(n for _, n in sums), 1)
    return out



def chat_table(result: dict) -> str:
    """Each model's rates as rate (successes/n) [95% interval], each attack's outcome classes under it,
    then the NLL of the reference texts and (circuit-broken) the layer cosines at the deepest layers."""
    names = list(result)
    lines = [f"{'':<22}" + "".join(f"{n:>32}" for n in names)]
    for m in (m for m in CHAT_METRICS if all(m in result[n]["counts"] for n in names)):
        lines.append(f"{m:<22}" + "".join(f"{rate_text(**result[n]['counts'][m]):>32}" for n in names))
        kind = m.removesuffix("_asr").removesuffix("_compliant")
        lines += [f"  {c:<20}" + "".join(f"{outcome_text(result[n]['outcomes'][kind], c):>32}" for n in names)
                  for c in ("refusal", "broken")]
    for text in ("harmful", "benign"):
        lines.append(f"{'NLL/token ' + text:<22}" + "".join(f"{result[n]['nll'][text]:>32.3f}" for n in names))
    if "circuit_breaker" in result:
        cos = result["circuit_breaker"]["layer_cos"]
        for layer in sorted({len(cos["harmful"]) // 3, 2 * len(cos["harmful"]) // 3}):
            lines.append(f"cosine at layer {layer}: harmful {cos['harmful'][layer]:.3f}, "
                         f"benign {cos['benign'][layer]:.3f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Command line

MINIMUMS = {**ATTACK_MINIMUMS, "n_harmful": 1, "n_benign": 1, "n_embed": 0, "n_embed_strong": 0}


def parse_args(argv):
    about = ("A small chat model, no judge needed: HarmBench's standard behaviours (direct, prefill, embed), "
             "held-out benign prompts, the NLL of the base model's answers, layer cosines.")
    p = argparse.ArgumentParser(prog="chat_eval.py", allow_abbrev=False, description=about)
    d = cli.keyword_defaults(evaluate_chat)
    cli.add_model_flags(p)
    p.add_argument("--harmbench", required=True, help="HarmBench JSON: its standard behaviours are attacked")
    p.add_argument("--benign", required=True,
                   help="held-out benign instructions, [{\"instruction\"}] (harmless_val.json)")
    p.add_argument("--n-harmful", type=int, default=d["n_harmful"],
                   help="standard behaviours attacked, evenly spaced through the file")
    p.add_argument("--n-benign", type=int, default=d["n_benign"], help="benign instructions asked")
    p.add_argument("--n-embed", type=int, default=d["n_embed"], help="behaviours the embed attack optimises")
    p.add_argument("--n-embed-strong", type=int, default=d["n_embed_strong"],
                   help="behaviours the embed_strong attack optimises (0: not run)")
    p.add_argument("--direction", help="refusal.py's direction file of the base model: adds the ablate and "
                   "orthogonalized attacks")
    p.add_argument("--out", required=True, help="results JSON")
    add_attack_flags(p, CHAT_CONFIG, ("batch_size", "max_new_tokens", "embed_steps", "embed_strong_steps",
                                      "embed_strong_solutions", "embed_strong_gap"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cli.check_flags(args, MINIMUMS, {"out": False})  # a bad --out would fail only after the generation
        cli.use_threads(args.threads)
        result = cli.call(evaluate_chat, args, cfg=attack_config(args, CHAT_CONFIG))
        print(chat_table(result))
        cli.write_json(args.out, result)
        print(f"wrote {args.out}")
    except ValueError as e:
        sys.exit(f"chat_eval.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"chat_eval.py: error: {cli.os_error(e, '--out', args.out)}")


if __name__ == "__main__":
    main()
