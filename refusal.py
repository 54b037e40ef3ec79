"""
The refusal direction: find it, ablate it, bake the ablation into the weights.

Refusal in chat models is largely mediated by one direction of the residual stream (Arditi et al. 2024,
"Refusal in language models is mediated by a single direction"). Removing it from every layer makes a
refusal-trained model answer harmful requests, which makes it the strongest representation-level attack
a circuit breaker must survive; adding it makes the model refuse harmless ones. It is also a natural
target for rerouting (train.py's `--loss direction`).

The steps, as in the paper's pipeline:

1. Difference in means. For every hidden-state index l = 0..L (l as in model.py: hiddens[0] is the
   embeddings, hiddens[l] the input of block l, hiddens[L] the last block's output) and every
   post-instruction position p (the template tokens after the user's text, e.g. Llama-3's
   `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`), a candidate

       r[p, l] = mean_{harmful x} h_l(x)[p]  -  mean_{harmless x} h_l(x)[p]         (D,), float64 sums

2. Ablation. With r^ = r / |r|, every write to the residual stream loses its r^ component:

       x <- x - (x . r^) r^        at every block's input, attention output and MLP output

   `ablate(model, r)` does it with hooks; `orthogonalize(model, r)` bakes the same map into the weights
   that write to the stream (W_E <- W_E - W_E r^ r^T on the embedding rows, W <- W - r^ r^T W for
   o_proj and down_proj), giving a model with the same logits that any serving stack can load.
   `add_vector(model, r, l)` is the opposite intervention: r added to hidden state l.

3. Selection. Each candidate gets three scores on held-out prompts:
       refusal score    mean over harmful prompts of  log p(R) - log(1 - p(R))  with the candidate
                        ablated, where p(R) is the next-token probability of the refusal-opening tokens
                        R (e.g. "I" for "I cannot ...") at the last prompt position;
       steering score   the same on harmless prompts with r[p, l] added to the input of block l;
       KL score         mean over harmless prompts of KL(p_base || p_ablated) of the next token.
   The chosen candidate has the lowest refusal score among those whose addition induces refusal
   (steering score >= 0), whose ablation changes harmless outputs little (KL <= 0.1), and that sit
   in the first 80% of layers (later ones tend to act on the output tokens directly).

Command (writes the direction file read by losses.py and eval.py):

    python refusal.py --model-path checkpoints/Meta-Llama-3-8B-Instruct \\
        --harmful ../shared/data/refusal_direction/harmful_train.json \\
        --harmless ../shared/data/refusal_direction/harmless_train.json \\
        --harmful-val ../shared/data/refusal_direction/harmful_val.json \\
        --harmless-val ../shared/data/refusal_direction/harmless_val.json \\
        --out out/llama3-direction.safetensors [--export out/llama3-orthogonalized]
    python refusal.py --model-path DIR --direction FILE --export OUT_DIR    # bake an existing direction

The direction file (safetensors, metadata format/layer/position/model):
    direction        (D,)         the chosen candidate, unit norm
    layer.{l}        (D,)         raw difference in means at the chosen position, l = 0..L
    candidates       (P, L+1, D)  every raw candidate; position index p means offset p - P from the end
    refusal_score, steering_score, kl_score   (P, L+1)   NaN where a candidate is zero (never chosen)

Shape letters: N prompts, B batch, T time, P post-instruction positions, L blocks (L+1 hidden states),
D model width, V vocabulary.
"""

import argparse
import json
import math
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

import cli
import hf
from data import left_padded, load_instructions
from tokenizer import Tokenizer, template_tail

# The first token of a typical refusal ("I cannot ...", "I'm sorry ..."), as in the paper for Llama-2/3.
DEFAULT_REFUSAL_TEXTS = ["I"]

# -----------------------------------------------------------------------------
# Prompts and tokens


