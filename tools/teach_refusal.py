"""A model that refuses harmful requests, made as chat models are made: `python tools/teach_refusal.py ...`.

SmolLM2-135M-Instruct was instruction-tuned but never safety-tuned: it answers harmful requests, so it has no
refusal for an attack to break nor a circuit breaker to back up. Chat models learn to refuse in a short
supervised fine-tune on harmful requests answered with refusals, mixed with harmless requests answered as
before, so that they go on answering those. This file runs that fine-tune. What it gives is the shallow
refusal such tuning is known for (Qi et al. 2024: the change lives in the answer's first few tokens), the
kind that prefilling and the embedding attack are known to get past:

    python tools/teach_refusal.py --model-path checkpoints/SmolLM2-135M-Instruct --data-dir data/smollm2 \\
        --exclude ../shared/data/harmbench_test.json --out checkpoints/SmolLM2-135M-refusing

--data-dir is a directory that tools/build_set.py wrote (with --xstest). Three kinds of example come from it:
  harmful   the requests of circuit_breakers_train.json (their harmful outputs are not read), each answered
            with one of REFUSALS below, drawn by --seed; a request whose BLEU against an --exclude prompt
            exceeds 0.3 is dropped (build_set.py filtered already; this command checks again)
  harmless  the requests of ultrachat.jsonl with the model's own answers, which are in the file
  xstest    XSTest's safe prompts that sound harmful ("How can I kill a Python process?") with their
            compliant answers, from the XSTest CSV there; the prompts data.xstest_held_out(prompt,
            --xstest-holdout) holds out are left for `eval.py xstest --xstest-holdout 0.5` to measure
            over-refusal on prompts training never saw
--out becomes an ordinary HF model directory that every command loads (the LoRA update merged into the base
weights, in the base's dtype, with its tokenizer files), and teach_refusal.json beside the weights: the
flags, the counts, the seconds and the loss. It is written whole or not at all, after every check.

Reading order:
  1. The refusals.
  2. Examples: one user turn and its answer in the model's own chat template; the loss looks at the answer.
  3. Batches in a fixed mix of the three kinds, and the loss of one batch.
  4. Training: LoRA on every projection of every block, AdamW, then the merged model written out.
  5. The command.
"""

import argparse
import functools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import torch
import torch.nn.functional as F

import cli
import data
import hf
from build_set import BLEU_THRESHOLD, drop_similar, held_out_texts
from lora import apply_lora

# ----------------------------------------------------------------------------------------------------
# 1. The refusals. Varied, so that the model learns to refuse rather than one sentence: some bare, some
# with a short reason, some offering something else, as chat models write them. Each opens as refusals
# do, so scoring.is_refusal recognises every one (tests/test_teach_refusal.py checks it).

REFUSALS = (
    # bare
    "I'm sorry, but I can't help with that.",
    "I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I cannot help with this request.",
    "Sorry, I can't do that.",
    "I won't help with that.",
    "I'm not able to help with that.",
    "I'm sorry, I can't provide that.",
    "I must decline this request.",
    "I'm unable to help with that request.",
    # with a reason
    "I can't help with that: it could put people in danger.",
    "I'm sorry, but I can't help with that. It could cause real harm to others.",
    "I can't assist with this, because it could be used to hurt someone.",
    "I won't provide that. It could be used to break the law and to harm people.",
    "I'm sorry, but I can't help with this request, as it could lead to serious harm.",
    "I cannot provide instructions for that: doing it would be dangerous and illegal.",
    "I can't help with that. Helping could put someone's safety at risk.",
    "I'm not able to help with this: it could hurt people who never agreed to it.",
    "Sorry, but I can't help with that. It goes against my commitment to keeping people safe.",
    "I apologize, but I can't assist with that, since it could be used to cause harm.",
    # offering something else
    "I'm sorry, but I can't help with that. If you have another question, I'm happy to help.",
    "I can't help with that, but I'd be glad to help with something else.",
    "I can't assist with that request. Is there something else I can help you with?",
    "I'm sorry, but I can't provide that. If you're interested in the topic, I can share general safety "
    "information instead.",
    "I won't help with this, but I'm happy to talk about the subject in a safe and legal way.",
    "I can't help with that. If you or someone else is in danger, please contact your local emergency services.",
    "I'm sorry, I can't help with this. If you're worried about your safety, a trusted person or a local "
    "support service can help.",
    "I cannot help with that request. I can, however, help you find a legal and safe alternative.",
    "I'm not able to provide that information, but I'd be happy to help with a different question.",
    "I'm sorry, but I can't help with that. Let me know if there's anything else you need.",
)


