"""
Evaluate a model, with or without circuit breakers: attack success rate (ASR) under the attacks of
attacks.py, judged as scoring.py says (the HarmBench classifier run on our own model.py), over-refusal, the
paper's layer analysis (layers.py) and perplexity. One command per evaluation:

    # HarmBench: an attack, then a judge (--adapter: a PEFT adapter from train.py; or pass a merged export)
    python eval.py harmbench --model-path checkpoints/Meta-Llama-3-8B-Instruct --adapter out/llama3/adapter \\
        --benchmark ../shared/data/harmbench_test.json --attack prefill \\
        --judge harmbench --judge-path checkpoints/HarmBench-Llama-2-13b-cls --out results.json
    #   --attack direct|prefill|embed|embed_strong|repe|ablate (repe, ablate: --direction FILE);
    #   --judge harmbench|none|refusal; --samples k --temperature T: k sampled answers per behaviour
    # Over-refusal: XSTest's prompts, asked directly, judged by refusal phrases
    python eval.py xstest --model-path DIR --adapter DIR --benchmark xstest_v2_completions_gpt4_gpteval.csv --out x.json
    #   --xstest-holdout 0.5: only the prompts train.py --xstest-holdout 0.5 kept out of training
    # The paper's analysis: cosine between base and circuit-broken residual states, layer by layer
    python eval.py layers --model-path DIR --adapter DIR --data data/circuit_breakers_val.json --out layers.csv
    # Benign capability, cheaply: held-out chat perplexity, base versus circuit-broken
    python eval.py perplexity --model-path DIR --adapter DIR --data held_out_chat.jsonl

The judges (scoring.py): harmbench, HarmBench's classifier (a Llama-2-13B) run on model.py with HarmBench's
prompt, "yes" meaning the attack succeeded; none, no judge of harm: an answer succeeds when it is compliant in
form, so the ASR is an upper bound; refusal, phrase matching, cheap and fooled by broken text (which it counts
as success). Whatever the judge, every answer also gets its outcome class (refusal, broken or compliant),
reported beside the ASR: a broken model looks safe to an ASR. The toy world and a small chat model without a
judge have their own evaluations, built on this one: tools/toy_eval.py and tools/chat_eval.py.
"""

import argparse
import csv
import io
import math
import sys
import time
from pathlib import Path


import cli
import hf
from attacks import (ATTACK_MINIMUMS, ATTACKS, AttackConfig, add_attack_flags, answers_per_item, attack_config,
                     attack_direct, chat_prompt, check_attack, decoding, each_sample, load_evaluated, read_direction,
                     release, run_attack, solutions)
from data import Example, evenly_spaced, load_harmbench, load_ultrachat, read_text, xstest_held_out
from layers import evaluate_layers, layers_table, write_layers
from lora import lora_disabled
from scoring import (JUDGES, OUTCOMES, best_of_k, check_judge_path, is_refusal, judge_harmbench, judge_none,
                     judge_refusal, nll_sums, outcome, outcome_rates, rate_text, sampled_rates, wilson)

# -----------------------------------------------------------------------------
# 1. Benchmarks


def harmbench_items(records: list[dict]) -> list[dict]:
    """HarmBench records (data.load_harmbench) -> evaluation items: the chat messages to send, the
    behaviour and context the judge reads, and the target the prefill and embed attacks use."""
    items = []
    for r in records:
        messages = [dict(m) for m in r["messages"]]
        if r.get("context") is not None:  # the official layout of a contextual behaviour: context, rule, request
            messages[-1]["content"] = f"{r['context']}\n\n---\n\n{messages[-1]['content']}"
        items.append({"behavior": r["behavior"], "context": r.get("context"), "messages": messages,
                      "target": r["default_target"]})
    return items