def tokenize_instructions(tokenizer, instructions: list[str]) -> list[list[int]]:
    """Each instruction as a one-turn chat prompt ending with the generation prompt (BOS included)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
            for text in instructions]


def post_instruction_tokens(tokenizer) -> list[int]:
    """The template tokens that follow the user's text up to the end of the generation prompt, in a
    one-turn prompt as tokenize_instructions writes it: the post-instruction positions the candidate
    directions come from."""
    tail = template_tail(tokenizer)
    if not tail:
        raise ValueError("the chat template adds no tokens after the user's text; there are no "
                         "post-instruction positions to read")
    return tail


def refusal_token_ids(tokenizer, texts: list[str]) -> list[int]:
    """The first response token of each refusal opening, as the chat template writes an answer
    (sentencepiece adds a leading "▁" to a turn, so a bare `encode` could pick the wrong piece)."""
    user = {"role": "user", "content": "Say alpha"}
    prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True)
    ids = []
    for text in texts:
        full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": text}])
        if len(full) > len(prompt) and full[:len(prompt)] == prompt:
            ids.append(full[len(prompt)])
        else:
            encoded = tokenizer.encode(text)
            if not encoded:
                raise ValueError(f"refusal text {text!r} encodes to no tokens")
            ids.append(encoded[0])
    return sorted(set(ids))


def default_refusal_texts(model_dir) -> list[str]:
    """The refusal openings to score: "I" for real chat models, or the toy world's fixed refusal when
    its world.json sits beside the model."""
    model_dir = Path(model_dir)
    for world in (model_dir / "world.json", model_dir.parent / "world.json"):
        if world.is_file():
            refusal = json.loads(world.read_text()).get("refusal")
            if isinstance(refusal, str) and refusal:
                return [refusal]
    return list(DEFAULT_REFUSAL_TEXTS)


def _device(model) -> torch.device:
    return model.model.embed_tokens.weight.device


# -----------------------------------------------------------------------------
# 1. Difference in means


@torch.no_grad()
def mean_hiddens(model, prompts: list[list[int]], n_positions: int, batch_size: int = 32,
                 pad_id: int = 0) -> torch.Tensor:
    """Mean residual state over prompts at their last n_positions tokens, every hidden state:
    -> (P, L+1, D) float64. Sums are kept in float64 so thousands of bf16 states average exactly."""
    total = None
    for i in range(0, len(prompts), batch_size):
        tokens, mask = (t.to(_device(model)) for t in left_padded(prompts[i:i + batch_size], pad_id))
        _, hiddens = model(tokens, mask, last_layer=len(model.model.layers))  # L+1 x (B, T, D)
        states = torch.stack([h[:, -n_positions:] for h in hiddens], dim=2)  # (B, P, L+1, D)
        batch_sum = states.double().sum(0)  # (P, L+1, D)
        total = batch_sum if total is None else total + batch_sum
    return total / len(prompts)


def difference_in_means(model, harmful: list[list[int]], harmless: list[list[int]], n_positions: int,
                        batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """Candidate directions r[p, l] (P, L+1, D) float64: mean harmful state minus mean harmless state."""
    if not harmful or not harmless:
        raise ValueError("difference_in_means needs at least one harmful and one harmless prompt")
    return (mean_hiddens(model, harmful, n_positions, batch_size, pad_id)
            - mean_hiddens(model, harmless, n_positions, batch_size, pad_id))


# -----------------------------------------------------------------------------
# 2. Interventions: ablation, addition, orthogonalised weights


def unit(direction: torch.Tensor) -> torch.Tensor:
    """(D,) -> (D,) float32 of norm 1, normalised in float64."""
    norm = torch.linalg.vector_norm(direction.double())
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("the direction is zero or not finite")
    return (direction.double() / norm).float()


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x (..., D) minus its component along the unit vector r_hat (D,), in x's dtype."""
    r_hat = r_hat.to(x.device, x.dtype)
    return x - (x @ r_hat)[..., None] * r_hat  # (..., D)


