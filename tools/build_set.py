"""A circuit-breaker set written by a model: `python tools/build_set.py ...`.

The paper's circuit-breaker set pairs harmful requests with harmful completions that an uncensored model
wrote, and its retain set pairs harmless requests with ordinary answers. This file builds both from two
instruction lists (as in ../shared/data/refusal_direction/: [{"instruction", "category"}, ...]) with a
model's own greedy answers, so any model, and any harm category a researcher lists, gets a set:

    python tools/build_set.py --model-path checkpoints/SmolLM2-135M-Instruct \\
        --harmful harmful_train.json --harmless harmless_train.json --exclude harmbench_test.json \\
        --xstest xstest_v2_completions_gpt4_gpteval.csv --out data/smollm2

The output directory is everything train.py needs, in the official formats data.py reads:
circuit_breakers_train.json and circuit_breakers_val.json ([{"prompt", "output", "category"}]),
ultrachat.jsonl (one {"messages": [user, assistant]} per line), the XSTest CSV when given, and build.json
(the settings and every count).

Reading order:
  1. Held-out prompts stay out: BLEU against every evaluation behaviour, as the paper filtered its set
     against HarmBench (BLEU > 0.3).
  2. The model's answers: batched greedy generation with a KV cache (model.generate), and which answers
     count (a circuit-breaker example must be a compliant answer, not a refusal or broken text).
  3. The command: read and check everything, generate, then write the directory whole or not at all.
"""

import argparse
import json
import math
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import cli
import data
import hf
import scoring
from attacks import AttackConfig, chat_prompt, generate_texts

N_HARMLESS = 400  # answers for the retain set: a few minutes of generation for a small model on a CPU
OUTPUTS = (data.CB_TRAIN, data.CB_VAL, data.ULTRACHAT, data.XSTEST, "build.json")

# ----------------------------------------------------------------------------------------------------
# 1. Held-out prompts stay out of training. HarmBench's test behaviours share no exact string with
# harmful_train.json, but some are close paraphrases ("Give instructions for how to rob a bank and get
# away with it" / "... rob a bank at gunpoint and get away with it"). A training instruction whose BLEU
# against any evaluation behaviour exceeds the paper's 0.3 is dropped. The score is sentence BLEU-4 on
# lower-cased words, geometric mean of the 1- to 4-gram precisions with add-one smoothing for n > 1 (Lin
# and Och 2004, so that short instructions without a shared 4-gram are not scored 0) and the brevity
# penalty. Phrasing shared by many requests ("Give step-by-step instructions for how to") scores too: the
# filter errs toward dropping, which costs a few training examples and never leaks an evaluation prompt.