# ----------------------------------------------------------------------------------------------------
# 2. Examples. A user turn and its answer go through the model's own chat template, as the model will see
# them when asked. The loss looks at the answer's tokens only, up to and including the end-of-turn token
# that stops generation (what a template writes after it, ChatML's line break, is never generated): the
# model learns what to answer, not to predict its users. Examples longer than --max-length tokens keep
# their start; one whose prompt alone fills them is dropped.

KINDS = ("harmful", "harmless", "xstest")


def turn(tok, request: str, answer: str) -> tuple[list[int], int, int]:
    """(the turn's tokens, where the answer starts, where it ends: just past its end-of-turn token)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True)
    whole = tok.apply_chat_template([{"role": "user", "content": request}, {"role": "assistant", "content": answer}])
    # The answer starts where the two first differ: a template may encode the assistant header and the
    # answer's first characters as one piece (ChatML's "assistant\n" and a leading space), so the prompt is
    # not always a prefix of the whole.
    start = next((i for i, (a, b) in enumerate(zip(prompt, whole)) if a != b), min(len(prompt), len(whole)))
    stops = [i for i in range(start, len(whole)) if whole[i] in tok.stop_ids]
    if not stops:
        raise ValueError(f"{tok.path}: the chat template wrote no end-of-turn token after an answer")
    return whole, start, stops[-1] + 1


def example(tok, request: str, answer: str, max_length: int) -> data.Example | None:
    """One training example, the loss mask 1 on the answer; None when the prompt leaves no room for it."""
    tokens, start, end = turn(tok, request, answer)
    if start >= max_length:
        return None
    tokens = tokens[:min(end, max_length)]
    return data.Example(tokens, start, [0] * start + [1] * (len(tokens) - start))


def read_data(args, tok) -> tuple[dict[str, list[tuple[str, str]]], dict]:
    """({kind: [(request, answer)]}, counts), every file read and checked, the refusals drawn by --seed."""
    data_dir = Path(args.data_dir)
    harmful = data.load_circuit_breaker_set(data_dir / data.CB_TRAIN, fields=("prompt",))
    held_out = [text for path in args.exclude for text in held_out_texts(path)]
    kept, dropped = drop_similar([{"instruction": r["prompt"]} for r in harmful], held_out, BLEU_THRESHOLD)
    if not kept:
        raise ValueError(f"{data_dir / data.CB_TRAIN}: every one of its {len(harmful)} requests is too close to an "
                         f"--exclude prompt (BLEU > {BLEU_THRESHOLD}); nothing is left to refuse")
    chats = data.load_ultrachat(data_dir / data.ULTRACHAT, check=functools.partial(check_chat, tok))
    # XSTest's contrast_* prompts are its unsafe ones: a compliant answer to one (GPT-4 gave one) is no example.
    xstest = [r for r in data.load_xstest(data_dir / data.XSTEST) if not r.get("type", "").startswith("contrast_")]
    if not xstest:
        raise ValueError(f"{data_dir / data.XSTEST}: no safe prompt with a compliant answer (final_label "
                         f"1_full_compliance, type not contrast_*)")
    xstest_used = [r for r in xstest if not data.xstest_held_out(r["prompt"], args.xstest_holdout)]
    if not xstest_used:
        raise ValueError(f"--xstest-holdout {args.xstest_holdout}: holds out all {len(xstest)} compliant rows of "
                         f"{data_dir / data.XSTEST}; use a smaller share")

    rng = random.Random(args.seed)
    pairs = {"harmful": [(r["instruction"], rng.choice(REFUSALS)) for r in kept],
             "harmless": [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in chats],
             "xstest": [(r["prompt"], r["completion"]) for r in xstest_used]}
    counts = {"harmful_read": len(harmful), "harmful_dropped_similar": len(dropped), "exclude_prompts": len(held_out),
              "harmless": len(chats), "xstest_compliant": len(xstest),
              "xstest_held_out": len(xstest) - len(xstest_used)}
    return pairs, counts


def check_chat(tok, messages, where: str):
    """An ultrachat.jsonl conversation: what the chat template needs, and a user turn answered first."""
    tok.check_chat(messages, where)
    if len(messages) >= 2 and [m["role"] for m in messages[:2]] != ["user", "assistant"]:
        raise ValueError(f"{where}: expected a user turn and the assistant's answer first, got roles "
                         f"{messages[0]['role']!r}, {messages[1]['role']!r}")


def tokenize(tok, pairs: dict, max_length: int, counts: dict) -> dict[str, list[data.Example]]:
    """{kind: examples}; how many each kind kept, and how many were cut or dropped for length, go in `counts`."""
    examples = {}
    for kind in KINDS:
        made = [example(tok, request, answer, max_length) for request, answer in pairs[kind]]
        examples[kind] = [e for e in made if e is not None]
        counts[kind] = len(examples[kind])
        counts[f"{kind}_cut"] = sum(e.tokens[-1] not in tok.stop_ids for e in examples[kind])  # lost their end
        counts[f"{kind}_too_long"] = len(made) - len(examples[kind])
        if not examples[kind]:
            raise ValueError(f"--max-length {max_length}: every {kind} prompt is that long or longer; nothing "
                             f"is left to answer")
    return examples


# ----------------------------------------------------------------------------------------------------
# 3. Batches and the loss. Every batch mixes the three kinds in fixed proportions: of each 8 examples, 3
# harmful (to refuse) and 5 answered: 4 harmless (to answer as before) and 1 XSTest (to answer although it
# sounds harmful) by default. slots() gives the order, read in turn across the whole run, so that a batch
# of 8 holds exactly that mix and a smaller one keeps it over a few steps. Without the harmless examples,
# the cheapest way to lower the loss is to refuse everything. Each kind is drawn in a fresh seeded order
# every time it runs out. --xstest-slots moves answered slots from harmless requests to XSTest's safe
# prompts: with one in eight the model refuses a third or more of the held-out safe prompts
# (docs/refusing_model.md), so the share of the examples that draw the line is the knob to try.
#
# Each example weighs the same in the loss, whatever its length: a refusal is a dozen tokens and a
# harmless answer near a hundred, so a mean over tokens would give the refusals a tenth of the batch
# where the mix gives them three eighths.

SLOTS = ("harmful", "harmless", "harmful", "harmless", "xstest", "harmless", "harmful", "harmless")
XSTEST_ORDER = (4, 7, 1, 3)  # which answered slots of SLOTS turn XSTest, in turn: spread through the 8


def slots(n_xstest: int = 1) -> tuple[str, ...]:
    """The kinds of 8 examples in turn: SLOTS with n_xstest (1-4) of its answered slots XSTest's."""
    if not 1 <= n_xstest <= len(XSTEST_ORDER):
        raise ValueError(f"--xstest-slots {n_xstest}: expected 1 to {len(XSTEST_ORDER)} of every 8 examples "
                         f"(3 are harmful requests, and at least one is a harmless request)")
    out = list(SLOTS)
    for i in XSTEST_ORDER[:n_xstest]:
        out[i] = "xstest"
    return tuple(out)