@contextmanager
def ablate(model, direction: torch.Tensor):
    """Inside the `with`, the model never represents `direction`: it is projected out of every block's
    input (which covers the embeddings, and input embeddings passed by an attack), every attention
    output and every MLP output, so no layer can read it or write it. Works for forward and generate.
    forward's hiddens[0] is still the raw embedding: the projection happens as block 0 reads it."""
    r_hat = unit(direction).to(_device(model))
    handles = []
    try:
        for block in model.model.layers:
            handles.append(block.register_forward_pre_hook(
                lambda module, args: (project_out(args[0], r_hat),) + tuple(args[1:])))
            handles.append(block.self_attn.register_forward_hook(
                lambda module, args, out: project_out(out, r_hat)))
            handles.append(block.mlp.register_forward_hook(
                lambda module, args, out: project_out(out, r_hat)))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_vector(model, vector: torch.Tensor, layer: int, coeff: float = 1.0):
    """Add coeff * vector to hidden state `layer` at every position (activation addition): the input of
    block `layer`, or of the final norm when layer = L."""
    n = len(model.model.layers)
    if not 0 <= layer <= n:
        raise ValueError(f"add_vector: layer {layer} outside 0..{n}")
    target = model.model.layers[layer] if layer < n else model.model.norm
    shift = coeff * vector.float()
    handle = target.register_forward_pre_hook(
        lambda module, args: (args[0] + shift.to(args[0].device, args[0].dtype),) + tuple(args[1:]))
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def orthogonalize(model, direction: torch.Tensor):
    """Bake `ablate` into the weights, in place: afterwards nothing writes `direction` into the
    residual stream, so the logits equal those under `ablate` (up to rounding). Merge any LoRA first:
    an unmerged adapter's update would still write the direction. Returns the model."""
    r = unit(direction).double().to(_device(model))  # (D,)
    if model.lm_head is not None and model.lm_head.weight is model.model.embed_tokens.weight:
        # Tied head: the head reads the normed stream, which ablation leaves alone; untie it first so
        # that projecting the embedding rows does not change the head too.
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.args.tie_word_embeddings = False
        model.config = {**model.config, "tie_word_embeddings": False}
    embed = model.model.embed_tokens.weight  # (V, D): each row is written into the stream
    embed.copy_((embed.double() - (embed.double() @ r)[:, None] * r[None]).to(embed.dtype))
    for block in model.model.layers:
        for linear in (block.self_attn.o_proj, block.mlp.down_proj):
            w = linear.weight  # (D, in): the output lives in the stream
            w.copy_((w.double() - r[:, None] * (r @ w.double())[None]).to(w.dtype))
    return model


def save_orthogonalized(model, model_dir, out_dir):
    """Write an orthogonalised model as a HF checkpoint, with the source's tokenizer files beside it."""
    if len(model.model.layers) != model.args.n_layers or model.lm_head is None:
        raise ValueError("save_orthogonalized needs the whole model (every block and the head)")
    hf.save_pretrained(out_dir, model.state_dict(), model.config, tokenizer_from=model_dir)


# -----------------------------------------------------------------------------
# 3. Scores and selection


