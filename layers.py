"""
The paper's layer analysis: how far the circuit breaker moves the residual stream, layer by layer.

For each text, the base model (adapter off) and the circuit-broken model (adapter on) read the same
tokens; the cosine between their states is averaged over the response tokens, at every hidden-state
index l = 0..L. The paper reports it collapsing from the first target layer on for harmful text, and
staying near 1 for benign text. eval.py's `layers` command runs it on the official data files, or on
the toy world (toy_eval.py); the toy evaluation reports it beside its attacks.
"""

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

import hf
from attacks import chat_prompt, load_evaluated
from data import Example, load_circuit_breaker_set, load_ultrachat, pack_rows
from lora import lora_disabled


def chat_examples(tok, pairs, max_length: int) -> list[Example]:
    """(request, response) pairs -> examples whose loss mask is the response, capped in length."""
    out = []
    for request, response in pairs:
        prompt = chat_prompt(tok, [{"role": "user", "content": request}])
        ids = (prompt + tok.encode(response))[:max_length]
        if len(ids) > len(prompt):
            out.append(Example(ids, len(prompt), [0] * len(prompt) + [1] * (len(ids) - len(prompt))))
    return out


@torch.no_grad()
def layer_cosines(model, examples, batch_size: int) -> list[float]:
    """Mean cosine(base state, circuit-broken state) over response tokens, per hidden-state index. Each
    batch runs packed (its rows one after another, each as if alone), so no padding is computed."""
    n_hidden = len(model.model.layers) + 1
    total, count = torch.zeros(n_hidden, dtype=torch.float64), 0
    device = model.model.embed_tokens.weight.device
    for start in range(0, len(examples), batch_size):
        (tokens, _, response), lengths = pack_rows(examples[start:start + batch_size], pad_id=0, multiple=1)
        tokens, keep = tokens.to(device), response[0].bool().to(device)  # (1, N), (N,)
        with lora_disabled(model):
            _, base = model(tokens, lengths=lengths, last_layer=n_hidden - 1)
        _, broken = model(tokens, lengths=lengths, last_layer=n_hidden - 1)
        for l in range(n_hidden):
            cos = F.cosine_similarity(base[l][0, keep].float(), broken[l][0, keep].float(), dim=-1)  # (M,)
            total[l] += cos.double().sum().cpu()
        count += int(keep.sum())
    return (total / max(count, 1)).tolist()


def text_cosines(model, tok, texts: dict, max_length: int, batch_size: int) -> dict:
    """{set name: [(request, response)]} -> {set name: its layer cosines, "n_<set name>": its examples}.
    `model` keeps its adapter unmerged, so that lora_disabled can give the base model's states."""
    out = {}
    for name, pairs in texts.items():
        examples = chat_examples(tok, pairs, max_length)
        out[name], out[f"n_{name}"] = layer_cosines(model, examples, batch_size), len(examples)
    return out


def measure_layers(model_path, adapter, texts: dict, *, max_length=1024, batch_size=8, device="cpu",
                   dtype="auto") -> dict:
    """The layer cosines of `texts` ({"harmful": pairs, "benign": pairs}) under the adapter."""
    model, tok = load_evaluated(model_path, adapter, hf.pick_dtype(dtype, device), device, merge=False)
    cosines = text_cosines(model, tok, texts, max_length, batch_size)
    return {"layers": list(range(len(cosines["harmful"]))), **cosines}


def evaluate_layers(model_path, adapter, data, *, benign=None, limit=100, max_length=1024, batch_size=8,
                    device="cpu", dtype="auto") -> dict:
    """Layer cosines on `limit` texts of a circuit-breaker set (`data`) and of benign chat (`benign`,
    default: ultrachat.jsonl beside `data`)."""
    harmful = load_circuit_breaker_set(data)
    benign_path = Path(benign) if benign else Path(data).parent / "ultrachat.jsonl"
    if not benign_path.is_file():
        raise FileNotFoundError(f"{benign_path}: no benign chat file; pass --benign FILE (UltraChat JSONL)")
    chats = load_ultrachat(benign_path, limit=limit)
    texts = {"harmful": [(r["prompt"], r["output"]) for r in harmful[:limit]],
             "benign": [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in chats]}
    return measure_layers(model_path, adapter, texts, max_length=max_length, batch_size=batch_size,
                          device=device, dtype=dtype)


def write_layers(result: dict, out: Path):
    """The CSV, and a PNG beside it when matplotlib (optional) is installed (-> its path, else None)."""
    with hf.atomic_file(out) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "harmful_cosine", "benign_cosine"])
        for l, h, b in zip(result["layers"], result["harmful"], result["benign"]):
            w.writerow([l, f"{h:.6f}", f"{b:.6f}"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result["layers"], result["harmful"], marker="o", label=f"harmful ({result['n_harmful']})")
    ax.plot(result["layers"], result["benign"], marker="o", label=f"benign ({result['n_benign']})")
    ax.set_xticks(result["layers"])
    ax.set_xlabel("hidden state (0 = embeddings)")
    ax.set_ylabel("cosine, base vs circuit-broken")
    ax.set_ylim(min(-0.1, *result["harmful"], *result["benign"]) - 0.05, 1.05)  # rerouted states go below 0
    ax.legend()
    fig.tight_layout()
    png = out.with_suffix(".png")
    with hf.atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return png


def layers_table(result: dict) -> str:
    lines = [f"{'layer':>5} {'harmful':>8} {'benign':>8}"]
    lines += [f"{l:>5} {h:>8.3f} {b:>8.3f}" for l, h, b in zip(result["layers"], result["harmful"], result["benign"])]
    return "\n".join(lines)