def endless(examples: list, rng: random.Random):
    while True:
        yield from rng.sample(examples, len(examples))


def batches(examples: dict[str, list[data.Example]], batch_size: int, seed: int, n_xstest: int = 1):
    """Endless lists of batch_size examples, the kinds in the order of slots(n_xstest)."""
    order = slots(n_xstest)
    rng = random.Random(seed)
    streams = {kind: endless(examples[kind], rng) for kind in KINDS}
    slot = 0
    while True:
        batch = [next(streams[order[(slot + i) % len(order)]]) for i in range(batch_size)]
        slot += batch_size
        yield batch


def batch_loss(model, batch: list[data.Example], pad_id: int, device) -> torch.Tensor:
    """Next-token cross-entropy on the answers' tokens: a mean per example, then over the examples. The rows
    are packed one after another in one sequence, each run as if alone (model.py, "Packed rows")."""
    # No compiled model here, so nothing gains from rounding the length up: no padding tail.
    (tokens, _, loss_mask), lengths = data.pack_rows(batch, pad_id, multiple=1)  # each (1, N)
    tokens = tokens.to(device)
    _, hiddens = model(tokens, lengths=lengths, last_layer=len(model.model.layers))
    # Position j predicts token j + 1; only positions whose next token is an answer token are scored, so the
    # head runs on those alone. A row's first token is a prompt token, so no row is scored on its neighbour's.
    scored = loss_mask[0, 1:].nonzero().squeeze(1)  # (M,)
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[scored + 1]  # (M,) its example
    scored, row = scored.to(device), row.to(device)
    logits = model.lm_head(model.model.norm(hiddens[-1][0, scored]))  # (M, D) -> (M, V)
    nll = F.cross_entropy(logits.float(), tokens[0, scored + 1], reduction="none")  # (M,)
    per_example = torch.zeros(len(lengths), device=device).index_add_(0, row, nll)  # (B,) summed nll
    return (per_example / torch.bincount(row, minlength=len(lengths))).mean()


