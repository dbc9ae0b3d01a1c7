"""
LoRA: low-rank adaptation of a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

The guide's lightweight alternative to full fine-tuning. A pretrained weight W (d_out × d_in) stays
frozen; the update is learned as the product of two small matrices (Eq. 3 of the paper):

    h = W x + ΔW x = W x + (α / r) · B A x,     A: r × d_in,  B: d_out × r,  r ≪ min(d_in, d_out)

A starts random and B at zero, so at step 0 the wrapped model computes exactly what the base did.
Only A and B are trained: for a C × C matrix that is 2·r·C numbers instead of C², and the optimizer's
two moment buffers shrink by the same ratio. After training, merge() folds (α/r)·B A into W and the
adapter costs nothing at inference.

Nothing here knows about a stage: sft.py, reward.py, ppo.py and dpo.py all use the same functions.
Module names to target are suffixes of model.py's names: "attn.qkv" (q, k and v, fused as in GPT-2's
c_attn: one A and B for the three), "attn.proj" (o), "mlp.fc", "mlp.proj".
"""

import contextlib
import hashlib
import math

import torch
import torch.nn as nn

DEFAULT_TARGETS = ("attn.qkv", "attn.proj")  # the paper adapts the attention projections (§7.1)


class LoRALinear(nn.Module):
    """nn.Linear with a frozen weight plus a trainable low-rank update (α/r)·B A."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as the reference code does
        self.dropout = nn.Dropout(dropout)
        self.enabled = True   # False: behave as the base layer (the reference model in DPO and PPO)
        self.merged = False   # True: the update is already inside base.weight

    def forward(self, x):
        y = self.base(x)                                              # W x (+ b)
        if self.enabled and not self.merged:
            y = y + self.dropout(x) @ self.lora_A.t() @ self.lora_B.t() * self.scaling  # (α/r)·B A x
        return y

    @torch.no_grad()
    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling             # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS):
    """Wrap every nn.Linear whose name ends with one of targets in a LoRALinear, and freeze all
    parameters except the new A and B matrices. Returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(tuple(targets)):
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"no nn.Linear matches the LoRA targets {targets}")
    return model


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back: the result is an
    ordinary model (same state_dict keys as before apply_lora), exportable like any other."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Inside this block the model computes as its frozen base: the reference policy π_ref of DPO
    and PPO comes for free, without a second copy of the weights."""
    layers = [m for m in lora_layers(model) if not m.merged]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


# -----------------------------------------------------------------------------
# Adapter-only checkpoints


def lora_state_dict(model):
    """Only the A and B matrices: a few hundred kB where the model is hundreds of MB."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


def lora_config(model):
    """r, alpha, dropout and targets of the adapters in model, to rebuild them with apply_lora."""
    layers = lora_layers(model)
    names = [n.removesuffix(".base") for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in names})
    return {"r": layers[0].r, "alpha": layers[0].alpha, "dropout": layers[0].dropout.p, "targets": suffixes}


def base_fingerprint(model):
    """sha256 of the frozen base weights: an adapter records it and refuses another base model."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.endswith(("lora_A", "lora_B")):
            h.update(name.replace(".base.", ".").encode())  # same names wrapped or not
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_lora(model, adapter):
    """Put an adapter checkpoint ({"lora", "lora_config", "base_fingerprint", ...}) onto its base model."""
    cfg = adapter["lora_config"]
    if base_fingerprint(model) != adapter["base_fingerprint"]:
        raise ValueError("this adapter was trained on different base weights (fingerprint mismatch)")
    apply_lora(model, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"])
    missing = set(lora_state_dict(model)) - set(adapter["lora"])
    if missing:
        raise ValueError(f"adapter lacks {sorted(missing)[:3]}...")
    model.load_state_dict(adapter["lora"], strict=False)
    return model
