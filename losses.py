"""The circuit-breaker objective: representation rerouting plus a retain term.

Plain functions of tensors, meant to be read and changed. Shapes: L layers, B batch, T time, D model
width. "States" are residual-stream hidden states; every function takes them either as one tensor
(L, B, T, D) or as a list of L tensors (B, T, D) (the loops below iterate over the first axis, so a list
avoids the memory of stacking). `new` are the states of the model being trained (LoRA on), `orig` the
states of the frozen model (LoRA off) on the same tokens. Masks are (B, T), 1 at tokens that count.

The math (Zou et al. 2024, "Improving Alignment and Robustness with Circuit Breakers", Algorithm 1):

    rerouting, on harmful text x_s, at the target layers l:
        L_rr     = mean_{l, t in mask}  ReLU( cos( h_new[l, t], h_orig[l, t] ) )
    retain, on harmless text x_r:
        L_retain = mean_{l, t in mask}  || h_new[l, t] - h_orig[l, t] ||_2
    total, at step t = 1..T_total with alpha the loss weight:
        L = c_rr(t) * L_rr + c_retain(t) * L_retain
        c_rr(t) = alpha * (1 - t / (2 T_total)),   c_retain(t) = alpha * t / (2 T_total)

ReLU(cos) is zero once a state is orthogonal (or opposite) to where it used to be: the method only asks
harmful states to leave their original direction, not to go anywhere in particular.

Training starts where LoRA's B is zero, so h_new == h_orig: cos is at its maximum and the retain distance
at its minimum, both gradients are exactly zero, and only rounding noise (which Adam normalises into real
steps) moves the adapters at first; the official recipe relies on bf16 for it. Starting B as small noise
(train.py --lora-init-std) leaves that point deterministically, as the toy preset does (docs/toy.md, "What
the toy needed"). The `direction`, `random` and `eot` targets have a gradient from the first step anyway.

Every rerouting variant is one function plus one entry in `LOSSES` at the end of this file; train.py's
`--loss` choices, its help and the step's loss all come from there (README, "Adding a loss").

Cosines and norms are computed in fp32 even when the states are bf16: a bf16 dot product over
D = 4096 loses too much to rank small changes.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------------
# Small pieces


def _cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-token cosine similarity in fp32: (B, T, D), (B, T, D) -> (B, T)."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(-1)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return dot / norms.clamp_min(eps)


def _masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of x (B, T) over positions where mask (B, T) is 1.

    `where` rather than a product, so that a NaN at a padding position (a zero-norm state) cannot leak
    into the sum.
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def _n_tokens(mask: Tensor) -> Tensor:
    # clamp: an all-zero mask gives a loss of 0 instead of 0 / 0 = NaN
    return mask.float().sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# The two terms of the paper


def rerouting_loss(h_new, h_orig, mask: Tensor) -> Tensor:
    """ReLU of the per-token cosine between new and original states, mean over masked tokens and layers.

    h_new, h_orig: (L, B, T, D) at the target layers; mask (B, T). Returns a scalar (fp32):
    sum_l sum_{b,t} mask * relu(cos) / (L * mask.sum()), as the official code computes it.
    """
    total, n_layers = 0.0, 0
    for new, orig in zip(h_new, h_orig, strict=True):  # (B, T, D) each
        total = total + _masked_sum(torch.relu(_cosine(new, orig)), mask)
        n_layers += 1
    return total / (n_layers * _n_tokens(mask))


def retain_loss(h_new, h_orig, mask: Tensor, relative: bool = False, eps: float = 1e-6) -> Tensor:
    """Per-token L2 distance between new and original states, mean over masked tokens and layers.

    h_new, h_orig: (L, B, T, D); mask (B, T). The norm over D is taken in fp32 (vector_norm's dtype
    argument upcasts inside the kernel, so no fp32 copy of the states is kept for backward).
    relative: each distance divided by the original state's length (--retain-norm relative, below).
    """
    total, n_layers = 0.0, 0
    for new, orig in zip(h_new, h_orig, strict=True):  # (B, T, D) each
        dist = torch.linalg.vector_norm(new - orig, dim=-1, dtype=torch.float32)  # (B, T)
        if relative:
            dist = dist / torch.linalg.vector_norm(orig, dim=-1, dtype=torch.float32).clamp_min(eps)
        total = total + _masked_sum(dist, mask)
        n_layers += 1
    return total / (n_layers * _n_tokens(mask))


def coefficients(step: int, total_steps: int, alpha: float) -> tuple[float, float]:
    """The official schedule -> (cb_coeff, retain_coeff), with steps counted from 1.

    Progress runs to 1/2, not 1: the official code divides by 300 for its 150 steps, so at the last step
    both terms still weigh alpha / 2. The paper's alpha values were tuned with this schedule. The official
    code hard-codes 300; we divide by twice the run's steps, the same at 150 steps, and for any other
    length (the toy's 100) the same shape, ending at alpha / 2 each.
    """
    if total_steps < 1 or step < 1:
        raise ValueError(f"coefficients: need step >= 1 and total_steps >= 1, got {step}, {total_steps}")
    p = step / (2 * total_steps)
    return alpha * (1 - p), alpha * p


# ----------------------------------------------------------------------------------------------------
# The official retain normalisation
#
# The official code (GraySwanAI/circuit-breakers, src/lorra_circuit_breaker.py) computes the retain term
# differently from the paper's formula, and its alpha values (10 for Llama-3, 5 for Mistral) were tuned
# on it:
#   - it reads ALL hidden states that HF returns for the truncated model (n_blocks + 1 of them): the
#     embedding output, which LoRA cannot change and so always contributes zero, every block's output,
#     and the last state AFTER the final norm (HF's output_hidden_states normalises its last entry);
#   - it multiplies both stacks by the attention mask, so padding positions have distance exactly 0,
#     and then takes `.nanmean()` over every position: layers x batch x the padded length, which is
#     1024 for retain examples.
# So the mean is over S * B * 1024 entries whatever the real lengths are; short examples weigh less.
# To reproduce that without padding to 1024, we sum the distances over real tokens and divide by the
# count the official code would have used. This keeps the loss value, and its gradient, independent of
# how we pad.
#
# How train.py calls it, with the model truncated to n_blocks = max(target_layers) + 1 blocks (as the
# official code does; the last block only feeds the final-normed state):
#     _, hs = model(tokens, mask)                      # hs: n_blocks + 1 states, last NOT final-normed
#     new = official_retain_states(hs, model.model.norm)
#     with torch.no_grad(), lora_disabled(model):
#         orig = official_retain_states(model(tokens, mask)[1], model.model.norm)
#     loss = retain_loss_official(new, orig, mask, pad_to=1024)


def official_retain_states(hiddens: list[Tensor], final_norm) -> list[Tensor]:
    """The states the official retain term reads: all of them, the last one passed through the final
    norm (to match HF's output_hidden_states). hiddens: list of S tensors (B, T, D)."""
    return [*hiddens[:-1], final_norm(hiddens[-1])]


def retain_loss_official(h_new, h_orig, mask: Tensor, pad_to: int = 1024, n_rows: int | None = None) -> Tensor:
    """Retain distance normalised as the official code does: sum of per-token L2 distances over real
    tokens, divided by S * n_rows * pad_to (every state, every example, every padded position).

    h_new, h_orig: (S, B, T, D), all states from `official_retain_states`; mask (B, T); T <= pad_to.
    n_rows: the examples to divide by, B by default (one per row). Packed rows (one sequence holding
    n_rows examples, each checked against pad_to when the data is built) and micro-batches (the whole
    batch's count) pass it.
    """
    B, T = mask.shape
    if n_rows is None and T > pad_to:
        raise ValueError(f"retain_loss_official: rows of {T} tokens are longer than pad_to={pad_to}; "
                         "the official code truncates retain examples to that length")
    total, n_states = 0.0, 0
    for new, orig in zip(h_new, h_orig, strict=True):  # (B, T, D) each
        dist = torch.linalg.vector_norm(new - orig, dim=-1, dtype=torch.float32)  # (B, T)
        total = total + _masked_sum(dist, mask)
        n_states += 1
    return total / (n_states * (B if n_rows is None else n_rows) * pad_to)


# ----------------------------------------------------------------------------------------------------
# A scale-free retain term (a variant, not the paper's): --retain-norm relative
#
# The L2 distance is in the units of the residual stream, which differ between models (Llama-3's states
# are a few units long at the middle layers, SmolLM2's about 200) and between tokens (a first token's
# "massive activation" is about 25,000 long on SmolLM2, so one token outweighs a row). The cosine of the
# rerouting term has no units, and its gradient shrinks as 1 / |h|, so the balance between the two terms,
# which the official code tunes with alpha and the 1024-position mean, changes from model to model.
# Dividing each token's distance by its original length gives the retain term the cosine's units:
#     L_retain_rel = mean_{s, t in mask}  || h_new[s, t] - h_orig[s, t] || / || h_orig[s, t] ||
# For a state that keeps its length and turns by a small angle theta, this is about theta, and 1 - cos
# about theta^2 / 2: both terms now read the same geometry whatever the model's scale.
# retain_loss(..., relative=True) computes it.


# ----------------------------------------------------------------------------------------------------
# Rerouting toward a direction: the `random` and `direction` targets
#
# Instead of only leaving their original direction, harmful states are pulled onto a chosen unit
# direction u_l (one per target layer), keeping their original length, so the model is not rewarded for
# shrinking or blowing up its states:
#     target[l, t] = u_l * ||h_orig[l, t]||
#     L_dir = mean_{l, t in mask} || h_new[l, t] - target[l, t] || / ||h_orig[l, t]||
#           = mean_{l, t in mask} || h_new[l, t] / ||h_orig[l, t]|| - u_l ||
# Dividing by the original length makes the term scale-free, between 0 and about 2 like the cosine
# loss (at the start it is about sqrt(2) for a random u), so the alpha values of the paper stay sensible.
# `random`: u_l a fixed random unit vector per layer (the "random vector scaled to the representation's
# norm" idea of the official experiments); `direction`: u_l read from a file, such as the refusal
# direction, so that harmful requests are rerouted to where the model represents refusing; `eot`: u_l
# the embedding of the token that ends a turn, the same at every layer.


def random_directions(n_layers: int, dim: int, seed: int = 0) -> Tensor:
    """One fixed random unit vector per target layer: (L, D) fp32, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_layers, dim, generator=g, dtype=torch.float32)
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def direction_loss(h_new, h_orig, mask: Tensor, directions: Tensor, eps: float = 1e-6) -> Tensor:
    """Distance of the new states from their target u_l * ||h_orig||, relative to ||h_orig||, mean over
    masked tokens and layers. h_new, h_orig (L, B, T, D); mask (B, T); directions (L, D) unit vectors."""
    if len(directions) != len(h_new):
        raise ValueError(f"direction_loss: {len(directions)} directions for {len(h_new)} layers")
    total = 0.0
    for new, orig, u in zip(h_new, h_orig, directions, strict=True):
        scale = torch.linalg.vector_norm(orig, dim=-1, dtype=torch.float32, keepdim=True)  # (B, T, 1)
        rel = new.float() / scale.clamp_min(eps) - u.to(new.device, torch.float32)  # (B, T, D)
        total = total + _masked_sum(torch.linalg.vector_norm(rel, dim=-1), mask)
    return total / (len(directions) * _n_tokens(mask))


# ----------------------------------------------------------------------------------------------------
# Metrics for logging


@torch.no_grad()
def cosine_mean(h_new, h_orig, mask: Tensor) -> Tensor:
    """Mean cosine between new and original states over masked tokens and layers (no ReLU), as a 0-d
    fp32 tensor left where the states are: 1 means unchanged, 0 orthogonal, negative pushed past
    orthogonal. Rerouting should drive it down on harmful text; on harmless text it should stay near 1."""
    total, n_layers = 0.0, 0
    for new, orig in zip(h_new, h_orig, strict=True):
        total = total + _masked_sum(_cosine(new, orig), mask)
        n_layers += 1
    return total / (n_layers * _n_tokens(mask))


def cosine_metric(h_new, h_orig, mask: Tensor) -> float:
    """cosine_mean as a Python float (a host synchronisation on a GPU)."""
    return cosine_mean(h_new, h_orig, mask).item()


# ----------------------------------------------------------------------------------------------------
# The registry: train.py's --loss
#
# An entry builds the rerouting term of one variant from the run's context, once, before training:
#     term = LOSSES[name].build(LossContext(model, tokenizer, cfg))
#     cb_loss = term(h_new, h_orig, mask)     # the target-layer states of harmful text, as rerouting_loss
# To add a variant, write its `build` function here and add one entry to LOSSES; train.py's --loss
# choices, its help text and the step's loss all come from this dict.


@dataclass
class LossContext:
    """What a variant may read: the model being trained (LoRA applied; `lora_disabled` gives the frozen
    one), its tokenizer, the resolved TrainConfig (target_layers, seed, ...), and the directions of the
    --direction file, one unit vector per target layer ((L, D) fp32; None without the flag), which train.py
    reads with refusal.target_directions."""
    model: torch.nn.Module
    tokenizer: object
    config: object
    directions: Tensor | None = None


Term = Callable[[list[Tensor], list[Tensor], Tensor], Tensor]  # (h_new, h_orig, mask) -> scalar


@dataclass(frozen=True)
class LossEntry:
    build: Callable[[LossContext], Term]
    help: str


def build_reroute(ctx: LossContext) -> Term:
    return rerouting_loss


def build_random(ctx: LossContext) -> Term:
    directions = random_directions(len(ctx.config.target_layers), ctx.model.args.dim, seed=ctx.config.seed)
    return partial(direction_loss, directions=directions)


def build_direction(ctx: LossContext) -> Term:
    if ctx.directions is None:
        raise ValueError("--loss direction needs --direction FILE (a direction file, e.g. from refusal.py)")
    return partial(direction_loss, directions=ctx.directions)


def build_eot(ctx: LossContext) -> Term:
    eot = end_of_turn_id(ctx.tokenizer)
    embedding = ctx.model.model.embed_tokens.weight[eot].detach().float()  # (D,)
    u = embedding / torch.linalg.vector_norm(embedding)
    directions = u.expand(len(ctx.config.target_layers), -1)  # (L, D): the same target at every layer
    return partial(direction_loss, directions=directions)


def end_of_turn_id(tokenizer) -> int:
    """The stop token the chat template writes after an answer (Llama-3 <|eot_id|>, Mistral </s>)."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello"}])
    ends = [t for t in ids if t in tokenizer.stop_ids]
    if not ends:
        raise ValueError("--loss eot: the chat template ends an answer with no stop token")
    return ends[-1]


LOSSES: dict[str, LossEntry] = {
    "reroute": LossEntry(build_reroute, "ReLU(cos) with the frozen model's states (the paper's)"),
    "random": LossEntry(build_random, "toward a fixed random direction per target layer"),
    "direction": LossEntry(build_direction, "toward a given direction per target layer, e.g. the "
                                            "refusal direction (needs --direction FILE)"),
    "eot": LossEntry(build_eot, "toward the embedding of the token that ends a turn"),
}
