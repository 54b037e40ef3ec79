"""LoRA for model.py's Transformer: the layer, adding it to a model, switching it off, merging it.

A LoRA layer adds a trainable low-rank update to a frozen linear layer (Hu et al. 2021):

    y = W x + (alpha / r) * B (A dropout(x))        W (out, in) frozen, A (r, in), B (out, r)

A starts kaiming-uniform and B at zero, so B A = 0 and training starts exactly at the base model
(`b_std` > 0 starts B as small noise instead: losses.py says why one might).
Merging folds the update into the weight, W' = W + (alpha / r) * B A, and removes the LoRA layer.

Two design choices make circuit-breaker training simple:
  - `LoRALinear` keeps the wrapped layer's `weight` under the same name, so the model's checkpoint keys
    do not change and the adapter's keys are PEFT's with the prefix "base_model.model." dropped;
  - a `disabled` flag switches the update off, so the frozen reference states come from the same
    weights (`with lora_disabled(model): ...`) instead of from a second copy of an 8B model.
A and B are fp32 whatever the base weights are: with bf16 base weights the small updates of a
learning rate of 1e-4 would round away. Under autocast the update's matmuls run in bf16 on them.

Projections that read the same input (q, k, v; gate, up) do their LoRA work together
(`LoRALinear.project_together`, called by model.py): one dropout of the input, one matmul with their A
matrices stacked. The weights stay one module per projection, so the adapter files stay PEFT's.

Adapters are saved and loaded in PEFT's on-disk format by hf.py, which also exports the merged model.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # the block submodule holding each


# ----------------------------------------------------------------------------------------------------
# The layer


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, switched off by `disabled`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, b_std: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # same name as in nn.Linear: checkpoint keys stay HF's
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default: U(+-1/sqrt(in))
        if b_std:
            nn.init.normal_(self.lora_B.weight, std=b_std)  # a small step off the base model
        else:
            nn.init.zeros_(self.lora_B.weight)  # B A = 0: training starts at the base model
        self.lora_dropout = nn.Dropout(dropout)
        self.disabled = False

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(self.lora_input(x))))
        return y + (self.scale * update).to(y.dtype)

    def lora_input(self, x):
        """Outside autocast the update runs in fp32 (A and B's dtype). Under autocast it runs in autocast's
        dtype, which casts A and B (the fp32 master weights) for the matmuls: x is left in its own dtype,
        so no fp32 copy of the activations is made just to be cast back."""
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)

    @staticmethod
    def project_together(x, layers) -> list:
        """Each layer's output on the same input x (q, k, v; or gate, up), their LoRA work fused: x is
        dropped out once, one matmul applies all their A's stacked, then each its own B. Fewer, bigger
        kernels; the same result as one layer at a time, except that the layers share one dropout mask
        (PEFT draws one per layer). Layers that differ (no LoRA on one, another rank) run one at a time."""
        first = layers[0]
        alike = all(isinstance(m, LoRALinear) and (m.disabled, m.r, m.lora_dropout.p, m.training) ==
                    (first.disabled, first.r, first.lora_dropout.p, first.training) for m in layers)
        if not alike:
            return [m(x) for m in layers]
        ys = [F.linear(x, m.weight, m.bias) for m in layers]  # (..., out_i)
        if first.disabled:
            return ys
        A = torch.cat([m.lora_A.weight for m in layers])  # (n r, in)
        a = F.linear(first.lora_dropout(first.lora_input(x)), A)  # (..., n r)
        return [y + (m.scale * m.lora_B(a_m)).to(y.dtype) for y, m, a_m in zip(ys, layers, a.split(first.r, -1))]

    def delta(self) -> torch.Tensor:
        """(alpha / r) * B A, the change the adapter makes to the weight: (out, in) fp32."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


# ----------------------------------------------------------------------------------------------------
# Adding, switching off and merging


def apply_lora(model, r=16, alpha=16, dropout=0.05, targets=TARGETS, layers=range(0, 21), b_std=0.0):
    """Freeze the whole model and wrap `targets` of blocks `layers` in LoRALinear. Returns the model.

    The official recipe: r 16, alpha 16, dropout 0.05, all seven projections of blocks 0-20 (for target
    layers 10 and 20). Only the LoRA A and B matrices are left trainable.
    """
    layers, n_blocks = sorted(set(layers)), len(model.model.layers)
    unknown = [t for t in targets if t not in PARENT]
    if unknown:
        raise ValueError(f"apply_lora: unknown target module {unknown[0]!r}; expected some of {list(TARGETS)}")
    outside = [i for i in layers if not 0 <= i < n_blocks]
    if outside:
        raise ValueError(f"apply_lora: layer {outside[0]} asked for, but the model has {n_blocks} blocks loaded")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for i in layers:
        block = model.model.layers[i]
        for name in targets:
            parent = getattr(block, PARENT[name])
            layer = LoRALinear(getattr(parent, name), r, alpha, dropout, b_std)
            layer.train(model.training)  # a new module starts in training mode: follow the model's
            setattr(parent, name, layer)
    return model


def lora_modules(model) -> dict[str, LoRALinear]:
    """{module name, e.g. 'model.layers.3.mlp.up_proj': its LoRALinear}, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def lora_disabled(model):
    """Run the base model: every LoRA update off inside the block, restored after (even on error)."""
    modules = list(lora_modules(model).values())
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.disabled = flag


@torch.no_grad()
def merge_lora(model):
    """Fold every update into its weight (W + (alpha / r) B A, summed in fp32, stored in W's dtype) and
    put plain nn.Linear layers back, so the state dict is the base model's. Returns the model."""
    for name, m in lora_modules(model).items():
        merged = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device=m.weight.device, dtype=m.weight.dtype)
        merged.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
        if m.bias is not None:
            merged.bias.copy_(m.bias)
        merged.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    return model