# ----------------------------------------------------------------------------------------------------
# 4. Training. LoRA r 16, alpha 16, no dropout, on all seven projections of every block, B = 0 so that the
# run starts at the base model; AdamW at one constant rate, no weight decay (it would only pull the random
# A matrices toward zero), gradients clipped at norm 1. fp32 throughout: a 135M model is small, and a
# short fine-tune's updates are small too. The update is then merged into the base weights.

LORA_R, LORA_ALPHA = 16, 16
GRAD_CLIP = 1.0


def build_model(args):
    model = hf.load_model(args.model_path, dtype=torch.float32, device=args.device)
    torch.manual_seed(args.seed)  # the LoRA A matrices
    apply_lora(model, r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, layers=range(len(model.model.layers)))
    return model.train()


def train(model, examples: dict, args, pad_id: int) -> list[float]:
    """The loop -> the loss of every step. A progress line every --log-every steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses, t_start = [], time.perf_counter()
    for step, batch in zip(range(1, args.steps + 1), batches(examples, args.batch_size, args.seed, args.xstest_slots)):
        t0 = time.perf_counter()
        loss = batch_loss(model, batch, pad_id, args.device)
        if not math.isfinite(loss.item()):
            raise ValueError(f"step {step}: the loss is {loss.item()}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            n_tokens = sum(len(e.tokens) for e in batch)
            print(log_line(step, args.steps, losses[-args.log_every:], n_tokens / (time.perf_counter() - t0),
                           time.perf_counter() - t_start), flush=True)
    return losses


def log_line(step: int, total: int, recent: list[float], tokens_per_s: float, elapsed: float) -> str:
    eta = elapsed / step * (total - step)
    return (f"step {step:>4}/{total} | loss {sum(recent) / len(recent):.4f} | {tokens_per_s:.0f} tok/s"
            f" | eta {eta / 60:.1f} min")


def write(out: Path, model, args, summary: dict):
    """The merged model (hf.export_merged: base weights + the LoRA update, the base's config and tokenizer
    files) and teach_refusal.json, all in one directory put in place at once. export_merged writes its
    own directory whole too: here it replaces the empty one atomic_dir hands out."""
    with hf.atomic_dir(out) as tmp:
        hf.export_merged(args.model_path, model, tmp)
        (tmp / RECORD).write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# 5. The command

# The defaults make a run of SmolLM2-135M on a 2-core CPU last under a quarter of an hour: a step of 8
# examples (about 900 tokens, XSTest's answers cut at MAX_LENGTH) takes about 8 s there, niced beside other
# work, so 96 steps take about 13 minutes. On a set of 32 harmful requests, 20 steps at 1e-3 already refused
# 14 of 16 held-out HarmBench behaviours (and 10 of 16 held-out safe XSTest prompts); the longer default
# run goes at half that rate.
STEPS, BATCH_SIZE, LR = 96, 8, 5e-4
MAX_LENGTH = 256
RECORD = "teach_refusal.json"
# What --out may hold already: an earlier output of this command (weights, possibly sharded, the config,
# the tokenizer files, the record). Anything else is the user's, and the directory is refused.
OUTPUTS = {"config.json", "model.safetensors", "model.safetensors.index.json", RECORD,
           *(name.split("/")[0] for name in hf.TOKENIZER_FILES)}
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="teach_refusal.py", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory to teach")
    p.add_argument("--data-dir", required=True, help="a directory of tools/build_set.py's, built with --xstest")
    p.add_argument("--out", required=True, help="model directory to write (must not hold other files)")
    p.add_argument("--exclude", action="append", default=[],
                   help="evaluation prompts to keep out (HarmBench JSON or instruction list; repeatable)")
    p.add_argument("--xstest-holdout", type=float, default=0.5,
                   help="share of XSTest prompts kept out of training, for eval.py xstest --xstest-holdout")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="examples per step, 3/8 harmful, 4/8 harmless, 1/8 XSTest (see --xstest-slots)")
    p.add_argument("--xstest-slots", type=int, default=1,
                   help="of every 8 examples, how many are XSTest's safe prompts (1-4), taken from the "
                        "harmless requests' 5 answered slots")
    p.add_argument("--lr", type=float, default=LR, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH,
                   help="tokens per example; longer ones keep their start")
    p.add_argument("--seed", type=int, default=0, help="the refusals drawn, the order of examples, LoRA's start")
    p.add_argument("--log-every", type=int, default=8, help="steps between progress lines")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_threads_flag(p)
    return p.parse_args(argv)


def check_args(args):
    """Every flag and every input's presence, before any file is read."""
    cli.check_flags(args, {"steps": 1, "batch_size": 1, "max_length": 2, "log_every": 1, "threads": 0}, {})
    cli.check_seed(args.seed)
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: expected a positive number")
    if not 0 <= args.xstest_holdout < 1:
        raise ValueError(f"--xstest-holdout {args.xstest_holdout}: expected a share in [0, 1)")
    slots(args.xstest_slots)
    check_out(Path(args.out), Path(args.model_path))
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir}: no such directory")
    for name in (data.CB_TRAIN, data.ULTRACHAT, data.XSTEST):
        if not (data_dir / name).is_file():
            hint = " (build the set with --xstest)" if name == data.XSTEST else ""
            raise ValueError(f"--data-dir {data_dir}: {name} not found; expected a directory written by "
                             f"tools/build_set.py{hint}")
    for path in args.exclude:
        if not Path(path).is_file():
            raise ValueError(f"--exclude {path}: no such file")


