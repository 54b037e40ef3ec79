"""
A Llama-3 / Mistral transformer in plain PyTorch that runs Hugging Face checkpoints unchanged
and returns its residual stream.

Read it top to bottom: configuration, the pieces of a block (RMSNorm, rotary embeddings,
attention, MLP), the block, the model with its forward pass and generation. Reading and writing
checkpoints (config.json, safetensors shards) is hf.py's job.

The residual stream is what circuit breakers act on, so `forward` returns it directly:

    logits, hiddens = model(tokens, attention_mask)
    logits, hiddens = model(tokens, lengths=(n_1, ..., n_B))   # B rows packed in one sequence (1, T)
    hiddens[0]   the token embeddings                      (B, T, D)
    hiddens[i]   the stream after block i-1, i = 1..L      (B, T, D)

This is the indexing of Hugging Face's `output_hidden_states`, so "target layer 10" reads
`hiddens[10]`, the output of block 9, exactly as in the official circuit-breaker code. The one
difference: Hugging Face applies the final norm to its last entry; ours stays un-normed (apply
`model.model.norm` yourself when you need HF's value).

Module names follow Hugging Face's (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...),
so checkpoint tensors load by name with no rename table and no permutation.

Shape letters: B batch, T time (query length), S key length, D model width, H query heads,
K key/value heads, E head dim, F MLP width, V vocabulary, L layers.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    """The architecture's sizes and constants; hf.model_args reads them from a config.json."""

    dim: int  # D, hidden_size
    n_layers: int  # L, num_hidden_layers
    n_heads: int  # H, num_attention_heads
    n_kv_heads: int  # K, num_key_value_heads (K < H: grouped-query attention)
    head_dim: int  # E, usually D // H
    ffn_dim: int  # F, intermediate_size
    vocab_size: int  # V
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3.1 frequency scaling, or None
    sliding_window: int | None = None  # Mistral v0.1: 4096; None = plain causal
    tie_word_embeddings: bool = False
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)


def projection_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """{projection name: its weight's (out, in)} for the seven linear layers of a block, as built below."""
    D, HE, KE, F_ = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim
    return {"q_proj": (HE, D), "k_proj": (KE, D), "v_proj": (KE, D), "o_proj": (D, HE),
            "gate_proj": (F_, D), "up_proj": (F_, D), "down_proj": (D, F_)}


# -----------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32, cast back, then scale: the same order as HF and Meta, which matters in bf16.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# -----------------------------------------------------------------------------
# Rotary position embeddings
#
# Meta rotates interleaved pairs (2j, 2j+1). Hugging Face's converter permutes the rows of q_proj and
# k_proj so that pair j sits at dims (j, j + E/2): the "split-half" layout. We use that layout, so HF
# weights load unchanged:  x' = x * cos + rotate_half(x) * sin,  rotate_half(x) = [-x2, x1].


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(E/2,) fp32 inverse frequencies, with Llama-3.1 scaling when the config asks for it."""
    E = args.head_dim
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, E, 2, dtype=torch.int64, device="cpu").float() / E)
    if args.rope_scaling is not None:
        inv_freq = llama3_scale(inv_freq, args.rope_scaling)
    return inv_freq


def llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama-3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between."""
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen = old_ctx / s["low_freq_factor"]
    high_wavelen = old_ctx / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    interpolated = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, interpolated, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) -> cos, sin (B, 1, T, E), computed in fp32 and cast to the activation dtype (as HF)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, E)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------
# Attention mask
#
# One boolean mask (B, 1, T, S), True = may attend, covers causality, padding and Mistral's sliding
# window. Queries are the last T of the S key slots (S > T while decoding with a cache).


def attention_mask(key_mask: torch.Tensor, T: int, window: int | None) -> torch.Tensor:
    """key_mask (B, S) with 1 at real tokens -> (B, 1, T, S) bool."""
    B, S = key_mask.shape
    q = torch.arange(S - T, S, device=key_mask.device)[:, None]  # (T, 1) absolute query slot
    k = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    allowed = k <= q  # (T, S) causal
    if window is not None:
        allowed &= q - k < window  # HF: query i sees key j iff i - W < j <= i
    allowed = allowed[None] & key_mask[:, None, :].bool()  # (B, T, S)
    # A padding query would see no key at all and SDPA would return NaN; let it see itself.
    # Its output is never used, and real queries are unaffected (they always see themselves).
    allowed |= q == k
    return allowed[:, None]