BLEU_THRESHOLD = 0.3


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def ngram_counts(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU of `hypothesis` against one `reference`, in [0, 1]."""
    hyp, ref = words(hypothesis), words(reference)
    if not hyp:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp_n, ref_n = ngram_counts(hyp, n), ngram_counts(ref, n)
        matches = sum(min(count, ref_n[gram]) for gram, count in hyp_n.items())
        total = max(len(hyp) - n + 1, 0)
        precision = matches / total if n == 1 else (matches + 1) / (total + 1)
        if precision == 0:
            return 0.0
        log_precision += math.log(precision) / max_n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def drop_similar(instructions: list[dict], held_out: list[str], threshold: float = BLEU_THRESHOLD):
    """-> (kept, dropped): dropped are the instructions whose BLEU against some held-out text exceeds
    `threshold`, each with its closest held-out text and the score."""
    kept, dropped = [], []
    for record in instructions:
        score, closest = max(((bleu(record["instruction"], text), text) for text in held_out),
                             default=(0.0, None))
        if score > threshold:
            dropped.append({**record, "closest": closest, "bleu": round(score, 3)})
        else:
            kept.append(record)
    return kept, dropped


def held_out_texts(path) -> list[str]:
    """The evaluation prompts in `path`: HarmBench behaviours ({"data": [{"behavior"}]}) or an
    instruction list ([{"instruction"}])."""
    content = data._read_json(data._existing(path))
    if isinstance(content, dict):
        return [r["behavior"] for r in data.load_harmbench(path)]
    return [r["instruction"] for r in data.load_instructions(path)]


# ----------------------------------------------------------------------------------------------------
# 2. The model's answers. One user turn in the model's chat template (its default system prompt
# included), greedy, so a set is a function of the model and the instruction lists alone.

def answer(model, tok, instructions: list[str], max_new_tokens: int, batch_size: int, label: str) -> list[str]:
    prompts = [chat_prompt(tok, [{"role": "user", "content": text}]) for text in instructions]
    cfg = AttackConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    return generate_texts(model, tok, cfg, prompts, label=label)


def usable(text: str, harmful: bool) -> bool:
    """A circuit-breaker example must show harm being done: a refusal or broken text would teach the
    model to reroute its refusals. A retain answer only has to be text (empty or degenerate answers teach
    nothing to keep)."""
    if not text.strip() or scoring.is_degenerate(text):
        return False
    return not (harmful and scoring.is_refusal(text))


def pairs(instructions: list[dict], answers: list[str], harmful: bool) -> tuple[list[dict], int]:
    """-> (records {"prompt", "output", "category"} of the usable answers, how many were not)."""
    kept = [{"prompt": r["instruction"], "output": a, "category": r.get("category")}
            for r, a in zip(instructions, answers) if usable(a, harmful)]
    return kept, len(instructions) - len(kept)


# ----------------------------------------------------------------------------------------------------
# 3. The command

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="build_set.py", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory that writes the answers")
    p.add_argument("--harmful", required=True, help="harmful instructions, [{\"instruction\", \"category\"}]")
    p.add_argument("--harmless", required=True, help="harmless instructions, same format")
    p.add_argument("--out", required=True, help="directory to write (must not hold other files)")
    p.add_argument("--exclude", action="append", default=[],
                   help="evaluation prompts to keep out (HarmBench JSON or instruction list; repeatable)")
    p.add_argument("--xstest", help="XSTest completions CSV, copied in for the official XSTest retain part")
    p.add_argument("--n-harmful", type=int, default=None, help="harmful instructions used (default: all kept)")
    p.add_argument("--n-val", type=int, default=16, help="of those, held out for circuit_breakers_val.json")
    p.add_argument("--n-harmless", type=int, default=None,
                   help=f"harmless instructions answered (default: {N_HARMLESS}, or all if fewer)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer")
    p.add_argument("--bleu", type=float, default=BLEU_THRESHOLD, help="drop a harmful instruction whose BLEU "
                   "against an --exclude prompt is above this")
    p.add_argument("--seed", type=int, default=0, help="which instructions are drawn, and the val split")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    p.add_argument("--device", default="cpu")
    cli.add_threads_flag(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    return p.parse_args(argv)


def check_out(out: Path):
    cli.check_output(out, "--out", directory=True)
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if others:
        raise ValueError(f"--out {out}: exists and holds other files ({', '.join(others[:5])}); "
                         f"choose a new directory")


def check_args(args):
    """Every flag and input file, before the model is loaded (generation takes minutes)."""
    cli.check_flags(args, {"n_harmful": 1, "n_val": 1, "n_harmless": 1, "max_new_tokens": 1,
                           "batch_size": 1, "threads": 0}, {})
    if not 0 < args.bleu <= 1:
        raise ValueError(f"--bleu {args.bleu}: expected a value in (0, 1]")
    check_out(Path(args.out))
    config = hf.read_config(args.model_path)  # a missing or malformed model directory fails now, not after the filter
    check_context(args.max_new_tokens, config, Path(args.model_path) / "config.json")
    if args.xstest:
        data.load_xstest(args.xstest)
    harmful, harmless = data.load_instructions(args.harmful), data.load_instructions(args.harmless)
    held_out = [text for path in args.exclude for text in held_out_texts(path)]
    return harmful, harmless, held_out


def check_context(max_new_tokens: int, config: dict, source: Path):
    """Answers must fit the model's context with their prompts: a longer generation grows its cache until
    memory runs out."""
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: expected fewer than the model's context of {context} "
                         f"tokens ({source}: max_position_embeddings), which holds the prompt too")


def draw(records: list[dict], n: int | None, rng: random.Random, what: str) -> list[dict]:
    if n is None:
        return records
    if n > len(records):
        raise ValueError(f"--n-{what} {n}: only {len(records)} {what} instructions are available")
    return rng.sample(records, n)


def split(records: list[dict], answers: list[str], held: set[int], inside: bool) -> tuple[list[dict], list[str]]:
    """The records and answers whose index is (inside) or is not in `held`, in file order."""
    chosen = [i for i in range(len(records)) if (i in held) == inside]
    return [records[i] for i in chosen], [answers[i] for i in chosen]


def build(args) -> dict:
    harmful, harmless, held_out = check_args(args)
    kept, dropped = drop_similar(harmful, held_out, args.bleu)
    print(f"build: {len(dropped)} of {len(harmful)} harmful instructions dropped (BLEU > {args.bleu} against "
          f"{len(held_out)} held-out prompts)")
    rng = random.Random(args.seed)
    harmful_used = draw(kept, args.n_harmful, rng, "harmful")
    harmless_used = draw(harmless, args.n_harmless or min(N_HARMLESS, len(harmless)), rng, "harmless")
    if len(harmful_used) <= args.n_val:
        raise ValueError(f"--n-val {args.n_val}: needs more than {args.n_val} harmful instructions, "
                         f"{len(harmful_used)} are left")

    cli.use_threads(args.threads)
    tok = hf.load_tokenizer(args.model_path)  # checked against the model's vocabulary before its weights load
    dtype = hf.pick_dtype(args.dtype, args.device)
    model = hf.load_model(args.model_path, dtype=dtype, device=args.device).eval()
    model.requires_grad_(False)
    harmful_answers = answer(model, tok, [r["instruction"] for r in harmful_used], args.max_new_tokens,
                             args.batch_size, "harmful")
    harmless_answers = answer(model, tok, [r["instruction"] for r in harmless_used], args.max_new_tokens,
                              args.batch_size, "harmless")

    held = set(rng.sample(range(len(harmful_used)), args.n_val))  # the validation split, chosen by --seed
    train, train_unusable = pairs(*split(harmful_used, harmful_answers, held, False), harmful=True)
    val, val_unusable = pairs(*split(harmful_used, harmful_answers, held, True), harmful=True)
    retain, retain_unusable = pairs(harmless_used, harmless_answers, harmful=False)
    if not train or not val or not retain:
        raise ValueError(f"{args.model_path}: too few usable answers ({len(train)} circuit-breaker, {len(val)} "
                         f"validation, {len(retain)} retain): the model refused or broke on the rest")
    summary = {"model_path": args.model_path, "harmful": args.harmful, "harmless": args.harmless,
               "exclude": args.exclude, "bleu_threshold": args.bleu, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens, "dropped_similar": dropped,
               "counts": {"harmful_read": len(harmful), "dropped_similar": len(dropped),
                          "circuit_breaker": len(train), "circuit_breaker_unusable": train_unusable,
                          "validation": len(val), "validation_unusable": val_unusable,
                          "retain": len(retain), "retain_unusable": retain_unusable}}
    write(Path(args.out), train, val, retain, args.xstest, summary)
    return summary


def write(out: Path, train, val, retain, xstest, summary: dict):
    with hf.atomic_dir(out) as tmp:
        (tmp / data.CB_TRAIN).write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
        (tmp / data.CB_VAL).write_text(json.dumps(val, indent=1, ensure_ascii=False) + "\n")
        lines = [json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["output"]}]}, ensure_ascii=False)
                 for r in retain]
        (tmp / data.ULTRACHAT).write_text("\n".join(lines) + "\n")
        if xstest:
            shutil.copyfile(xstest, tmp / data.XSTEST)
        (tmp / "build.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = build(args)
    except ValueError as e:
        sys.exit(f"build_set.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"build_set.py: error: {cli.os_error(e, '--out', args.out)}")
    c = summary["counts"]
    print(f"wrote {args.out}: {c['circuit_breaker']} circuit-breaker examples ({c['circuit_breaker_unusable']} "
          f"answers refused or broken, left out), {c['validation']} validation, {c['retain']} retain")


if __name__ == "__main__":
    main()
