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

Two more things may train next to A and B, and are saved with them in the adapter:
  - the embedding rows of a few token ids (train_rows: the chat tokens, which a base model never saw
    as input; frozen, <|end|> could never be learned, and the reply never stop), the rest frozen;
  - whole small modules (modules_to_save: the score head of a reward or value model).

Nothing here knows about a stage: sft.py, reward.py, ppo.py and dpo.py all use the same functions.
Module names to target are suffixes of model.py's names: "attn.qkv" (q, k and v, fused as in GPT-2's
c_attn: one A and B for the three), "attn.proj" (o), "mlp.fc", "mlp.proj".
"""

import contextlib
import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class TrainableRows(nn.Module):
    """A frozen token embedding (or output layer) whose rows for a few token ids train.

    The rows live in their own small parameter, so the optimizer keeps moments for k rows, not V.
    With tied embeddings the lm_head wrapper shares the embedding wrapper's rows.
    """

    def __init__(self, base, row_ids, rows=None):
        super().__init__()
        self.base = base  # nn.Embedding (V, C) or nn.Linear(C, V), frozen
        self.register_buffer("row_ids", torch.tensor(row_ids, dtype=torch.long, device=base.weight.device))
        self.rows = rows if rows is not None else nn.Parameter(base.weight[self.row_ids].detach().clone())
        self.enabled = True  # False: the base rows (the reference model of DPO and PPO)

    @property
    def weight(self):
        return self.base.weight

    def full_weight(self):
        if not self.enabled:
            return self.base.weight
        return self.base.weight.index_put((self.row_ids,), self.rows.to(self.base.weight.dtype))  # (V, C), a copy

    def forward(self, x):
        if isinstance(self.base, nn.Embedding):
            return F.embedding(x, self.full_weight())    # (B, T) -> (B, T, C)
        return F.linear(x, self.full_weight())           # (B, T, C) -> (B, T, V)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS, train_rows=(), modules_to_save=()):
    """Wrap every nn.Linear whose name ends with one of targets in a LoRALinear, and freeze all
    parameters except the new A and B matrices, the embedding rows of the token ids in train_rows,
    and the modules named in modules_to_save (e.g. "score_head"). Returns the model (changed in place)."""
    for p in model.parameters():
        p.requires_grad_(False)
    owners = {}  # weight -> modules holding it: a tied weight has two
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            owners.setdefault(id(module.weight), []).append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = [t for t in targets if not any(n.endswith(t) for n in linears)]
    if unknown:  # a misspelt target would silently train less than asked
        names = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in linears})
        raise ValueError(f"LoRA targets {unknown} match no linear layer; this model's are {names}")
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and full.endswith(tuple(targets)):
                if len(owners[id(child.weight)]) > 1:
                    # merging B A into a shared matrix would change the other module too (lm_head's
                    # weight is the token embedding: every input embedding would move)
                    raise ValueError(f"LoRA target {full}: its weight is shared with "
                                     f"{[n for n in owners[id(child.weight)] if n != full]} (tied embeddings); "
                                     f"leave {full} out of the targets")
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"no nn.Linear matches the LoRA targets {targets}")
    if train_rows:
        tied = model.lm_head.weight is model.tok_emb.weight
        model.tok_emb = TrainableRows(model.tok_emb, list(train_rows))
        model.lm_head = TrainableRows(model.lm_head, list(train_rows), model.tok_emb.rows if tied else None)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    model.lora_extras = {"train_rows": list(train_rows), "modules_to_save": list(modules_to_save)}
    return model


def merge_lora(model):
    """Fold every adapter (and trained row) into its base weight and put the plain modules back: the
    result is an ordinary model (same state_dict keys as before apply_lora), exportable like any other."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.base)
            elif isinstance(child, TrainableRows):
                with torch.no_grad():
                    child.base.weight[child.row_ids] = child.rows.to(child.base.weight.dtype)
                setattr(module, child_name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextlib.contextmanager
def lora_disabled(model):
    """Inside this block the model computes as its frozen base: the reference policy π_ref of DPO
    and PPO comes for free, without a second copy of the weights. Raises if there is nothing to
    disable (no adapters, or merged ones): the policy would silently serve as its own reference."""
    layers = [m for m in lora_layers(model) if not m.merged]
    if not layers:
        raise ValueError("lora_disabled: the model has no active LoRA adapters (none applied, or merged), "
                         "so the base model is not available as a reference")
    layers += [m for m in model.modules() if isinstance(m, TrainableRows)]
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
    """What trains, and only that: A and B, trained rows, saved modules. A few hundred kB where the
    model is hundreds of MB."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}


def lora_config(model):
    """Everything apply_lora needs to rebuild the adapters of model: r, alpha, dropout, targets,
    train_rows, modules_to_save."""
    layers = lora_layers(model)
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in names})
    return {"r": layers[0].r, "alpha": layers[0].alpha, "dropout": layers[0].dropout.p, "targets": suffixes,
            **getattr(model, "lora_extras", {})}


def base_fingerprint(model):
    """sha256 of the base weights, taken before the stage changed anything: an adapter records it and
    refuses another base model."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def adapter_checkpoint(model, base, fingerprint, **extra):
    """The adapter file's contents: what trains, how to rebuild it, and which base it belongs on
    (base: the path it was loaded from; fingerprint: base_fingerprint of that base, unchanged)."""
    return dict(lora=lora_state_dict(model), lora_config=lora_config(model), base=base,
                base_fingerprint=fingerprint, **extra)


def prepare_to_train(model, args, resume=None, add=None, train_rows=(), modules_to_save=(), dropout=None):
    """Every fine-tuning stage's set-up of what trains, in the one order that keeps an adapter loadable:

      1. fingerprint the base as loaded (LoRA runs), before anything changes it;
      2. a LoRA run that resumes puts its adapter back on that base (load_lora redoes step 3 from the
         adapter's own record: the larger vocabulary, the score head);
      3. otherwise the stage's additions, add(model) (room for chat tokens, a score head), then LoRA's
         adapters if args.lora_r, else (full fine-tuning) the resumed run's weights.

    args: the stage's flags lora_r, lora_alpha, lora_dropout (dropout, if given, overrides it) and
    lora_targets; resume: the checkpoint dict of the run being resumed, or None. Returns the
    fingerprint (None without LoRA), which the stage's checkpoints record. Raises ValueError (an adapter
    whose base changed, targets that match nothing) for the stage to report in one line."""
    fingerprint = base_fingerprint(model) if args.lora_r else None
    if args.lora_r and resume:
        load_lora(model, resume["adapter"])
        return fingerprint
    if add is not None:
        add(model)
    if args.lora_r:
        apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout if dropout is None else dropout,
                   args.lora_targets, train_rows, modules_to_save)
    elif resume:
        model.load_state_dict(resume["model"])
    return fingerprint


def load_lora(model, adapter):
    """Put an adapter (adapter_checkpoint's dict) onto the base model it was trained on, as loaded.

    The base is checked against the fingerprint first, then given what the stage added before its
    adapters (adapter["model_config"]: a larger vocabulary, a score head), then the adapters.
    """
    cfg = adapter["lora_config"]
    if base_fingerprint(model) != adapter["base_fingerprint"]:
        raise ValueError("this adapter was trained on different base weights (fingerprint mismatch): the base "
                         "changed since; an adapter (and --resume) needs the exact base it was trained on")
    shape = adapter.get("model_config", {})
    model.resize_vocab(shape.get("vocab_size", model.config.vocab_size))
    if shape.get("score_head") and model.score_head is None:
        model.add_score_head()
    apply_lora(model, cfg["r"], cfg["alpha"], cfg["dropout"], cfg["targets"], cfg.get("train_rows", ()),
               cfg.get("modules_to_save", ()))
    missing = set(lora_state_dict(model)) - set(adapter["lora"])
    if missing:
        raise ValueError(f"adapter lacks {sorted(missing)[:3]}...")
    model.load_state_dict(adapter["lora"], strict=False)
    return model