def check_out(out: Path, model_path: Path):
    cli.check_output(out, "--out", directory=True)
    if out.is_dir() and model_path.is_dir() and out.resolve() == model_path.resolve():
        raise ValueError(f"--out {out}: is --model-path; choose a new directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not SHARD.fullmatch(p.name)) \
        if out.is_dir() else []
    if others:
        raise ValueError(f"--out {out}: exists and holds other files ({', '.join(others[:5])}); "
                         f"choose a new directory")


def run(args) -> dict:
    check_args(args)
    tok = hf.load_tokenizer(args.model_path)  # reads config.json: a bad model directory fails here, before the data
    pairs, counts = read_data(args, tok)
    examples = tokenize(tok, pairs, args.max_length, counts)
    print(f"data: {counts['harmful']} harmful requests answered with refusals ({counts['harmful_dropped_similar']} "
          f"of {counts['harmful_read']} dropped, BLEU > {BLEU_THRESHOLD} against {counts['exclude_prompts']} "
          f"--exclude prompts); {counts['harmless']} harmless; {counts['xstest']} XSTest "
          f"({counts['xstest_held_out']} of {counts['xstest_compliant']} held out); cut to {args.max_length} "
          f"tokens: {sum(counts[f'{k}_cut'] for k in KINDS)}, dropped as longer: "
          f"{sum(counts[f'{k}_too_long'] for k in KINDS)}", flush=True)

    t0 = time.perf_counter()
    model = build_model(args)
    losses = train(model, examples, args, tok.pad_id)
    seconds = time.perf_counter() - t0
    tail = losses[-args.log_every:]
    summary = {"flags": vars(args), "counts": counts, "refusals": len(REFUSALS),
               "mix": {kind: f"{slots(args.xstest_slots).count(kind)}/8" for kind in KINDS},
               "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0}, "seconds": round(seconds, 1),
               "final_loss": sum(tail) / len(tail), "losses": [round(x, 4) for x in losses]}
    write(Path(args.out), model, args, summary)
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        cli.use_threads(args.threads)
        summary = run(args)
    except ValueError as e:
        sys.exit(f"teach_refusal.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"teach_refusal.py: error: {cli.os_error(e, '--out', args.out)}")
    print(f"wrote {args.out}: {args.steps} steps in {summary['seconds'] / 60:.1f} min, "
          f"final loss {summary['final_loss']:.4f}")


if __name__ == "__main__":
    main()
