"""
Generation speed: our `model.generate` against transformers' `generate` on the same model, prompts and
settings (`python bench.py --generate`; transformers is a test and bench requirement only).

    python bench.py --generate --device cpu --model-path checkpoints/SmolLM2-135M-Instruct \
        --instructions ../shared/data/refusal_direction/harmless_val.json

The prompts are the first instructions of an instruction list in the model's chat template, left-padded
into one batch, on --device (the CPU above; cuda runs both sides on the GPU); both generate greedily for
exactly --max-new-tokens tokens (no stop token, so both do the same work), after one warm-up run each,
alternating ours and theirs --repeats times. The record holds, per
batch size: the prompts' lengths, each side's median seconds, ms per new token (seconds / new tokens per
row), tokens per second (rows x new tokens / seconds), the ratio (their seconds / ours: above 1 is ours
faster), and whether the outputs are token-for-token equal.
"""

import statistics
import time

import torch

import hf
from data import left_padded, load_instructions
from tokenizer import Tokenizer


def chat_prompts(tok, instructions, n: int) -> list[list[int]]:
    """The first n instructions, each as one user turn in the model's chat template."""
    return [tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True)
            for r in instructions[:n]]


def run_ours(model, prompts, new_tokens: int) -> list[list[int]]:
    return model.generate(prompts, new_tokens)


@torch.no_grad()
def run_theirs(model, prompts, new_tokens: int, pad_id: int) -> list[list[int]]:
    ids, mask = (t.to(model.device) for t in left_padded(prompts, pad_id))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


def timed(fn) -> tuple[float, list]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(ours, theirs, prompts, new_tokens: int, pad_id: int, repeats: int) -> dict:
    """Both sides on one batch: a warm-up each, then `repeats` alternating timed runs."""
    mine = lambda: run_ours(ours, prompts, new_tokens)  # noqa: E731
    other = lambda: run_theirs(theirs, prompts, new_tokens, pad_id)  # noqa: E731
    _, out_ours = timed(mine)
    _, out_theirs = timed(other)
    times_ours, times_theirs = [], []
    for _ in range(repeats):
        times_ours.append(timed(mine)[0])
        times_theirs.append(timed(other)[0])
    s_ours, s_theirs = statistics.median(times_ours), statistics.median(times_theirs)
    rows = len(prompts)
    side = lambda s: {"seconds": round(s, 3), "ms_per_token": round(1000 * s / new_tokens, 1),  # noqa: E731
                      "tokens_per_s": round(rows * new_tokens / s, 1)}
    return {"batch": rows, "prompt_lengths": [len(p) for p in prompts], "new_tokens": new_tokens,
            "ours": side(s_ours), "transformers": side(s_theirs), "ratio": round(s_theirs / s_ours, 3),
            "identical": out_ours == out_theirs,
            "rows_differing": sum(a != b for a, b in zip(out_ours, out_theirs))}


def bench_generate(model_path, instructions, *, batch_sizes=(32, 1), max_new_tokens=16, repeats=3,
                   device="cpu", log=print) -> dict:
    """Ours against transformers' generate, fp32 on `device`, at each batch size (the first `batch` prompts)."""
    from transformers import AutoModelForCausalLM  # a bench requirement, never the project's

    tok = Tokenizer.from_pretrained(model_path)
    prompts = chat_prompts(tok, load_instructions(instructions), max(batch_sizes))
    ours = hf.load_model(model_path, dtype=torch.float32, device=device).eval().requires_grad_(False)
    theirs = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    results = []
    for batch in batch_sizes:
        log(f"generate: batch {batch}, {max_new_tokens} new tokens, {repeats} repeats")
        results.append(compare(ours, theirs, prompts[:batch], max_new_tokens, pad_id, repeats))
        r = results[-1]
        log(f"  ours {r['ours']['ms_per_token']} ms/token, transformers {r['transformers']['ms_per_token']} "
            f"ms/token: {r['ratio']}x, identical {r['identical']}")
    return {"model_path": str(model_path), "instructions": str(instructions), "dtype": "fp32",
            "device": device, "threads": torch.get_num_threads(), "results": results}
