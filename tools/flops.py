"""
FLOPs of one training step as train.py runs it (reference pass, LoRA pass, backward, with or without
gradient checkpointing), counted from the shapes its passes run: matmuls and attention, 2 FLOPs per
multiply-add. Norms, RoPE, softmax, dropout and the losses are left out (well under 1% at 8B).
BENCHMARKS.md derives each term; tests/test_bench.py checks them against torch's FLOP counter.
"""

import data
import train
from model import ModelArgs, projection_shapes


def step_flops(args: ModelArgs, cfg: train.TrainConfig, batch: data.Batch, official: bool) -> dict[str, float]:
    """FLOPs of one step on this batch, padding included, by kind: linear, lora, attention, head.
    Packed rows attend within themselves only (model.packed_attention), so attention counts per row.
    official: every forward runs all loaded blocks and the head, as the official code's does."""
    sizes = projection_shapes(args)  # (out, in) of each projection
    linear_per_token = sum(2 * o * i for o, i in sizes.values())
    lora_per_token = sum(2 * cfg.lora_r * sum(sizes[t]) for t in cfg.lora_targets)
    n_loaded, n_target, recompute = train.n_blocks_needed(cfg), max(cfg.target_layers), cfg.grad_ckpt
    parts = dict(linear=0.0, lora=0.0, attention=0.0, head=0.0)
    # Blocks run forward and backward: the cb set stops at the deepest target layer unless official.
    for rows, n_fwd, n_bwd in ((rows_run(batch.cb_tokens, batch.cb_lengths), n_loaded if official else n_target,
                                n_target), (rows_run(batch.retain_tokens, batch.retain_lengths), n_loaded, n_loaded)):
        tokens = sum(rows)
        attention = sum(2 * args.n_heads * args.head_dim * T * (T + 1) for T in rows)  # one block
        lora_fwd, lora_bwd = (sum(layer < n for layer in cfg.lora_layers) for n in (n_fwd, n_bwd))
        # reference forward + LoRA forward + backward (1x frozen linear, 2x the rest) + recomputation
        passes_fwd, passes_bwd = 2 * n_fwd, (1 + recompute) * n_bwd
        parts["linear"] += linear_per_token * tokens * (passes_fwd + passes_bwd)
        parts["attention"] += attention * (passes_fwd + (2 + recompute) * n_bwd)
        parts["lora"] += lora_per_token * tokens * (lora_fwd + (2 + recompute) * lora_bwd)
        parts["head"] += 2 * args.dim * args.vocab_size * tokens * 2 if official else 0  # two forwards
    return parts


def rows_run(tokens, lengths) -> list[int]:
    """The lengths of the rows attention runs on: B rows of T, or packed rows and their padding tail."""
    B, T = tokens.shape
    if lengths is None:
        return [T] * B
    return [*lengths, T - sum(lengths)] if T > sum(lengths) else list(lengths)


def tflops_per_step(args: ModelArgs, cfg: train.TrainConfig, batches: list[data.Batch], official: bool) -> float:
    """The mean over these steps, padding included."""
    return sum(sum(step_flops(args, cfg, b, official).values()) for b in batches) / len(batches) / 1e12
