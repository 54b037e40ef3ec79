"""
The official circuit-breaker step on transformers + peft, for bench.py --hf: the stack a user would
otherwise run, timed on the same batches as ours (bench.HFRunner). Only bench.py imports it, only when
asked; the training code never does. Needs transformers and peft (requirements-test.txt).

The step follows the official code (GraySwanAI/circuit-breakers, src/lorra_circuit_breaker.py,
`compute_loss`), on the reference mode's batches (official padding, masks passed): the frozen passes with
the adapter disabled in eval mode, then the LoRA passes, every hidden state HF returns stacked, the retain
distance's `nanmean` over every padded position, the rerouting cosine over the masked target-layer states,
the official schedule; then backward, clipping and AdamW as the Trainer runs them. The model is a
`*ForCausalLM` built from the shape with random weights, cut to the blocks the recipe loads (as the
official code cuts its model), fp32 weights under bf16 autocast on a GPU, LoRA by `peft.get_peft_model`.
"""

import torch

import data
import losses
import train
from model import ModelArgs


def hf_model(args: ModelArgs, cfg: train.TrainConfig):
    """The shape as a transformers model with random fp32 weights, PEFT's LoRA as the recipe sets it."""
    import peft
    import transformers

    config_class = transformers.MistralConfig if cfg.model == "mistral" else transformers.LlamaConfig
    config = config_class(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                          num_hidden_layers=train.n_blocks_needed(cfg), num_attention_heads=args.n_heads,
                          num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
                          rope_theta=args.rope_theta, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(cfg.device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=list(cfg.lora_targets), layers_to_transform=list(cfg.lora_layers),
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def official_loss(model, batch: data.Batch, step: int, cfg: train.TrainConfig) -> torch.Tensor:
    """compute_loss of the official code, on one batch of the official layout."""
    cb_coeff, retain_coeff = losses.coefficients(step, cfg.steps, cfg.loss_alpha)
    retain = dict(input_ids=batch.retain_tokens, attention_mask=batch.retain_mask, output_hidden_states=True)
    cb = dict(input_ids=batch.cb_tokens, attention_mask=batch.cb_mask, output_hidden_states=True)
    layers = list(cfg.target_layers)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            orig_retain = torch.stack(model(**retain).hidden_states).detach()  # (S, B, T, D)
            retain_mask = batch.retain_mask.repeat(len(orig_retain), 1, 1).unsqueeze(-1)  # (S, B, T, 1)
            orig_retain *= retain_mask
            cb_states = model(**cb).hidden_states
            orig_cb = torch.stack([cb_states[l].detach() for l in layers])  # (L, B, T, D)
    model.train()
    new_retain = torch.stack(model(**retain).hidden_states) * retain_mask  # (S, B, T, D)
    retain_loss = torch.norm(new_retain - orig_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    cb_states = model(**cb).hidden_states
    new_cb = torch.stack([cb_states[l] for l in layers])  # (L, B, T, D)
    cb_mask = batch.cb_mask.repeat(len(layers), 1, 1).unsqueeze(-1)  # (L, B, T, 1)
    new_unit = new_cb / torch.norm(new_cb, dim=-1, keepdim=True, dtype=torch.float)
    orig_unit = orig_cb / torch.norm(orig_cb, dim=-1, keepdim=True, dtype=torch.float)
    cb_loss = torch.relu(((new_unit * orig_unit) * cb_mask).sum(dim=-1)).sum() / cb_mask.sum()
    return retain_coeff * retain_loss + cb_coeff * cb_loss
