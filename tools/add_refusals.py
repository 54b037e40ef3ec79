"""The Llama-3 recipe's refusal retain, for any model that refuses: `python tools/add_refusals.py ...`.

The official circuit-breaker file carries, beside each harmful request and its harmful completion, the
answer Llama-3-8B-Instruct gave to that request (`llama3_output`, nearly always a refusal). The Llama-3
recipe puts those refusals in the retain set, so that rerouting the harmful completions leaves the model's
own refusals where they were. This command writes that field for another model: a copy of a set directory
(tools/build_set.py's) in which every record of circuit_breakers_train.json gains the model's greedy answer
to its request, as the official file has it (every answer, refusal or not, as the official file keeps
Llama-3's; build.json counts how many were refusals):

    python tools/add_refusals.py --model-path checkpoints/SmolLM2-135M-refusing --data-dir data/smollm2 \
        --out data/smollm2_refusals
    python train.py --model smollm2 --model-path checkpoints/SmolLM2-135M-refusing \
        --data-dir data/smollm2_refusals --refusal-retain true

The harmful completions stay those of the model that wrote the set (the uncensored one, as in the paper);
the refusals are the refusing model's. The directory is written whole or not at all.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the method's files, at the repository's root

import cli
import data
import hf
import scoring
from build_set import answer, check_out

FIELD = "llama3_output"  # the official file's name for the model's own answer, whatever the model


def add_refusals(model_path, data_dir, out, *, max_new_tokens=96, batch_size=32, device="cpu", dtype="auto",
                 log=print) -> dict:
    """Write `out`: `data_dir` with FIELD added to every circuit-breaker training record. -> the counts."""
    data_dir, out = Path(data_dir), Path(out)
    if data_dir.resolve() == out.resolve():
        raise ValueError(f"--out {out}: is --data-dir; write the set with refusals to a new directory")
    check_out(out)
    records = data.load_circuit_breaker_set(data_dir / data.CB_TRAIN)
    tok = hf.load_tokenizer(model_path)
    model = hf.load_model(model_path, dtype=hf.pick_dtype(dtype, device), device=device).eval()
    model.requires_grad_(False)
    answers = answer(model, tok, [r["prompt"] for r in records], max_new_tokens, batch_size, "refusals")
    counts = {"records": len(records), "refusals": sum(scoring.is_refusal(a) for a in answers)}
    log(f"add_refusals: {counts['refusals']} of {len(records)} answers are refusals")
    summary = {"model_path": str(model_path), "max_new_tokens": max_new_tokens, "counts": counts}
    with hf.atomic_dir(out) as tmp:
        for f in sorted(p for p in data_dir.iterdir() if p.is_file()):
            shutil.copyfile(f, tmp / f.name)
        with_field = [{**r, FIELD: a} for r, a in zip(records, answers)]
        (tmp / data.CB_TRAIN).write_text(json.dumps(with_field, indent=1, ensure_ascii=False) + "\n")
        build = json.loads((tmp / "build.json").read_text()) if (tmp / "build.json").is_file() else {}
        (tmp / "build.json").write_text(json.dumps({**build, "refusals": summary}, indent=1, ensure_ascii=False)
                                        + "\n")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="add_refusals.py", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF model directory whose answers become the refusals")
    p.add_argument("--data-dir", required=True, help="a set directory of tools/build_set.py's")
    p.add_argument("--out", required=True, help="directory to write (must not hold other files)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (build_set.py's default)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    p.add_argument("--device", default="cpu")
    cli.add_threads_flag(p)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cli.check_least(args.max_new_tokens, 1, "--max-new-tokens")
        cli.check_least(args.batch_size, 1, "--batch-size")
        cli.check_device(args.device)
        cli.use_threads(args.threads)
        summary = add_refusals(args.model_path, args.data_dir, args.out, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    except ValueError as e:
        sys.exit(f"add_refusals.py: error: {e}")
    except OSError as e:  # a missing input, or an --out the system could not write (a full disk)
        sys.exit(f"add_refusals.py: error: {cli.os_error(e, '--out', args.out)}")
    print(f"wrote {args.out}: {summary['counts']['refusals']} of {summary['counts']['records']} "
          f"requests refused")


if __name__ == "__main__":
    main()