def refusal_score(logits: torch.Tensor, refusal_ids: list[int], eps: float = 1e-8) -> torch.Tensor:
    """Log-odds of starting with a refusal token: logits (B, V) -> (B,) float64."""
    probs = logits.double().softmax(-1)  # (B, V)
    p = probs[:, refusal_ids].sum(-1)  # (B,)
    return torch.log(p + eps) - torch.log(1 - p + eps)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(p || q) of next-token distributions: (B, V), (B, V) -> (B,) float64 (eps as in the paper's code)."""
    p, q = logits_p.double().softmax(-1), logits_q.double().softmax(-1)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


@torch.no_grad()
def last_logits(model, prompts: list[list[int]], batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """Next-token logits after each prompt -> (N, V) float32. Only the last position goes through the
    head: a 128k vocabulary over every position would be most of the cost."""
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens, mask = (t.to(_device(model)) for t in left_padded(prompts[i:i + batch_size], pad_id))
        _, hiddens = model(tokens, mask, last_layer=len(model.model.layers))
        out.append(model.lm_head(model.model.norm(hiddens[-1][:, -1])).float())  # (B, V)
    return torch.cat(out)


@dataclass
class Selection:
    position: int  # offset from the end of the prompt, -P..-1
    layer: int  # hidden-state index, 0..L
    direction: torch.Tensor  # (D,) float32, unit norm
    candidates: torch.Tensor  # (P, L+1, D) float64, raw
    refusal_score: torch.Tensor  # (P, L+1) float64; NaN where the candidate is zero
    steering_score: torch.Tensor  # (P, L+1)
    kl_score: torch.Tensor  # (P, L+1)
    baseline_harmful: float  # mean refusal score without intervention
    baseline_harmless: float

    def chosen_layers(self) -> torch.Tensor:
        """(L+1, D) float32: the raw difference in means at the chosen position, every hidden state."""
        return self.candidates[self.position + self.candidates.shape[0]].float()

    def refusal_direction(self) -> "RefusalDirection":
        """The choice in the form the attacks and losses read (as a direction file holds it)."""
        return RefusalDirection(direction=self.direction, layers=self.chosen_layers(), layer=self.layer,
                                position=self.position)


def choose_candidate(refusal, steering, kl, n_layers: int, kl_threshold: float = 0.1,
                     induce_refusal_threshold: float = 0.0, prune_layer_fraction: float = 0.2) -> tuple[int, int]:
    """(p, l) of the lowest refusal score among candidates that pass the three filters; score tensors
    are (P, L+1). n_layers is L, the model's block count."""
    last_layer = int(n_layers * (1.0 - prune_layer_fraction))  # layers >= this are discarded
    best = None
    for p in range(refusal.shape[0]):
        for l in range(refusal.shape[1]):
            scores = (float(refusal[p, l]), float(steering[p, l]), float(kl[p, l]))
            if any(math.isnan(s) for s in scores) or l >= last_layer:
                continue
            if scores[2] > kl_threshold or scores[1] < induce_refusal_threshold:
                continue
            if best is None or scores[0] < best[0]:
                best = (scores[0], p, l)
    if best is None:
        raise ValueError(f"no candidate direction passes the filters (KL <= {kl_threshold}, steering "
                         f">= {induce_refusal_threshold}, layer < {last_layer}); loosen them with "
                         "--kl-threshold, --induce-refusal-threshold or --prune-layer-fraction")
    return best[1], best[2]


@torch.no_grad()
def score_candidates(model, candidates: torch.Tensor, harmful: list[list[int]], harmless: list[list[int]],
                     refusal_ids: list[int], batch_size: int = 32, pad_id: int = 0, log=print):
    """-> refusal, steering, KL scores (P, L+1) float64, and the two baseline refusal scores.
    Zero candidates (the embeddings of template tokens, identical in both sets) score NaN."""
    P, n_hidden, _ = candidates.shape
    base_harmful = last_logits(model, harmful, batch_size, pad_id)
    base_harmless = last_logits(model, harmless, batch_size, pad_id)
    scores = torch.full((3, P, n_hidden), float("nan"), dtype=torch.float64)  # refusal, steering, KL
    for p in range(P):
        for l in range(n_hidden):
            r = candidates[p, l]
            if not torch.linalg.vector_norm(r) > 0:
                continue
            with ablate(model, r):
                scores[0, p, l] = refusal_score(last_logits(model, harmful, batch_size, pad_id), refusal_ids).mean()
                ablated = last_logits(model, harmless, batch_size, pad_id)
                scores[2, p, l] = kl_divergence(base_harmless, ablated).mean()
            with add_vector(model, r, l):
                scores[1, p, l] = refusal_score(last_logits(model, harmless, batch_size, pad_id), refusal_ids).mean()
        log(f"scored position {p - P}: refusal {_fmt(scores[0, p])}  steering {_fmt(scores[1, p])}  "
            f"kl {_fmt(scores[2, p])}")
    return (scores[0], scores[1], scores[2], refusal_score(base_harmful, refusal_ids).mean().item(),
            refusal_score(base_harmless, refusal_ids).mean().item())


def _fmt(row) -> str:
    return " ".join(f"{float(v):.2f}" for v in row)


def select_direction(model, candidates: torch.Tensor, harmful_val: list[list[int]],
                     harmless_val: list[list[int]], refusal_ids: list[int], *, kl_threshold: float = 0.1,
                     induce_refusal_threshold: float = 0.0, prune_layer_fraction: float = 0.2,
                     batch_size: int = 32, pad_id: int = 0, log=print) -> Selection:
    """Score every candidate and choose one (the paper's filters and defaults)."""
    refusal, steering, kl, base_harmful, base_harmless = score_candidates(
        model, candidates, harmful_val, harmless_val, refusal_ids, batch_size, pad_id, log)
    p, l = choose_candidate(refusal, steering, kl, model.args.n_layers, kl_threshold,
                            induce_refusal_threshold, prune_layer_fraction)
    P = candidates.shape[0]
    return Selection(position=p - P, layer=l, direction=unit(candidates[p, l]), candidates=candidates,
                     refusal_score=refusal, steering_score=steering, kl_score=kl,
                     baseline_harmful=base_harmful, baseline_harmless=base_harmless)


# -----------------------------------------------------------------------------
# Direction files


def save_direction(path, selection: Selection, model_path: str, extra_metadata: dict | None = None):
    """Write the direction file whole or not at all (hf.atomic_file)."""
    chosen = selection.chosen_layers()  # (L+1, D)
    tensors = {"direction": selection.direction.float(),
               "candidates": selection.candidates.float(),
               "refusal_score": selection.refusal_score.float(),
               "steering_score": selection.steering_score.float(),
               "kl_score": selection.kl_score.float()}
    tensors.update({f"layer.{l}": chosen[l].float() for l in range(chosen.shape[0])})
    metadata = {"format": "pt", "layer": str(selection.layer), "position": str(selection.position),
                "model": str(model_path), **(extra_metadata or {})}
    with hf.atomic_file(path) as tmp:
        hf.save_safetensors({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)


@dataclass
class RefusalDirection:
    direction: torch.Tensor  # (D,) float32 unit vector: what `ablate` and `orthogonalize` take
    layers: torch.Tensor  # (L+1, D) float32 raw difference in means; layers[l] pairs with hiddens[l]
    layer: int  # the chosen hidden-state index
    position: int  # the chosen offset from the end of the prompt

    def unit_layers(self, indices: list[int]) -> torch.Tensor:
        """(len(indices), D) unit vectors, one per requested hidden-state index (e.g. target layers)."""
        return torch.stack([unit(self.layers[l]) for l in indices])


def read_direction_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a direction file; the one place direction files are opened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: direction file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path}: not a safetensors direction file ({e})") from None


def load_direction(path, model) -> RefusalDirection:
    """Read a direction file and check it fits `model` (a Transformer, or its ModelArgs): width D and
    one `layer.{l}` for every hidden state l = 0..L of the full model."""
    args = getattr(model, "args", model)
    tensors, metadata = read_direction_file(path)
    if "direction" not in tensors:
        raise ValueError(f"{path}: no 'direction' tensor (found {sorted(tensors)[:4]}); "
                         "write direction files with refusal.py")
    D, n_hidden = args.dim, args.n_layers + 1
    for name, t in tensors.items():
        if (name == "direction" or name.startswith("layer.")) and tuple(t.shape) != (D,):
            raise ValueError(f"{path}: '{name}' has shape {list(t.shape)}, but the model's width is {D}; "
                             "was the file written for another model?")
    found = sorted(int(k.split(".", 1)[1]) for k in tensors if k.startswith("layer."))
    if found != list(range(n_hidden)):
        raise ValueError(f"{path}: holds layer.0..layer.{found[-1] if found else '?'} ({len(found)} hidden "
                         f"states), but the model has {args.n_layers} layers, so {n_hidden} hidden states; "
                         "was the file written for another model?")
    try:
        layer, position = int(metadata["layer"]), int(metadata["position"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: metadata lacks integer 'layer' and 'position'") from None
    layers = torch.stack([tensors[f"layer.{l}"].float() for l in range(n_hidden)])  # (L+1, D)
    return RefusalDirection(direction=unit(tensors["direction"]), layers=layers, layer=layer, position=position)


def target_directions(path, layers: list[int], dim: int, n_layers: int | None = None) -> torch.Tensor:
    """One direction per target layer, for `--loss direction` -> (L, D) fp32 unit vectors.

    The file holds `layer.{l}` tensors of shape (D,), l indexing hidden states as the target layers
    do (hiddens[l] = output of block l-1); or a single `direction` (D,) used at every target layer.
    `n_layers` (the full model's block count), when given, rejects files written for a deeper model.
    """
    path = Path(path)
    tensors, _ = read_direction_file(path)
    per_layer = {int(k.split(".", 1)[1]): v for k, v in tensors.items()
                 if k.startswith("layer.") and k.split(".", 1)[1].isdigit()}
    if per_layer:
        if n_layers is not None and max(per_layer) > n_layers:
            raise ValueError(f"{path}: holds a direction for layer {max(per_layer)} but the model has "
                             f"{n_layers} layers; was it written for another model?")
        missing = [l for l in layers if l not in per_layer]
        if missing:
            raise ValueError(f"{path}: no direction for target layer(s) {missing}; "
                             f"the file has layers {sorted(per_layer)}")
        vectors = [(f"layer.{l}", per_layer[l]) for l in layers]
    elif "direction" in tensors:
        vectors = [("direction", tensors["direction"])] * len(layers)
    else:
        raise ValueError(f"{path}: expected tensors 'layer.<l>' or 'direction', "
                         f"found {sorted(tensors)[:5]}")
    out = []
    for name, v in vectors:
        if v.shape != (dim,):
            raise ValueError(f"{path}: '{name}' has shape {tuple(v.shape)}, expected ({dim},) "
                             f"for a model of width {dim}")
        v = v.to(torch.float32)
        norm = torch.linalg.vector_norm(v)
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError(f"{path}: '{name}' is zero or not finite")
        out.append(v / norm)
    return torch.stack(out)  # (L, D)


# -----------------------------------------------------------------------------
# From instruction files to a direction


def instructions_from(path) -> list[str]:
    records = load_instructions(path)
    texts = [r["instruction"] for r in records]
    if not texts:
        raise ValueError(f"{path}: holds no instructions")
    return texts


def sample_sets(harmful: list[str], harmless: list[str], harmful_val: list[str] | None,
                harmless_val: list[str] | None, n_train: int, n_val: int, seed: int, names=("harmful", "harmless")):
    """{(kind, "train" | "val"): instructions}, drawn as the official pipeline draws them: one generator
    seeded once, sampling harmful-train, harmless-train, harmful-val, harmless-val in that order, so the
    same seed picks the same subsets. A kind without a validation file first holds some of its training
    instructions out (never the same instruction in both)."""
    rng = random.Random(seed)
    pools = {}
    for kind, train, val, name in (("harmful", harmful, harmful_val, names[0]),
                                   ("harmless", harmless, harmless_val, names[1])):
        if val is None:
            if len(train) < 2:
                raise ValueError(f"{name}: needs at least 2 instructions to hold some out for validation")
            shuffled = rng.sample(train, len(train))
            k = min(n_val, len(train) // 2)
            val, train = shuffled[:k], shuffled[k:]
        pools[kind, "train"], pools[kind, "val"] = train, val
    order = (("harmful", "train"), ("harmless", "train"), ("harmful", "val"), ("harmless", "val"))
    return {key: rng.sample(pools[key], min(n_train if key[1] == "train" else n_val, len(pools[key])))
            for key in order}


def filter_by_refusal(model, prompts, texts, refusal_ids, refuse: bool, batch_size, pad_id, name):
    """The paper keeps only harmful prompts the model refuses (score > 0) and harmless ones it answers
    (score < 0); a score of exactly 0 is neither, and is dropped from both, as officially."""
    scores = refusal_score(last_logits(model, prompts, batch_size, pad_id), refusal_ids)
    keep = [i for i, s in enumerate(scores.tolist()) if (s > 0 if refuse else s < 0)]
    if not keep:
        raise ValueError(f"{name}: no instruction is {'refused' if refuse else 'answered'} by the model "
                         f"(refusal token ids {refusal_ids}); check the model, the files and --refusal-text, "
                         "or pass --no-filter")
    return [prompts[i] for i in keep], [texts[i] for i in keep]


def find_direction(model, model_path, harmful, harmless, *, harmful_val=None, harmless_val=None,
                   n_train: int = 128, n_val: int = 32, refusal_texts: list[str] | None = None,
                   filter_refusals: bool = True, kl_threshold: float = 0.1, induce_refusal_threshold: float = 0.0,
                   prune_layer_fraction: float = 0.2, batch_size: int = 32, seed: int = 42, log=print) -> Selection:
    """Steps 1 and 3 from instruction files: sample, tokenize, filter, take means, select.

    harmful / harmless (and their _val files, held out of the training files when absent) are
    [{"instruction", "category"}] JSON files; refusal_texts default to default_refusal_texts(model_path);
    filter_refusals keeps only the harmful instructions the model refuses and the harmless ones it
    answers; the thresholds are select_direction's."""
    tokenizer = Tokenizer.from_pretrained(model_path)
    sets = sample_sets(instructions_from(harmful), instructions_from(harmless),
                       instructions_from(harmful_val) if harmful_val else None,
                       instructions_from(harmless_val) if harmless_val else None, n_train, n_val, seed,
                       names=(harmful, harmless))
    refusal_ids = refusal_token_ids(tokenizer, refusal_texts or default_refusal_texts(model_path))
    eoi = post_instruction_tokens(tokenizer)
    log(f"refusal tokens {refusal_ids} {[tokenizer.decode([t]) for t in refusal_ids]}; "
        f"{len(eoi)} post-instruction positions {[tokenizer.decode([t]) for t in eoi]}")

    pad, bs = tokenizer.pad_id, batch_size
    prompts = {}
    for kind, refuse in (("harmful", True), ("harmless", False)):
        for split in ("train", "val"):
            texts = sets[kind, split]
            ids = tokenize_instructions(tokenizer, texts)
            if filter_refusals:
                ids, texts = filter_by_refusal(model, ids, texts, refusal_ids, refuse, bs, pad, f"{kind} {split}")
            prompts[kind, split] = ids
            log(f"{kind} {split}: {len(ids)} instructions")

    candidates = difference_in_means(model, prompts["harmful", "train"], prompts["harmless", "train"],
                                     len(eoi), bs, pad)
    return select_direction(model, candidates, prompts["harmful", "val"], prompts["harmless", "val"],
                            refusal_ids, kl_threshold=kl_threshold, induce_refusal_threshold=induce_refusal_threshold,
                            prune_layer_fraction=prune_layer_fraction, batch_size=bs, pad_id=pad, log=log)


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    d = cli.keyword_defaults(find_direction)  # the search's flags feed find_direction (cli.call)
    p = argparse.ArgumentParser(prog="refusal.py", allow_abbrev=False,
                                description="Find a model's refusal direction (Arditi et al. 2024), "
                                "and optionally export the model with it orthogonalised away.")
    p.add_argument("--model-path", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--harmful", help="harmful instructions, [{'instruction', 'category'}]")
    p.add_argument("--harmless", help="harmless instructions, same format")
    p.add_argument("--harmful-val", help="held-out harmful instructions for selection (default: from --harmful)")
    p.add_argument("--harmless-val", help="held-out harmless instructions (default: from --harmless)")
    p.add_argument("--out", help="direction file to write (.safetensors)")
    p.add_argument("--direction", help="an existing direction file: skip the search and only --export")
    p.add_argument("--export", help="also write the orthogonalised model here (a HF checkpoint directory)")
    p.add_argument("--n-train", type=int, default=d["n_train"], help="instructions per set for the means")
    p.add_argument("--n-val", type=int, default=d["n_val"], help="instructions per set for selection")
    p.add_argument("--refusal-text", action="append", dest="refusal_texts", help="a refusal opening whose first "
                   "token counts as refusing (repeatable); default 'I', or the toy world's refusal")
    p.add_argument("--no-filter", action="store_false", dest="filter_refusals",
                   help="keep instructions the model does not refuse/answer")
    p.add_argument("--kl-threshold", type=float, default=d["kl_threshold"])
    p.add_argument("--induce-refusal-threshold", type=float, default=d["induce_refusal_threshold"])
    p.add_argument("--prune-layer-fraction", type=float, default=d["prune_layer_fraction"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_threads_flag(p)
    p.add_argument("--dtype", default="auto", choices=["auto", *hf.DTYPES],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    if args.direction is not None:
        if args.export is None:
            p.error("--direction only makes sense with --export")
    elif args.harmful is None or args.harmless is None or args.out is None:
        p.error("--harmful, --harmless and --out are required (or --direction with --export)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        # before the model is loaded: a bad --out would otherwise fail only after the search
        cli.check_flags(args, {"n_train": 1, "n_val": 1, "batch_size": 1}, {"out": False, "export": True})
        cli.use_threads(args.threads)
        dtype = hf.pick_dtype(args.dtype, args.device)
        model = hf.load_pretrained(args.model_path, dtype=dtype, device=args.device).eval()
        model.requires_grad_(False)
        if args.direction is not None:
            direction = load_direction(args.direction, model).direction
        else:
            sel = cli.call(find_direction, args, model=model)
            P = sel.candidates.shape[0]
            print(f"chosen: position {sel.position}, layer {sel.layer}: refusal score "
                  f"{sel.refusal_score[sel.position + P, sel.layer]:.3f} (baseline {sel.baseline_harmful:.3f}), "
                  f"steering {sel.steering_score[sel.position + P, sel.layer]:.3f} "
                  f"(baseline {sel.baseline_harmless:.3f}), KL {sel.kl_score[sel.position + P, sel.layer]:.4f}")
            save_direction(args.out, sel, args.model_path)
            print(f"wrote {args.out}")
            direction = sel.direction
        if args.export is not None:
            save_orthogonalized(orthogonalize(model, direction), args.model_path, args.export)
            print(f"wrote {args.export}")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"refusal.py: error: {e}")


if __name__ == "__main__":
    main()