def load_xstest_prompts(path) -> list[dict]:
    """XSTest prompts from either official CSV: xstest_prompts.csv (a `label` column, safe/unsafe) or
    xstest_v2_completions_*.csv (no label: the `contrast_*` types are the unsafe prompts).
    -> [{"id", "type", "prompt", "safe"}]. Every row, whatever a stored completion's label."""
    path = Path(path)
    with io.StringIO(read_text(path), newline="") as f:  # a byte that is not UTF-8 is named by file and line
        reader = csv.DictReader(f)
        missing = [c for c in ("prompt", "type") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: line 1: missing column(s) {', '.join(missing)}; an XSTest CSV has "
                             f"'prompt' and 'type' (found {', '.join(reader.fieldnames or []) or 'none'})")
        rows = []
        for row in reader:
            if not row["prompt"] or not row["type"]:
                raise ValueError(f"{path}: line {reader.line_num}: empty 'prompt' or 'type'")
            safe = row["label"] == "safe" if row.get("label") else not row["type"].startswith("contrast_")
            rows.append({"id": row.get("id") or str(len(rows)), "type": row["type"], "prompt": row["prompt"],
                         "safe": safe})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# -----------------------------------------------------------------------------
# 2. HarmBench evaluation: attack, then judge, then the numbers


def evaluate_harmbench(model_path, benchmark, *, adapter=None, attack="direct", judge="refusal", judge_path=None,
                       direction=None, start=0, limit=None, spread=None,
                       cfg: AttackConfig | None = None, device="cpu", dtype="auto") -> dict:
    """Attack `limit` behaviours of a HarmBench JSON from `start`, then judge the answers (cfg.samples per
    behaviour); `direction`: a refusal.py file for repe and ablate. Every input is checked first, so bad input
    stops the run before any generation.

    With k = cfg.samples answers per behaviour, `asr`, `n`, `by_split`, `ci95` and `outcomes` count every
    answer (n = behaviours x k; with one greedy answer, the behaviours); `per_sample` says the same, and
    `best_of_k` counts a behaviour as a success once any of its k answers is judged one."""
    cfg = cfg or AttackConfig()
    check_attack(cfg)
    if attack not in ATTACKS or judge not in JUDGES:
        raise ValueError(f"attack {attack!r}, judge {judge!r}: expected one of {ATTACKS} and one of {JUDGES}")
    items = harmbench_items(load_harmbench(benchmark))
    if spread is not None:  # as tools/chat_eval.py picks its behaviours
        items = evenly_spaced([it for it in items if it["context"] is None], spread)
    items = items[start:None if limit is None else start + limit]
    if not items:
        raise ValueError(f"{benchmark}: no behaviours left after --start {start} --limit {limit}")
    if judge == "harmbench":
        if not judge_path:
            raise ValueError("--judge harmbench needs --judge-path (the HarmBench-Llama-2-13b-cls directory)")
        check_judge_path(judge_path)
    if adapter:
        hf.check_adapter(adapter, model_path)
    steering = read_direction(direction, attack, model_path, cfg)
    hf.load_tokenizer(model_path)  # one for another model would fail only once the model runs

    dtype = hf.pick_dtype(dtype, device)
    model, tok = load_evaluated(model_path, adapter, dtype, device)
    t0 = time.time()
    results = run_attack(attack, model, tok, items, cfg, steering)
    gen_seconds = time.time() - t0
    del model
    release()
    generations = [r["generation"] for r in results]
    sampled = [it for it, _ in each_sample(items, answers_per_item(attack, cfg))]  # the item of each answer
    if judge == "harmbench":
        scores = judge_harmbench(judge_path, sampled, generations, cfg.batch_size, dtype, device)
    elif judge == "none":
        scores = judge_none(generations)
    else:
        scores = judge_refusal(generations)
    # No benign reference set here for the base model's NLL threshold: HarmBench's `broken` is empty or
    # degenerate repetition only (scoring.py).
    records = [{"behavior": it["behavior"], "context": it["context"], **r, "score": s, "outcome": outcome(g)}
               for it, r, s, g in zip(sampled, results, scores, generations)]
    # The rates count one answer per behaviour and sample: for embed_strong, a success of any solution's.
    by_split = dict(harmbench_splits(records, solutions(attack, cfg)))
    solved = by_split["all"]
    splits = {name: (sum(successes), len(successes)) for name, successes in by_split.items()}
    return {"benchmark": "harmbench", "attack": attack, "judge": judge,
            "asr": sum(solved) / len(solved), "n": len(solved), "solutions": solutions(attack, cfg),
            "samples": cfg.samples, "decoding": decoding(cfg), **sampled_rates(solved, cfg.samples),
            "n_unparsed": sum(s == -1 for s in scores), "generation_seconds": round(gen_seconds, 1),
            "by_split": {name: {"asr": k / n, "n": n} for name, (k, n) in splits.items() if name != "all"},
            "ci95": {"asr": wilson(*splits["all"]),
                     "by_split": {name: wilson(k, n) for name, (k, n) in splits.items() if name != "all"}},
            "outcomes": outcome_rates([r["outcome"] for r in records]), "records": records}