def positions_from_mask(key_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Positions count real tokens only (as HF generate does), so padding on either side changes nothing."""
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)


# -----------------------------------------------------------------------------
# Packed rows
#
# Training packs a batch's rows one after another into one sequence (1, T), lengths n_1..n_B, instead of
# padding every row to the longest. Each row must then run exactly as if alone: its positions restart at 0
# and its tokens attend only to earlier tokens of the same row (block-diagonal and causal, and within
# Mistral's window). What is left of T after the rows is padding, run as one more row of its own.


@dataclass(frozen=True)
class Packed:
    """How a packed sequence is cut: `rows` the lengths of its rows, padding included, summing to T."""
    rows: tuple[int, ...]
    window: int | None


def packed(lengths, T: int, window: int | None) -> Packed:
    """The rows of a sequence of T tokens from their lengths; what they leave of T is a padding row."""
    lengths = tuple(int(n) for n in lengths)
    if min(lengths, default=0) < 1 or sum(lengths) > T:
        raise ValueError(f"lengths {lengths}: expected rows of at least 1 token, together at most T = {T}")
    tail = T - sum(lengths)
    return Packed(lengths + ((tail,) if tail else ()), window)


def packed_positions(p: Packed, device) -> torch.Tensor:
    """(1, T): 0..n_i - 1 within each row. Built on the CPU and copied once, not a kernel per row."""
    return torch.cat([torch.arange(n) for n in p.rows])[None].to(device, non_blocking=True)


@torch.compiler.disable  # traced, the loop is unrolled: each new number of rows would be a new graph
def packed_attention(q, k, v, p: Packed, gqa: bool) -> torch.Tensor:
    """q (1, H, T, E), k and v (1, K, T, E) -> (1, H, T, E), each row attending only within itself.

    One SDPA call per row on its slice: exact, and no work on the pairs of different rows that a
    block-diagonal (T, T) mask would still compute (most of them: each row is a small part of T)."""
    out = []
    for q_row, k_row, v_row in zip(q.split(p.rows, 2), k.split(p.rows, 2), v.split(p.rows, 2)):
        n = q_row.shape[2]
        mask = None if p.window is None or p.window >= n else attention_mask(
            torch.ones(1, n, device=q.device), n, p.window)  # (1, 1, n, n)
        out.append(F.scaled_dot_product_attention(q_row, k_row, v_row, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=gqa))  # (1, H, n, E)
    return torch.cat(out, dim=2)


# -----------------------------------------------------------------------------
# Attention, MLP, block


class KVCache:
    """Per-layer keys and values for incremental decoding, preallocated to the full length."""

    def __init__(self, B, K, S_max, E, dtype, device):
        self.k = torch.zeros(B, K, S_max, E, dtype=dtype, device=device)
        self.v = torch.zeros(B, K, S_max, E, dtype=dtype, device=device)
        self.length = 0

    def update(self, k, v):
        """k, v (B, K, T, E) -> all keys and values so far (B, K, S, E)."""
        T = k.shape[2]
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A copy holding these batch rows' positions so far: what runs after it leaves this cache as it is
        (so one prefix serves many continuations)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v, out.length = self.k[rows], self.v[rows], self.length  # indexing by a tensor copies
        return out


class PackedPrefill:
    """Generation's first pass runs the prompts packed one after another, with no padding (Packed rows);
    each layer hands it the keys and values of that pass (1, K, N, E), and it writes each row's into the
    cache right-aligned to T0, where left padding would have put them, so decoding goes on as if the
    prompts had been left-padded."""

    def __init__(self, cache: KVCache, rows: torch.Tensor, slots: torch.Tensor, T0: int):
        self.cache, self.rows, self.slots, self.T0 = cache, rows, slots, T0  # rows, slots (N,): each token's place
        self.length = 0

    def update(self, k, v):
        """k, v (1, K, N, E) -> the same, for the packed attention of this pass."""
        self.cache.k[self.rows, :, self.slots] = k[0].transpose(0, 1)  # (N, K, E)
        self.cache.v[self.rows, :, self.slots] = v[0].transpose(0, 1)
        self.cache.length = self.T0
        return k, v


def project(x, *layers) -> list:
    """[layer(x) for each layer]. Layers that can share the work on a common input say how with a
    `project_together(x, layers)` method (LoRA layers: one dropout and one matmul for all their A's);
    a forward hook on one of those layers then does not run (hook the block, self_attn or mlp)."""
    together = getattr(layers[0], "project_together", None)
    return together(x, layers) if together else [layer(x) for layer in layers]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # (B, T, HE), (B, T, KE), (B, T, KE)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, K, S, E)
        # Grouped-query attention: query head h reads kv head h // (H / K); SDPA does the grouping.
        # mask None means plain causal attention with no padding, which lets SDPA pick its fused kernels.
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(mask, Packed):
            y = packed_attention(q, k, v, mask, gqa)  # (1, H, T, E)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)  # (B, H, T, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        gate, up = project(x, self.gate_proj, self.up_proj)  # (B, T, F) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block. Input and output are the residual stream (B, T, D), so forward hooks on a
    block, its `self_attn` or its `mlp` see (and may edit) the stream or what each adds to it."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# -----------------------------------------------------------------------------
# The model


class Decoder(nn.Module):
    """Holds what HF calls `model.*`: embeddings, blocks, final norm."""

    def __init__(self, args: ModelArgs, n_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, n_layers: int | None = None, lm_head: bool = True):
        """n_layers < args.n_layers builds only the first blocks (training reads nothing deeper)."""
        super().__init__()
        self.args = args
        self.config: dict = {}  # the HF config.json this model came from, kept for export
        self.model = Decoder(args, args.n_layers if n_layers is None else n_layers)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False) if lm_head else None
        if self.lm_head is not None and args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.inv_freq = rope_inv_freq(args)  # fp32 on purpose: not a buffer, so .to(bf16) leaves it alone
        self.gradient_checkpointing = False

    def embed(self, tokens):
        return self.model.embed_tokens(tokens)  # (B, T) -> (B, T, D)

    def forward(self, tokens=None, attention_mask=None, *, lengths=None, input_embeds=None, last_layer=None,
                cache: list[KVCache] | None = None):
        """tokens (B, T) or input_embeds (B, T, D); attention_mask (B, T), 1 at real tokens (None: no padding).
        lengths: packed rows instead (B = 1, no attention_mask): the lengths of the rows laid one after
        another in the sequence, each run as if alone; the rest of T is padding.
        cache: per-layer KV caches holding S earlier positions, which the T new ones follow (and are added
        to); attention_mask then covers all S + T.
        Returns logits (B, T, V) and the L+1 hidden states. last_layer=k runs blocks 0..k-1 only and
        returns hiddens[0..k] with logits None."""
        x = self.embed(tokens) if input_embeds is None else input_embeds  # (B, T, D)
        if lengths is not None:
            if x.shape[0] != 1 or attention_mask is not None:
                raise ValueError(f"packed rows (lengths) run as one sequence (1, T) with no attention_mask; "
                                 f"got batch {x.shape[0]}" + (" and a mask" if attention_mask is not None else ""))
            attention_mask = packed(lengths, x.shape[1], self.args.sliding_window)
        return self._run(x, attention_mask, cache, last_layer=last_layer)

    def _run(self, x, key_mask, cache: list[KVCache] | None = None, last_layer=None):
        """key_mask: (B, S) 1 at real tokens, None (no padding), or a Packed sequence."""
        B, T, _ = x.shape
        n_built = len(self.model.layers)
        n = n_built if last_layer is None else last_layer
        if not 0 <= n <= n_built:
            raise ValueError(f"last_layer={last_layer}, but this model has {n_built} blocks loaded")
        past = 0 if cache is None else cache[0].length
        if isinstance(key_mask, Packed):
            positions, mask = packed_positions(key_mask, x.device), key_mask
        elif key_mask is None and cache is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
            window = self.args.sliding_window
            mask = None if window is None or window >= T else attention_mask(
                torch.ones(B, T, device=x.device), T, window)
        else:
            if key_mask is None:
                key_mask = torch.ones(B, past + T, device=x.device)
            positions = positions_from_mask(key_mask, T)
            mask = attention_mask(key_mask, T, self.args.sliding_window)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)  # (B, 1, T, E)

        hiddens = [x]
        for i, block in enumerate(self.model.layers[:n]):
            if cache is not None:
                x = block(x, cos, sin, mask, cache[i])
            elif self.gradient_checkpointing and torch.is_grad_enabled():
                # Keep only each block's input; recompute its insides during backward.
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask)
            hiddens.append(x)
        if last_layer is not None or self.lm_head is None:
            return None, hiddens
        return self.lm_head(self.model.norm(x)), hiddens  # (B, T, V)

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=(), *,
                 embeds=None, generator=None):
        """Batched sampling with a KV cache. prompts: list of token-id lists (or `embeds`, a list of
        (T_i, D) tensors, for inputs that are not tokens). Rows are left-padded. Greedy when temperature
        is 0. Returns each row's new tokens, up to (not including) its first stop id. A row that has
        stopped is carried along until a quarter of the batch has (copying the caches costs about a step),
        then the stopped rows are dropped, so a batch whose answers end early gets faster as it goes."""
        if self.lm_head is None:
            raise ValueError("generate needs the lm_head: load the model with lm_head=True")
        device, dtype = self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype
        if embeds is None:
            embeds = [self.embed(torch.tensor(p, dtype=torch.long, device=device)) for p in prompts]
        lengths = [e.shape[0] for e in embeds]
        B, T0 = len(embeds), max(lengths)
        key_mask = torch.zeros(B, T0 + max_new_tokens, dtype=torch.long, device=device)  # left-padded prompts
        for b, n in enumerate(lengths):
            key_mask[b, T0 - n:T0] = 1
        cache = [KVCache(B, self.args.n_kv_heads, T0 + max_new_tokens, self.args.head_dim, dtype, device)
                 for _ in self.model.layers]
        logits = self._prefill(embeds, lengths, cache)  # (B, V)

        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        n_new = torch.zeros(B, dtype=torch.long, device=device)
        live = torch.arange(B, device=device)  # the rows still decoding, as indices into out
        done = torch.zeros(B, dtype=torch.bool, device=device)  # per row of the running batch
        for t in range(max_new_tokens):
            token = sample(logits.float(), temperature, top_p, generator)  # (b,)
            done |= torch.isin(token, stop)
            out[live, t] = token
            n_new[live] += (~done).long()
            if done.all():
                break
            if done.sum() * 4 >= len(live):  # a quarter of the batch has stopped: drop those rows
                keep = ~done
                live, token, key_mask, done = live[keep], token[keep], key_mask[keep], done[keep]
                cache = [c.select(keep) for c in cache]
            key_mask[:, T0 + t] = 1
            logits, _ = self._run(self.embed(token[:, None]), key_mask[:, :T0 + t + 1], cache)
            logits = logits[:, -1]  # (b, V)
        out, n_new = out.tolist(), n_new.tolist()  # two reads from the device, not one per row
        return [row[:n] for row, n in zip(out, n_new)]

    def _prefill(self, embeds, lengths, cache: list[KVCache]) -> torch.Tensor:
        """The prompts' pass: packed one after another (no padding to compute), their keys and values into
        the caches (PackedPrefill), and the logits at each prompt's last token only -> (B, V)."""
        device, dtype = self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype
        N, T0 = sum(lengths), max(lengths)
        rows = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)]).to(device)  # (N,)
        slots = torch.cat([torch.arange(T0 - n, T0) for n in lengths]).to(device)  # (N,)
        fills = [PackedPrefill(c, rows, slots, T0) for c in cache]
        x = torch.cat([e.to(device, dtype) for e in embeds])[None]  # (1, N, D)
        _, hiddens = self._run(x, packed(lengths, N, self.args.sliding_window), fills,
                               last_layer=len(self.model.layers))
        last = torch.tensor(lengths, device=device).cumsum(0) - 1  # (B,) each prompt's last token
        return self.lm_head(self.model.norm(hiddens[-1][0, last]))  # (B, V)


# -----------------------------------------------------------------------------
# Sampling


def sample(logits, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> tokens (B,). Greedy at temperature 0; otherwise nucleus sampling."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