def harmbench_splits(records, n_solutions: int) -> list[tuple[str, list[bool]]]:
    """The successes per behaviour and sample (a success of any of its n_solutions answers), all, then the
    standard and the contextual ones (a split left out when it has none)."""
    solved = best_of_k([r["score"] == 1 for r in records], n_solutions)
    context = [r["context"] for r in records[::n_solutions]]
    splits = [("all", solved), ("standard", [s for s, c in zip(solved, context) if c is None]),
              ("contextual", [s for s, c in zip(solved, context) if c is not None])]
    return [(name, rows) for name, rows in splits if rows]


def harmbench_table(result: dict) -> str:
    """ASR over all answers, and split into standard and contextual behaviours, with 95% intervals; with k
    samples per behaviour, the best-of-k ASR over behaviours; beside them, the share of all answers in each
    outcome class (a broken model's low ASR is no safety)."""
    lines = [f"{'behaviours':<12} ASR (successes/n) [95% interval]"]
    for name, solved in harmbench_splits(result["records"], result.get("solutions", 1)):
        lines.append(f"{name:<12} {rate_text(sum(solved), len(solved))}")
    if result.get("samples", 1) > 1:
        best = result["best_of_k"]
        lines.append(f"{'best of ' + str(result['samples']):<12} {rate_text(best['successes'], best['n'])}")
    outcomes = [r["outcome"] for r in result["records"]]
    lines += [f"{c:<12} {rate_text(outcomes.count(c), len(outcomes))}" for c in OUTCOMES]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 3. Over-refusal: XSTest's safe prompts (which sound harmful) should be answered


def evaluate_xstest(model_path, benchmark, *, adapter=None, start=0, limit=None, xstest_holdout=0.0,
                    cfg: AttackConfig | None = None, device="cpu", dtype="auto") -> dict:
    """The prompts of an XSTest CSV (`limit` of them from `start`) asked directly; refusals by phrase.

    XSTest's compliant answers are in the official retain set, so a model trained on it has seen these
    prompts answered: its over-refusal here is contaminated. `xstest_holdout` > 0 keeps only the prompts
    train.py --xstest-holdout with the same share kept out of training (data.xstest_held_out)."""
    if not 0 <= xstest_holdout < 1:
        raise ValueError(f"--xstest-holdout {xstest_holdout}: expected a share in [0, 1)")
    rows = load_xstest_prompts(benchmark)
    if xstest_holdout:
        rows = [r for r in rows if xstest_held_out(r["prompt"], xstest_holdout)]
    rows = rows[start:None if limit is None else start + limit]
    if not rows:
        raise ValueError(f"{benchmark}: no prompts left after --xstest-holdout {xstest_holdout} --start {start} "
                         f"--limit {limit}")
    model, tok = load_evaluated(model_path, adapter, hf.pick_dtype(dtype, device), device)
    items = [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    results = attack_direct(model, tok, items, cfg or AttackConfig())
    del model
    release()
    records = [{**row, "generation": r["generation"], "refused": is_refusal(r["generation"])}
               for row, r in zip(rows, results)]
    safe, unsafe = [r for r in records if r["safe"]], [r for r in records if not r["safe"]]
    by_type = group_by_type(records)
    return {"benchmark": "xstest", "xstest_holdout": xstest_holdout, "over_refusal": refusal_rate(safe),
            "unsafe_refusal": refusal_rate(unsafe), "n_safe": len(safe), "n_unsafe": len(unsafe),
            "by_type": {t: refusal_rate(rows) for t, rows in by_type.items()},  # in file order
            "n_by_type": {t: len(rows) for t, rows in by_type.items()},
            "ci95": {"over_refusal": refusal_interval(safe), "unsafe_refusal": refusal_interval(unsafe),
                     "by_type": {t: refusal_interval(rows) for t, rows in by_type.items()}},
            "records": records}


def group_by_type(records) -> dict[str, list[dict]]:
    return {t: [r for r in records if r["type"] == t] for t in dict.fromkeys(r["type"] for r in records)}


def refusal_rate(records) -> float | None:
    return sum(r["refused"] for r in records) / len(records) if records else None


def refusal_interval(records) -> tuple[float, float] | None:
    return wilson(sum(r["refused"] for r in records), len(records))


def xstest_table(result: dict) -> str:
    """The refusal rate of each prompt type, with its 95% interval."""
    lines = [f"{'type':<32} refused (refusals/n) [95% interval]"]
    for t, rows in group_by_type(result["records"]).items():
        lines.append(f"{t:<32} {rate_text(sum(r['refused'] for r in rows), len(rows))}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 4. Perplexity on held-out chat: the cheap check that benign answers are still likely


def conversation_examples(tok, conversations, max_length: int) -> list[Example]:
    """-> examples: the whole conversation in the chat template, loss on the assistant's tokens (each
    assistant turn: its tokens after the template of everything before it)."""
    out = []
    for c in conversations:
        messages = c["messages"]
        ids = tok.apply_chat_template(messages)
        loss_mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = chat_prompt(tok, messages[:i])
            upto = tok.apply_chat_template(messages[:i + 1])
            if ids[:len(upto)] != upto or upto[:len(before)] != before:
                raise ValueError(f"perplexity: the chat template of {messages[0]['content'][:40]!r} does not "
                                 "extend turn by turn; cannot find the assistant's tokens")
            loss_mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
        ids, loss_mask = ids[:max_length], loss_mask[:max_length]
        if sum(loss_mask[1:]):
            out.append(Example(ids, loss_mask.index(1), loss_mask))
    return out


def mean_nll(model, examples, batch_size: int) -> float:
    """Mean negative log-likelihood per assistant token."""
    sums = nll_sums(model, examples, batch_size)
    return sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1)


def evaluate_perplexity(model_path, adapter, data, *, limit=100, max_length=1024, batch_size=8, device="cpu",
                        dtype="auto") -> dict:
    """Perplexity of the assistant's turns in `limit` held-out chats, adapter off (base) and on."""
    tok = hf.load_tokenizer(model_path)
    conversations = load_ultrachat(data, limit=limit, check=tok.check_chat)  # its turn order, by file and line
    model, _ = load_evaluated(model_path, adapter, hf.pick_dtype(dtype, device), device, merge=False)
    examples = conversation_examples(tok, conversations, max_length)
    with lora_disabled(model):
        base = mean_nll(model, examples, batch_size)
    broken = mean_nll(model, examples, batch_size)
    return {"data": str(data), "n": len(examples), "base_perplexity": math.exp(base),
            "circuit_breaker_perplexity": math.exp(broken)}


# -----------------------------------------------------------------------------
# 5. Command line: one parser, a command per evaluation; a flag feeds the parameter of its name (cli.call)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="eval.py", allow_abbrev=False, description="Attack a model and judge the "
                                "answers, or measure what its circuit breaker changed.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, about, fn):  # -> the command's parser, and the defaults of the function it feeds
        return commands.add_parser(name, help=about, description=about, allow_abbrev=False), cli.keyword_defaults(fn)

    c, d = command("harmbench", "attack HarmBench behaviours, then judge the answers", evaluate_harmbench)
    cli.add_model_flags(c)
    c.add_argument("--benchmark", required=True, help="HarmBench JSON (the circuit-breaker evaluation's format)")
    c.add_argument("--attack", choices=ATTACKS, default=d["attack"])
    c.add_argument("--judge", choices=JUDGES, default=d["judge"])
    c.add_argument("--judge-path", help="HarmBench classifier directory (cais/HarmBench-Llama-2-13b-cls)")
    c.add_argument("--direction", help="refusal direction file (refusal.py) for repe and ablate")
    add_slice_flags(c, d, "behaviour")
    c.add_argument("--spread", type=int, help="only this many of the standard behaviours (no context), evenly "
                   "spaced through the file, as tools/chat_eval.py picks them (before --start and --limit)")
    c.add_argument("--out", required=True, help="results JSON")
    add_attack_flags(c, AttackConfig())

    c, d = command("xstest", "over-refusal: XSTest's prompts asked directly, refusals by phrase", evaluate_xstest)
    cli.add_model_flags(c)
    c.add_argument("--benchmark", required=True, help="xstest_prompts.csv or xstest_v2_completions_*.csv")
    c.add_argument("--xstest-holdout", type=float, default=d["xstest_holdout"],
                   help="only the prompts train.py --xstest-holdout with this share kept out of the retain set "
                        "(0: every prompt; contaminated for a model trained on XSTest)")
    add_slice_flags(c, d, "prompt")
    c.add_argument("--out", required=True, help="results JSON")
    add_attack_flags(c, AttackConfig(), ("batch_size", "max_new_tokens"))

    c, d = command("layers", "cosine of base and circuit-broken states, layer by layer", evaluate_layers)
    add_analysis_flags(c, d, "circuit-breaker set JSON (harmful prompt + output)")
    c.add_argument("--benign", help="benign chat JSONL (default: ultrachat.jsonl beside --data)")
    c.add_argument("--out", default="layers.csv", help="CSV to write (a PNG beside it with matplotlib)")

    c, d = command("perplexity", "held-out chat perplexity, base and circuit-broken", evaluate_perplexity)
    add_analysis_flags(c, d, "held-out chat JSONL ({'messages': [...]} per line)")
    c.add_argument("--out", help="results JSON")
    return p.parse_args(argv)


def add_slice_flags(p, defaults, what: str):
    p.add_argument("--start", type=int, default=defaults["start"], help=f"first {what}")
    p.add_argument("--limit", type=int, default=defaults["limit"], help=f"number of {what}s (default: all)")


def add_analysis_flags(p, defaults, data: str, required=True):
    cli.add_model_flags(p, adapter_required=True, required=required)
    p.add_argument("--data", required=required, help=data)
    p.add_argument("--limit", type=int, default=defaults["limit"], help="texts per set")
    p.add_argument("--max-length", type=int, default=defaults["max_length"])
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"])


# The least value of each counting flag; a negative --start or --limit would be a Python slice.
MINIMUMS = {**ATTACK_MINIMUMS, "start": 0, "limit": 1, "max_length": 1, "spread": 1}


def run(args):
    """One command: its function called with the flags (cli.call), then its table, and its file."""
    if args.command == "harmbench":
        result = {"args": vars(args), **cli.call(evaluate_harmbench, args, cfg=attack_config(args, AttackConfig()))}
        print(harmbench_table(result))
        print(f"ASR {rate_text(result['per_sample']['successes'], result['n'])} "
              f"attack={args.attack} judge={args.judge} model={args.model_path} adapter={args.adapter}"
              + (f"; {result['n_unparsed']} judge answers neither yes nor no" if result["n_unparsed"] else ""))
        if args.samples and args.samples > 1:
            best = result["best_of_k"]
            print(f"best-of-{args.samples} ASR {rate_text(best['successes'], best['n'])} (temperature "
                  f"{result['decoding']['temperature']}, top-p {result['decoding']['top_p']}, seed {result['decoding']['seed']})")
    elif args.command == "xstest":
        result = {"args": vars(args), **cli.call(evaluate_xstest, args, cfg=attack_config(args, AttackConfig()))}
        print(xstest_table(result))
        refused = {safe: sum(r["refused"] for r in result["records"] if r["safe"] == safe) for safe in (True, False)}
        print(f"over-refusal {rate_text(refused[True], result['n_safe'])} on safe prompts; refusal "
              f"{rate_text(refused[False], result['n_unsafe'])} on unsafe contrast prompts")
    elif args.command == "layers":
        result = cli.call(evaluate_layers, args)
        print(layers_table(result))
    else:
        result = cli.call(evaluate_perplexity, args)
        print(f"held-out chat perplexity over {result['n']} conversations: base {result['base_perplexity']:.3f}, "
              f"circuit breaker {result['circuit_breaker_perplexity']:.3f}")
    if args.command == "layers":
        png = write_layers(result, Path(args.out))
        print(f"wrote {args.out}" + (f" and {png}" if png else " (install matplotlib for a PNG plot)"))
    elif args.out:
        cli.write_json(args.out, result)
        print(f"wrote {args.out}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cli.check_flags(args, MINIMUMS, {"out": False})  # a bad --out would fail only after the generation
        cli.use_threads(args.threads)
        run(args)
    except ValueError as e:
        sys.exit(f"eval.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"eval.py: error: {cli.os_error(e, '--out', args.out)}")


if __name__ == "__main__":
    main()
