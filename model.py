"""
One hand-written Transformer decoder, shared by every stage of the pipeline.

The guide's pretraining section in code: a causal language model reads tokens x_1..x_t and
predicts x_{t+1}; training minimises the cross-entropy of that prediction. Everything a stage
script needs from the network lives here: the model, its loss, generation with a KV cache,
Hugging Face import/export, checkpoint I/O, the optimizer, and device/precision/DDP set-up.

Two families run through the same code, picked by GPTConfig fields (see FAMILIES):
  gpt2    learned position embeddings, LayerNorm, GELU MLP, biases       (Radford et al. 2019)
  modern  rotary position embeddings, RMSNorm, SwiGLU MLP, no biases,    (Llama: Touvron et al. 2023)
          optional grouped-query attention (n_kv_head < n_head)
Later decoders are the modern family with a few switches on, each a GPTConfig field that one Block
reads (see HF_ARCHITECTURES): q/k norms (Qwen3), a sliding attention window (Mistral), soft-capped
scores, sandwich norms and scaled embeddings (Gemma 2), per-layer RoPE bases (Gemma 3).

Shape letters used in comments throughout the repository:
  B batch, T sequence length, C width (n_embd), H heads, D head size (C = H*D),
  Hkv key/value heads, V vocabulary size; Tp and Tr when prompt and response are split.

Contents (section: lines). The network first, then loading and saving it, then what training loops need:
  config: 55-160               IGNORE_INDEX, FAMILIES, HF_ARCHITECTURES, GPTConfig
  building blocks: 163-405     norms, RoPE, KVCache, attention_mask, CausalSelfAttention, MLP, Block
  the model: 408-690           GPT: forward, hidden states, the reward/value head, generation
  losses and sampling: 693-765 token_logprobs, cross_entropy, entropy_from_logits, masked_mean,
                               masked_whiten, last_token, sample_next
  checkpoints: 768-956         atomic_write, claim_out_dir, save_checkpoint, load_resume, load_checkpoint, load_model
  Hugging Face: 959-1279       from_pretrained and save_pretrained, config.json, the name table
  training runtime: 1282-1598  get_lr, GracefulStop, RNG state, configure_optimizer, optimizer_step, training
                               state, argparse types, Runtime, setup_runtime, data_parallel, peak_flops
"""

import contextlib
import copy
import ctypes
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import lora


# -----------------------------------------------------------------------------
# Config: the loss's ignore index, the two families, the Hugging Face switches, GPTConfig

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (PyTorch's cross_entropy default)

# What changed between GPT-2 and today's decoders, as config fields.
FAMILIES = {
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    "modern": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False),
}

# Hugging Face decoders are the modern family with some switches (GPTConfig fields) on. from_pretrained reads
# each one's value from config.json; save_pretrained writes a model back as the first row that holds exactly
# its switches (the row it was loaded from first). GPT-2 is the gpt2 family with no switch on.
GEMMA = ("geglu", "norm_plus_one", "sandwich_norm", "embed_scale", "query_pre_attn_scalar")
HF_ARCHITECTURES = {
    # model_type: (class,               switches always on,   switches config.json may turn on)
    "llama":       ("LlamaForCausalLM",   (),                   ("rope_llama3",)),
    "qwen2":       ("Qwen2ForCausalLM",   ("qkv_bias",),        ()),
    "qwen3":       ("Qwen3ForCausalLM",   ("qk_norm",),         ()),
    "mistral":     ("MistralForCausalLM", (),                   ("sliding_window",)),
    "phi3":        ("Phi3ForCausalLM",    (),                   ("sliding_window",)),  # q|k|v, gate|up fused on disk
    "gemma2":      ("Gemma2ForCausalLM",  GEMMA,                ("sliding_window", "global_every", "attn_softcap",
                                                                 "final_softcap")),
    "gemma3_text": ("Gemma3ForCausalLM",  GEMMA + ("qk_norm",), ("sliding_window", "global_every", "final_softcap",
                                                                 "rope_local_theta", "rope_linear")),
}


@dataclass
class GPTConfig:
    """Shape and family of the decoder; stored in every checkpoint as asdict(config)."""
    block_size: int = 256     # longest sequence the model sees (learned position table size)
    vocab_size: int = 50304   # GPT-2's 50,257 tokens padded to a multiple of 64: faster matmuls,
                              # and ids 50257.. are free for special tokens added later (chat roles)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0        # key/value heads for grouped-query attention; 0 = same as n_head
    n_embd: int = 128
    dropout: float = 0.0      # 0 for pretraining small models on small data works fine and is faster
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope" (rotary, Su et al. 2021)
    norm: str = "layernorm"   # "layernorm" or "rmsnorm"
    mlp: str = "gelu"         # "gelu" (4C hidden), "swiglu" (~8C/3 hidden, same parameter count) or "geglu"
                              # (SwiGLU with GELU for Swish, Gemma; Shazeer 2020)
    bias: bool = True         # biases in Linear and norm layers (GPT-2 has them, Llama does not)
    tie_embeddings: bool = True  # lm_head shares the token-embedding matrix (GPT-2 does)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attn_impl: str = "sdpa"   # "sdpa" (fused torch kernel) or "manual" (the maths written out)
    score_head: bool = False  # also a linear head from the last hidden state to one number: a reward
                              # model's score or PPO's value (see GPT.scores); lm_head stays as it is
    head_dim: int = 0         # size of one attention head; 0 = n_embd // n_head (Qwen and Llama 3 may differ)
    intermediate_size: int = 0  # the MLP's hidden width; 0 = 4C (gelu) or ~8C/3 rounded to 64 (swiglu, geglu)
    qkv_bias: bool = False    # biases on the q, k and v projections only (Qwen2), whatever `bias` says
    rope_llama3: tuple = ()   # Llama 3.1's rope scaling: (factor, low_freq_factor, high_freq_factor,
                              # original_max_position_embeddings); () = none
    qk_norm: bool = False     # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3): bounded scores
    sliding_window: int = 0   # a query sees only the keys less than this many positions back, itself
                              # included (Mistral; Gemma's local layers); 0 = all earlier keys
    global_every: int = 0     # with a window: layers n-1, 2n-1, ... see every earlier key, the others slide
                              # (Gemma 2: 2, Gemma 3: 6); 0 = every layer slides
    rope_local_theta: float = 0.0  # RoPE base of the sliding layers, unscaled (Gemma 3: 10,000 while the
                                   # global layers use rope_theta 1,000,000); 0 = every layer uses rope_theta
    rope_linear: float = 1.0  # linear RoPE scaling: positions divided by this (Gemma 3 4B+: 8); 1 = none
    query_pre_attn_scalar: float = 0.0  # scores are q·k/√this (Gemma); 0 = q·k/√D as in Vaswani et al.
    attn_softcap: float = 0.0   # scores s squashed to cap·tanh(s/cap) before the softmax (Gemma 2: 50); 0 = off
    final_softcap: float = 0.0  # the same on the output logits (Gemma 2: 30); 0 = off
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), w starting at 0, in fp32 (Gemma)
    sandwich_norm: bool = False  # each sublayer's output normalised too before the residual add, four norms
                                 # per block (Gemma 2, 3)
    embed_scale: bool = False  # token embeddings multiplied by √C (Gemma)
    hf_model_type: str = ""   # the Hugging Face model_type this was loaded from, which save_pretrained writes
                              # back; "" = the first row of HF_ARCHITECTURES that fits
    special_ids: dict = field(default_factory=dict)  # bos/eos/pad_token_id of the source config.json, for export

    def __post_init__(self):
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        # errors, not asserts: `python -O` drops asserts, and these guard what a user types
        if self.n_embd % self.n_head and not self.head_dim:
            raise ValueError(f"n_embd {self.n_embd} must be divisible by n_head {self.n_head}")
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings rotate pairs: the head size {self.head_dim} must be even")
        if self.global_every and not self.sliding_window:
            raise ValueError(f"global_every {self.global_every} needs a sliding_window for the other layers")

    def slides(self, layer_idx):
        """True when layer layer_idx attends only within the sliding window."""
        return bool(self.sliding_window) and not (self.global_every and (layer_idx + 1) % self.global_every == 0)

    def switches(self):
        """The names of HF_ARCHITECTURES' switches this config turns on."""
        on = {name for name in ("qkv_bias", "qk_norm", "sliding_window", "global_every", "rope_local_theta",
                                "query_pre_attn_scalar", "attn_softcap", "final_softcap", "norm_plus_one",
                                "sandwich_norm", "embed_scale", "rope_llama3") if getattr(self, name)}
        on |= {"rope_linear"} if self.rope_linear != 1 else set()
        return on | ({"geglu"} if self.mlp == "geglu" else set())

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's asdict(config), ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# -----------------------------------------------------------------------------
# Building blocks


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, over the last dimension (Ba et al. 2016)."""

    def __init__(self, dim, eps, bias):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        xf = x.float()  # statistics in fp32 even under autocast: squares of bf16 lose digits
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as nn.LayerNorm
        y = ((xf - mean) * torch.rsqrt(var + self.eps)).type_as(x) * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring (Zhang & Sennrich 2019).

    plus_one (Gemma): y = x / sqrt(mean(x^2) + eps) * (1 + weight), weight starting at 0, the product taken
    in fp32 and rounded once at the end, as Gemma's reference code does (Llama rounds before the product).
    """

    def __init__(self, dim, eps, bias=False, plus_one=False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + self.weight.float())).type_as(x)
        return y.type_as(x) * self.weight


def norm_layer(config, dim=None):
    """The config's norm over dim features (default C): LayerNorm, or RMSNorm ((1 + w) scaling for Gemma)."""
    if config.norm == "layernorm":
        return LayerNorm(dim or config.n_embd, config.norm_eps, config.bias)
    return RMSNorm(dim or config.n_embd, config.norm_eps, plus_one=config.norm_plus_one)


def rope_tables(pos, D, theta, device=None, llama3=(), linear=1.0):
    """cos and sin of position * frequency for rotary embeddings, each (*pos.shape, D/2), in fp32.

    pos: a tensor of position ids, or an int T for positions 0..T-1. The model computes them for the
    positions it runs, so no table fixes the longest context. linear: positions divided by this factor
    (linear scaling; Gemma 3's global layers). llama3 = (factor, low, high, original context L): Llama
    3.1's long-context scaling. Frequencies whose wavelength 2π/f is longer than L/low are divided by
    factor, those shorter than L/high kept, and the ones between blended linearly in L/wavelength (Meta's
    reference code, as transformers has it).
    """
    if isinstance(pos, int):
        pos = torch.arange(pos, device=device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=pos.device).float() / D))  # (D/2,)
    if llama3:
        factor, low, high, L = llama3
        wavelen = 2 * math.pi / inv_freq
        smooth = ((L / wavelen - low) / (high - low)).clamp(0, 1)  # 0 for long wavelengths, 1 for short ones
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    angles = pos.float().unsqueeze(-1) * (inv_freq / linear)  # (*pos.shape, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) of x by its position's angle (Su et al. 2021, Eq. 34).

    The dot product q·k of two rotated vectors then depends only on their distance, which is how
    RoPE encodes position. Pairs are the two halves of the head (GPT-NeoX / HF Llama layout).
    x: (B, H, T, D); cos, sin: (T, D/2).
    """
    x1, x2 = x.float().chunk(2, dim=-1)                                # (B, H, T, D/2) each
    y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, D)
    return y.type_as(x)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so decoding feeds one token per step.

    It holds `length` positions, GPT.stream asking for what one call feeds (the prompt and the new tokens),
    and grows when fed more. Each slot costs a 64-row batch of SmolLM2-135M (30 layers, 3 key/value heads of
    64) 2.9 MB in fp32: block_size slots (2,048 under the old cap, 8,192 in full) would take 5.6 (22.5) GiB
    to generate 24 tokens that need about 90 slots, 0.24 GiB.
    """

    def __init__(self, config, batch_size, device, dtype, length=0):
        shape = (batch_size, config.n_kv_head, length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0        # number of positions filled; advanced by GPT.hidden_states after all layers ran
        self.real = None    # (B, length) bool, True on real tokens; kept once a padded prompt came in

    def make_room(self, n):
        """Grow every layer's slots to hold n positions (at least doubling, so growing step by step is cheap)."""
        have = self.k[0].size(2)
        if n <= have:
            return
        more = max(n, 2 * have) - have
        self.k = [F.pad(t, (0, 0, 0, more)) for t in self.k]  # (B, Hkv, have, D) -> (B, Hkv, have + more, D)
        self.v = [F.pad(t, (0, 0, 0, more)) for t in self.v]
        if self.real is not None:
            self.real = torch.cat([self.real, self.real.new_ones(self.real.size(0), more)], dim=1)


def attention_mask(start, key_pos, key_real=None, window=0):
    """Which keys each query may attend to: (T, Tk) or (B, 1, T, Tk) bool, True = may attend; or None for plain
    causal attention from slot 0 or a decode step, which the fused kernels do without a mask.

    The T queries are the last keys (cache slots start..Tk-1). A query sees keys at its slot or before
    (causal); only real ones (key_real (B, Tk), for left padding); and with a window only those less than
    `window` positions back, counted in key_pos ((Tk,) or (B, Tk) position ids over real tokens), so that a
    padded row sees what it sees alone. A padded query may attend to itself (see GPT.positions_and_masks).
    """
    Tk = key_pos.size(-1)
    if key_real is None and (not window or Tk <= window) and (start == 0 or Tk - start == 1):
        return None
    slots = torch.arange(Tk, device=key_pos.device)
    mask = slots[None, :] <= slots[start:, None]                                       # (T, Tk) causal
    if window:  # the band: key position > query position - window (transformers' sliding_window_overlay)
        mask = mask & (key_pos[..., None, :] > key_pos[..., start:, None] - window)   # (T, Tk) or (B, T, Tk)
    if key_real is None:
        return mask
    is_self = slots[None, :] == slots[start:, None]                                    # (T, Tk)
    return ((mask & key_real[:, None, :]) | is_self).unsqueeze(1)                     # (B, T, Tk) -> (B, 1, T, Tk)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(q·kᵀ/√D + mask)·v (Vaswani et al. 2017, Eq. 1).

    Switches (GPTConfig): q and k RMS-normalised per head before RoPE (qk_norm), another scale than 1/√D
    (query_pre_attn_scalar), scores soft-capped to ±cap (attn_softcap); a sliding window is part of the mask.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.head_dim
        self.attn_impl = config.attn_impl
        # q, k and v in one matmul: (H + 2*Hkv) * D outputs; with Hkv == H that is GPT-2's c_attn
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.head_dim,
                             bias=config.bias or config.qkv_bias)
        self.proj = nn.Linear(config.n_head * self.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)
        self.q_norm = norm_layer(config, self.head_dim) if config.qk_norm else None
        self.k_norm = norm_layer(config, self.head_dim) if config.qk_norm else None
        self.scale = 1.0 / math.sqrt(config.query_pre_attn_scalar or self.head_dim)
        self.softcap = config.attn_softcap

    def forward(self, x, rope=None, cache=None, mask=None):
        """x (B, T, C); rope: (cos, sin) for these T positions; mask: (T, Tk) or (B, 1, T, Tk) bool, True = may
        attend, or None for plain causal attention (see GPT.positions_and_masks, which builds both)."""
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        pos = cache.pos if cache is not None else 0  # cache slot of x's first token
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)      # (B, T, H*D) -> (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)    # (B, T, Hkv*D) -> (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)    # (B, T, Hkv*D) -> (B, Hkv, T, D)
        if self.q_norm is not None:  # |q|, |k| ≈ √D per head whatever the weights: no runaway scores
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:  # append this step's keys/values, then attend over all of them
            cache.k[self.layer_idx][:, :, pos:pos + T] = k
            cache.v[self.layer_idx][:, :, pos:pos + T] = v
            k = cache.k[self.layer_idx][:, :, :pos + T]  # (B, Hkv, pos+T, D)
            v = cache.v[self.layer_idx][:, :, :pos + T]
        if Hkv != H:  # grouped-query attention: each k/v head serves H/Hkv query heads
            k = k.repeat_interleave(H // Hkv, dim=1)     # (B, Hkv, Tk, D) -> (B, H, Tk, D)
            v = v.repeat_interleave(H // Hkv, dim=1)
        p_drop = self.dropout if self.training else 0.0
        if self.attn_impl == "sdpa" and not self.softcap:  # no fused kernel caps the scores
            # the fused kernel computes the same thing as the manual branch without materialising the
            # (T, Tk) scores. No mask: causal from position 0 (is_causal), or one new token that may see
            # every cached key (decoding), which keeps the fastest kernels usable
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop,
                                               is_causal=mask is None and pos == 0, scale=self.scale)
        else:
            if mask is None:  # query i sits at cache slot pos+i and may look at keys 0..pos+i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)  # (T, Tk)
            # scale q before the product, not the scores after: fp16 q·kᵀ can overflow (max 65,504) first
            att = (q * self.scale) @ k.transpose(-2, -1)          # (B, H, T, D) @ (B, H, D, Tk) -> (B, H, T, Tk)
            if self.softcap:  # Gemma 2: smooth clipping to ±cap keeps one score from taking the whole softmax
                att = self.softcap * torch.tanh(att / self.softcap)
            att = att.masked_fill(~mask, float("-inf"))           # no looking at future tokens or padding
            att = F.softmax(att.float(), dim=-1).type_as(q)       # each row sums to 1
            att = F.dropout(att, p_drop, self.training)
            y = att @ v                                           # (B, H, T, Tk) @ (B, H, Tk, D) -> (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, H*D): heads side by side
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2), SwiGLU or GeGLU (Shazeer 2020, Eqs. 5-6)."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        C = config.n_embd
        if self.kind == "gelu":
            hidden = config.intermediate_size or 4 * C
            self.fc = nn.Linear(C, hidden, bias=config.bias)
        else:
            # a gated MLP has three matrices; 2/3 of 4C keeps the parameter count of the GELU MLP
            hidden = config.intermediate_size or 64 * math.ceil(8 * C / 3 / 64)
            self.fc = nn.Linear(C, 2 * hidden, bias=config.bias)  # gate and up projections, fused
        self.proj = nn.Linear(hidden, C, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "gelu":
            h = F.gelu(self.fc(x), approximate="tanh")  # GPT-2 used the tanh approximation of GELU
        else:
            gate, up = self.fc(x).chunk(2, dim=-1)
            act = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")
            h = act * up                                # Swish(xW) ⊙ xV, or GELU(xW) ⊙ xV
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With sandwich_norm (Gemma 2, 3)
    each sublayer's output is normalised too before it joins the residual: x + norm(attn(norm(x)))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln2 = norm_layer(config)
        self.mlp = MLP(config)
        self.ln1_post = norm_layer(config) if config.sandwich_norm else nn.Identity()
        self.ln2_post = norm_layer(config) if config.sandwich_norm else nn.Identity()

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.ln1_post(self.attn(self.ln1(x), rope, cache, mask))
        return x + self.ln2_post(self.mlp(self.ln2(x)))


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Decoder-only Transformer language model: tokens in, next-token logits (and loss) out."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.score_head = nn.Linear(config.n_embd, 1) if config.score_head else None
        self.init_weights()  # no buffers: RoPE angles and masks are computed for the positions each call runs

    def init_weights(self):
        """Initialise every tensor, as GPT-2 did.

        - Linear and embedding weights ~ N(0, 0.02); biases 0; norm weights 1 (0 with norm_plus_one,
          which scales by 1 + w).
        - The two projections that write into the residual stream (attn.proj, mlp.proj) get
          std 0.02/√(2·n_layer), so the residual's variance does not grow with depth (GPT-2 paper, §2.3).
        - The score head gets std 1/√(C+1), so a fresh reward or value model starts with scores of
          about unit scale (Stiennon et al. 2020's reward head; Huang et al. 2024, detail 12).
        """
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm weights
                nn.init.zeros_(p) if self.config.norm_plus_one else nn.init.ones_(p)
            elif name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name == "score_head.weight":
                nn.init.normal_(p, std=1 / math.sqrt(self.config.n_embd + 1))
            else:
                nn.init.normal_(p, std=0.02)

    def add_score_head(self):
        """Give a language model (an SFT checkpoint, say) the scalar head of a reward or value model."""
        w = self.tok_emb.weight
        self.config.score_head = True
        self.score_head = nn.Linear(self.config.n_embd, 1, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(self.config.n_embd + 1))
        nn.init.zeros_(self.score_head.bias)
        return self

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the position table (it costs no matmul FLOPs)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() lists a tied matrix once
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the matmuls forward+backward, plus 12·L·C·T for attention
        scores and weighted values (PaLM paper, Appendix B). Used for MFU."""
        T = T or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    @torch.no_grad()
    def resize_vocab(self, vocab_size):
        """Grow the token embedding (and lm_head) to vocab_size rows, e.g. to give a Hugging Face GPT-2
        (50,257 rows) room for chat tokens.

        New rows are drawn from N(μ, 10⁻⁵·Σ), μ and Σ the mean and covariance of the existing rows
        (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"): each new token
        starts close to an average token, so its logit does not swamp the others, yet every new row
        differs, so <|user|> and <|end|> are told apart from step 0. The noise has a fixed seed: the
        same base always grows the same rows (a LoRA adapter's base fingerprint depends on it).
        """
        if vocab_size <= self.tok_emb.weight.size(0):
            return

        def grown(old):  # (V_old, C) -> (vocab_size, C)
            x = old.float()
            mean, cov = x.mean(0), torch.cov(x.t())                      # (C,), (C, C)
            jitter = 1e-6 * cov.diagonal().mean() * torch.eye(x.size(1), device=x.device)
            chol = torch.linalg.cholesky(1e-5 * cov + jitter)          # noise = z Lᵀ has covariance 1e-5·Σ
            z = torch.randn(vocab_size - x.size(0), x.size(1), generator=torch.Generator().manual_seed(0))
            return torch.cat([x, mean + z.to(x.device) @ chol.t()]).to(old.dtype)

        old = self.tok_emb.weight
        C, kw = old.size(1), dict(device=old.device, dtype=old.dtype)
        head = self.lm_head.weight
        self.tok_emb = nn.Embedding(vocab_size, C, **kw)
        self.tok_emb.weight.copy_(grown(old))
        self.lm_head = nn.Linear(C, vocab_size, bias=False, **kw)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head.weight.copy_(grown(head))
        self.config.vocab_size = vocab_size

    def forward(self, idx, targets=None, cache=None, pad_mask=None):
        """idx (B, T) token ids -> logits (B, T, V) and the mean cross-entropy over targets != IGNORE_INDEX.

        targets (B, T) holds the token that should follow each position (idx shifted left by one).
        With a KVCache, idx holds only the new tokens and the cache supplies the earlier ones.
        pad_mask (B, T) bool is True on real tokens, for left-padded batches (see positions_and_masks).
        """
        logits = self.logits(self.hidden_states(idx, cache, pad_mask))  # (B, T, C) -> (B, T, V)
        loss = cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def logits(self, h):
        """lm_head on hidden states (..., C) -> (..., V); with final_softcap (Gemma 2) squashed to ±cap."""
        z = self.lm_head(h)
        if self.config.final_softcap:
            z = self.config.final_softcap * torch.tanh(z / self.config.final_softcap)
        return z

    def hidden_states(self, idx, cache=None, pad_mask=None):
        """idx (B, T) -> the final normalised hidden states (B, T, C) that lm_head (or score_head) reads:
        embeddings, then the blocks, then the final norm. With a KVCache idx holds only the new tokens;
        pad_mask (B, T) is True on the real tokens of a left-padded batch (see positions_and_masks)."""
        pos_ids, masks, rope = self.positions_and_masks(idx, cache, pad_mask)  # masks, rope: per kind of layer
        x = self.tok_emb(idx)                                    # (B, T) -> (B, T, C)
        if self.config.embed_scale:  # Gemma: times √C, rounded to the weights' dtype as its reference code does
            x = x * torch.tensor(self.config.n_embd ** 0.5).to(x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos_ids)                        # (T, C) or (B, T, C), broadcast over B
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            local = self.config.slides(i)
            x = block(x, rope[local], cache, masks[local])
        if cache is not None:  # every layer has stored this call's keys and values
            cache.pos += idx.size(1)
        return self.ln_f(x)

    def positions_and_masks(self, idx, cache=None, pad_mask=None):
        """What hidden_states needs besides the tokens: their position ids pos_ids, (T,) or (B, T), and for
        each kind of layer (False: global, True: sliding) its attention mask (attention_mask) and its RoPE
        table (None with learned positions). With a cache it also makes room there for idx and records which
        of its slots hold real tokens; hidden_states advances cache.pos once every layer has run.

        Padding. Prompts of different lengths are batched by left-padding them (data.left_pad), with
        pad_mask (B, T) True on real tokens. Then each row must compute exactly what it would alone:
        its position ids count its real tokens only (pos_ids below, for learned positions and RoPE
        alike), and no query attends to a padded key. A padded query may attend to itself, so no row
        of scores is all -inf: softmax of such a row is NaN, and att @ v would carry it into the real
        tokens of the next layer (0 · NaN = NaN). The KV cache remembers which slots are padding. A
        sliding window counts positions, not slots (attention_mask), so it too reaches as far as alone.
        Right padding needs no pad_mask: causal attention never looks to the right.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0  # cache slot of idx's first token
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens > block_size {self.config.block_size}")
        if cache is not None:
            cache.make_room(start + T)
        if pad_mask is None and (cache is None or cache.real is None):
            key_real, key_pos = None, torch.arange(start + T, device=idx.device)  # (Tk,): positions are slots
        else:
            real = pad_mask if pad_mask is not None else torch.ones(B, T, dtype=torch.bool, device=idx.device)
            if cache is not None:
                if cache.real is None:  # every slot filled so far held a real token
                    cache.real = torch.ones(B, cache.k[0].size(2), dtype=torch.bool, device=idx.device)
                cache.real[:, start:start + T] = real
                key_real = cache.real[:, :start + T]                 # (B, Tk)
            else:
                key_real = real
            key_pos = key_real.cumsum(1) - 1                         # (B, Tk): 0, 1, 2.. over real tokens
        pos_ids = key_pos[..., start:].clamp(min=0)                  # (T,) or (B, T)
        # one mask and one RoPE table per kind of layer: global, and sliding (False/True below)
        kinds = {self.config.slides(i) for i in range(self.config.n_layer)}
        masks = {local: attention_mask(start, key_pos, key_real, self.config.sliding_window if local else 0)
                 for local in kinds}
        rope = {local: self.rope(pos_ids, local) if self.pos_emb is None else None for local in kinds}
        return pos_ids, masks, rope

    def rope(self, pos_ids, local=False):
        """(cos, sin) of RoPE at pos_ids (T,) or (B, T), in fp32 even in a bf16 model (positions need the
        precision; bf16 has 8 bits of it), shaped to broadcast over heads. Sliding layers with a base of
        their own (rope_local_theta, Gemma 3) use it unscaled; other layers rope_theta and its scaling."""
        c = self.config
        if local and c.rope_local_theta:
            cos, sin = rope_tables(pos_ids, c.head_dim, c.rope_local_theta)
        else:
            cos, sin = rope_tables(pos_ids, c.head_dim, c.rope_theta, llama3=tuple(c.rope_llama3), linear=c.rope_linear)
        return (cos, sin) if pos_ids.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))  # (B, 1, T, D/2)

    def scores(self, idx, pad_mask=None):
        """The score head at every position, (B, T) in fp32: a value model's V(s_t) per token; a reward
        model's score of a whole sequence is the one at its last real token (last_token)."""
        return self.score_head(self.hidden_states(idx, pad_mask=pad_mask)).squeeze(-1).float()  # (B, T, 1) -> (B, T)

    def logprobs_of(self, idx, targets, pad_mask=None, entropy=False, temperature=1.0):
        """log p(targets[t] | idx[:t+1]) per position, (B, T) in fp32, 0 where targets is IGNORE_INDEX
        (see token_logprobs); with entropy=True also the entropy of each predicted distribution, (B, T).

        lm_head runs only from the first position where some row has a target: DPO and PPO score the
        response, and a long prompt then costs no (B, Tp, V) logits. temperature divides the logits as
        sampling does (sample_next), so PPO scores tokens under the distribution they were drawn from.
        """
        h = self.hidden_states(idx, pad_mask=pad_mask)                         # (B, T, C)
        first = int((targets != IGNORE_INDEX).any(0).int().argmax())          # first column with a target
        logits = self.logits(h[:, first:])                                     # (B, T - first, V)
        if temperature != 1.0:
            logits = logits.float() / temperature
        logprobs = F.pad(token_logprobs(logits, targets[:, first:]), (first, 0))  # (B, T)
        if not entropy:
            return logprobs
        ent = F.pad(entropy_from_logits(logits), (first, 0)) * (targets != IGNORE_INDEX)
        return logprobs, ent

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               stop_token=None, use_cache=True, generator=None, pad_mask=None):
        """Yield the next token for every row, one (B, 1) tensor per step; see generate()."""
        cache, done = None, torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= self.config.block_size:
                if cache is None:  # prefill: run the whole prompt once and keep its keys/values
                    # the cache holds what attention computes in: bf16 under bf16 autocast, half of fp32
                    dev = idx.device.type
                    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.lm_head.weight.dtype
                    # room for what this call feeds: the prompt and every new token but the last
                    length = min(idx.size(1) + max_new_tokens - 1, self.config.block_size)
                    cache = KVCache(self.config, idx.size(0), idx.device, dtype, length)
                    h = self.hidden_states(idx, cache, pad_mask)
                else:              # decode: only the newest token goes through the network
                    h = self.hidden_states(idx[:, -1:], cache)
            else:
                # no cache, or the sequence outgrew block_size: recompute over the last block_size
                # tokens (positions shift, so cached keys would be wrong from here on)
                last = slice(-self.config.block_size, None)
                h = self.hidden_states(idx[:, last], pad_mask=pad_mask[:, last] if pad_mask is not None else None)
            logits = self.logits(h[:, -1, :])  # (B, V): only the last position predicts the next token
            next_tok = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:  # rows that already stopped keep emitting stop_token
                next_tok = next_tok.masked_fill(done.unsqueeze(1), stop_token)
                done = done | (next_tok.squeeze(1) == stop_token)
            idx = torch.cat([idx, next_tok], dim=1)
            if pad_mask is not None:  # generated tokens are real
                pad_mask = F.pad(pad_mask, (0, 1), value=True)
            yield next_tok
            if bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 stop_token=None, use_cache=True, generator=None, pad_mask=None):
        """Append up to max_new_tokens sampled tokens to idx (B, T) and return (B, T + new).

        temperature 0 means greedy (argmax). top_k keeps the k most likely tokens; top_p keeps the
        smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2020). With
        stop_token, generation ends once every row has produced it; rows that stopped earlier are
        padded with stop_token. Prompts of different lengths: left-pad them and pass pad_mask (B, T),
        True on real tokens (data.left_pad); each row then gets what it would get alone.
        """
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, stop_token, use_cache, generator,
                               pad_mask))
        return torch.cat([idx, *new], dim=1)

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints: thin methods; the code is in "Hugging Face import and export" below

    @classmethod
    def from_pretrained(cls, path):
        """Load a Hugging Face directory (config.json and its weights) in fp32; see _hf_load."""
        return _hf_load(cls, path)

    def hf_architecture(self):
        """The Hugging Face model_type save_pretrained writes, or None where no format holds this model;
        see _hf_architecture."""
        return _hf_architecture(self.config)

    def exports_to_hf(self):
        """True when save_pretrained can write this model (see hf_architecture)."""
        return self.hf_architecture() is not None

    def save_pretrained(self, path):
        """Export to a Hugging Face directory as the architecture hf_architecture names; see _hf_save."""
        _hf_save(self, path)


# -----------------------------------------------------------------------------
# Losses and sampling


def token_logprobs(logits, targets):
    """log p(y_t | x_≤t) = z_t,y_t − log Σ_j exp(z_t,j) at every position, (B, T) in fp32; 0 where y_t
    is IGNORE_INDEX. Shape: logits z (B, T, V), targets y (B, T).

    One fused log-softmax + gather (F.cross_entropy with no reduction is exactly −this), so no
    (B, T, V) log-probability tensor is kept. DPO sums these over response tokens; PPO uses each.
    """
    V = logits.size(-1)
    nll = F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


def cross_entropy(logits, targets):
    """Causal-LM loss: the mean over positions t with y_t != IGNORE_INDEX of −log p(y_t | x_≤t)
    (token_logprobs). Shape: logits (B, T, V), targets (B, T). fp32; a batch with no target gives 0, not NaN."""
    return -token_logprobs(logits, targets).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def entropy_from_logits(logits):
    """H(p) = −Σ_j p_j log p_j = log Σ_j exp(z_j) − Σ_j p_j z_j per position: (B, T, V) -> (B, T), fp32."""
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (z.softmax(-1) * z).sum(-1)


def masked_mean(x, mask, dim=None):
    """Σ x·m / Σ m: the mean of x over the positions where mask is True (all of them, or along dim).
    PPO averages per-token losses this way so that padding adds nothing."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x − mean) / std over the True positions of mask, 0 elsewhere (PPO's advantage normalisation).
    shift_mean=False adds the mean back: a reward's scale is normalised but its sign kept (Huang et al.
    2024, detail 19). The variance is the plain (biased) mean of squares."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask


def last_token(x, pad_mask):
    """x (B, T) at each row's last real token (the last True of pad_mask (B, T)) -> (B,). A reward
    model's score of prompt + response is the one read there; works for right or no padding."""
    T = pad_mask.size(1)
    last = T - 1 - pad_mask.flip(1).int().argmax(1)  # (B,) index of the last True
    return x.gather(1, last.unsqueeze(1)).squeeze(1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from the last position's logits (B, V); returns (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass *before* this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read without running code


def atomic_write(path, write_fn):
    """Write to path.tmp, flush to disk, then rename: a crash never leaves a half-written file at path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # the rename itself lives in the directory: flush it too (POSIX)
            fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        if os.path.exists(tmp):  # the writer failed: drop the partial file, keep the old one
            os.remove(tmp)


def checkpoint_digest(state):
    """SHA-256 of everything in a checkpoint dict: each tensor's dtype, shape and bytes, and the plain data
    around them (keys sorted), so that flipped bits anywhere are noticed when it loads."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"tensor {t.dtype} {tuple(x.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()))
        elif isinstance(x, dict):
            for k in sorted(x, key=repr):
                h.update(f"key {k!r}".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__} {len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"value {x!r}".encode())
    walk(state)
    return h.hexdigest()


_HELD_LOCKS = {}  # out directory -> its open .lock file, for as long as this process lives


def claim_out_dir(out, single_process=None):
    """Create --out and lock it (OUT/.lock, an advisory flock) for this process: a second run given the
    same directory stops with a one-line error instead of racing on ckpt.pt and mixing log.jsonl. A
    process that holds it already (one test after another) keeps it. Under torchrun only rank 0 writes,
    so only it locks; single_process (a stage's name) refuses torchrun for stages that do not split work."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if single_process and world > 1:
        raise SystemExit(f"error: {single_process} runs in one process; under torchrun it would start {world} "
                         f"unsynchronised copies (pretrain.py, sft.py, reward.py and dpo.py are the data-parallel stages)")
    try:  # a directory that cannot be written fails now, not after training
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a")
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror or e})") from None
    key = os.path.realpath(out)
    if int(os.environ.get("RANK", 0)) != 0 or key in _HELD_LOCKS:
        f.close()
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the directory is used unlocked
        f.close()
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SystemExit(f"error: --out {out} is in use by another run (it holds {out}/.lock); "
                         f"wait for it, or give this run another --out") from None
    _HELD_LOCKS[key] = f


def _tensor_bytes(x):
    """Bytes of all tensors in a nested checkpoint dict: about the size torch.save writes."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return sum(_tensor_bytes(v) for v in values)


def save_checkpoint(path, **state):
    """Save a dict (model, model_config, tokenizer, args, step, ...) to path, atomically, with its
    checkpoint_digest, which load_checkpoint checks."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state["sha256"] = checkpoint_digest(state)
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as "unexpected pos ..."
        free, need = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free, _tensor_bytes(state)
        why = (f"no space left on the device ({free / 2**20:,.0f} MB free, {need / 2**20:,.0f} MB needed)"
               if free < need + 2**20 else str(e).splitlines()[0])
        raise SystemExit(f"error: {path}: the checkpoint could not be written: {why}; the previous one, if any, "
                         f"is kept") from None


def save_stage(out_dir, model, lora_base=None, fingerprint=None, **state):
    """A fine-tuning stage's OUT/ckpt.pt: the full model (a LoRA model merged into a copy, so that it loads
    like any checkpoint) and state (config, args, step, training state...). A LoRA run (lora_base: the
    path its base was loaded from; fingerprint: lora.base_fingerprint of that base) also keeps its
    adapter in ckpt.pt, for --resume, and alone in OUT/adapter.pt."""
    full = lora.merge_lora(copy.deepcopy(model)) if lora_base else model
    state["model"] = full.state_dict()
    if lora_base:  # the adapter's tokenizer is its base's; an absolute base path loads from any directory
        lora_base = os.path.abspath(lora_base) if os.path.exists(lora_base) else lora_base
        state["adapter"] = lora.adapter_checkpoint(model, lora_base, fingerprint, model_config=asdict(model.config),
                                                   chat=state.get("chat", False), step=state.get("step", 0))
        save_checkpoint(os.path.join(out_dir, "adapter.pt"), **state["adapter"])
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), **state)


def load_resume(out_dir, resume):
    """--resume: the checkpoint of the run in out_dir (OUT/ckpt.pt; none there is a one-line error), or None
    without --resume. The stage then takes from it what changes the run's meaning (resume_args)."""
    path = os.path.join(out_dir, "ckpt.pt")
    if not resume:
        return None
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume: no checkpoint at {path}")
    return load_checkpoint(path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict. weights_only=True: tensors and plain data only, never code. An empty,
    truncated or damaged file, or one whose contents no longer match the digest saved in it, ends the
    program with a one-line error (checkpoints written before digests existed load unchecked)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head and head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive (or an old pickle)
        raise SystemExit(f"error: {path}: not a checkpoint (not a file torch.save wrote)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # EOFError, zip and unpickling errors: the file is not a whole checkpoint
        if "Weights only load failed" in str(e):
            why = "it holds objects other than tensors and plain data (code, perhaps): refused"
        else:
            why = "empty" if os.path.getsize(path) == 0 else f"truncated or damaged ({type(e).__name__})"
        raise SystemExit(f"error: {path}: not a readable checkpoint: {why}") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path}: not a checkpoint of this project (a {type(ckpt).__name__})")
    saved = ckpt.pop("sha256", None)
    if saved is not None and saved != checkpoint_digest(ckpt):
        raise SystemExit(f"error: {path}: the checkpoint's contents do not match its SHA-256: the file is damaged")
    return ckpt


def load_model(init_from, map_location="cpu", _adapters=()):
    """Model and checkpoint dict from this project's checkpoint (file or directory with ckpt.pt), a LoRA
    adapter file (OUT/adapter.pt: its base is loaded and the adapter merged in), or a Hugging Face GPT-2
    directory. The tokenizer of any of them: data.checkpoint_tokenizer(ckpt)."""
    path = os.path.join(init_from, "ckpt.pt") if os.path.isdir(init_from) else init_from
    if os.path.isfile(path):
        ckpt = load_checkpoint(path, map_location)
        if "model" not in ckpt and "lora" in ckpt:  # adapter-only: what trained, and the identity of its base
            here = os.path.realpath(path)
            base_file = ckpt["base"] if not os.path.isdir(ckpt["base"]) else os.path.join(ckpt["base"], "ckpt.pt")
            if os.path.realpath(base_file) in (here, *_adapters):  # an adapter on itself would recurse forever
                raise ValueError(f"{path}: the adapter's base {ckpt['base']} is the adapter itself")
            model, base = load_model(ckpt["base"], map_location, (*_adapters, here))
            lora.merge_lora(lora.load_lora(model, ckpt))  # refuses a base with other weights
            return model, {**base, "model_config": asdict(model.config), "step": ckpt["step"],
                           "chat": ckpt.get("chat", base.get("chat", False))}
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model, ckpt
    if os.path.isfile(os.path.join(init_from, "config.json")):
        model = GPT.from_pretrained(init_from)  # no "tokenizer": data.checkpoint_tokenizer gives GPT-2's
        with open(os.path.join(init_from, "config.json")) as f:
            model_type = json.load(f).get("model_type", "gpt2")
        return model, {"model_config": asdict(model.config), "step": 0, "hf_model_type": model_type,
                       "hf_path": os.path.abspath(init_from)}
    hint = ""
    if not os.path.exists(init_from) and os.path.basename(init_from.rstrip("/")).startswith("gpt2"):
        hint = (f"; nothing is downloaded at run time: on a machine with internet, `huggingface-cli download "
                f"openai-community/{os.path.basename(init_from.rstrip('/'))} --local-dir {init_from}`")
    raise FileNotFoundError(f"{init_from}: neither a checkpoint (ckpt.pt) nor a Hugging Face directory "
                            f"(config.json){hint}")


# -----------------------------------------------------------------------------
# Hugging Face import and export: the code behind GPT.from_pretrained and GPT.save_pretrained


def _hf_load(cls, path):
    """Load a Hugging Face directory (config.json + model.safetensors, its shards, or pytorch_model.bin) in
    fp32: GPT-2 into the gpt2 family; Llama (Llama 2/3, SmolLM, TinyLlama), Qwen2, Qwen3, Mistral, Phi-3,
    Gemma 2 and Gemma 3 (text) into the modern family with their switches (HF_ARCHITECTURES).

    Every tensor in the files must land in the model: a Qwen3 directory relabelled llama would otherwise
    load without its q/k norms and give wrong logits, silently. The model is built on the meta device
    (shapes, no memory), given uninitialised fp32 tensors (to_empty) and each is filled from the file,
    read one tensor at a time, so loading holds one copy of the weights plus one tensor: no random init
    to overwrite, no second copy of the file. block_size is the checkpoint's whole context; nothing is
    allocated for it up front (see KVCache, attention_mask, GPT.rope).
    """
    where = os.path.join(path, "config.json")
    with open(where) as f:
        hf = json.load(f)
    config = _hf_config(hf, where)
    kind = config.hf_model_type
    theirs = _read_hf_weights(path)  # {name: function reading that tensor}
    if kind == "gpt2":  # GPT2LMHeadModel's names start with transformer., GPT2Model's do not
        theirs = {k.removeprefix("transformer."): v for k, v in theirs.items()}
    table = _hf_name_table(config, kind, config.intermediate_size)
    wanted = {name for _, parts, _ in table for name, _ in parts}
    missing = sorted(wanted - theirs.keys())
    unread = sorted(n for n in theirs.keys() - wanted - {"lm_head.weight"} if not n.endswith(_NOT_WEIGHTS))
    if missing:
        raise ValueError(f"{path}: weight {missing[0]!r} missing from the checkpoint")
    if unread:
        raise ValueError(f"{path}: {len(unread)} tensors this loader would not read as model_type {kind!r}, "
                         f"e.g. {', '.join(unread[:3])}: config.json describes another architecture")
    with torch.device("meta"):  # shapes only: no random weights drawn to be thrown away
        model = cls(config)
    model.to_empty(device="cpu")  # uninitialised fp32 tensors, each filled below
    if config.tie_embeddings:  # to_empty made lm_head a tensor of its own: share tok_emb's again
        model.lm_head.weight = model.tok_emb.weight
    params = model.state_dict()
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    unfilled = params.keys() - {ours for ours, _, _ in table} - tied
    if unfilled:  # the name table and the model disagree: a bug here, not in the checkpoint
        raise RuntimeError(f"no Hugging Face tensor for {sorted(unfilled)[:3]}")
    with torch.no_grad():
        for ours, parts, transposed in table:
            pieces = params[ours].split([rows for _, rows in parts]) if len(parts) > 1 else [params[ours]]
            for (name, _), piece in zip(parts, pieces):  # q, k, v (gate, up) into their rows of ours
                w = theirs.pop(name)()                   # read now, in the file's dtype: one at a time
                w = w.t() if transposed else w
                if w.shape != piece.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(w.shape)}, "
                                     f"config.json says {tuple(piece.shape)}")
                piece.copy_(w)                           # into the fp32 parameter: the stages train it
        if config.tie_embeddings and "lm_head.weight" in theirs:  # a tied matrix some files store twice
            if not torch.equal(theirs.pop("lm_head.weight")().float(), params["tok_emb.weight"]):
                raise ValueError(f"{where}: tie_word_embeddings, but lm_head.weight differs from embed_tokens")
    return model


def _hf_architecture(c):
    """The Hugging Face model_type save_pretrained writes, or None where no format holds this model: gpt2
    for the gpt2 family with tied embeddings and no GQA; for the modern family the row of HF_ARCHITECTURES
    it was loaded from, else the first row whose switches are exactly the ones it has on."""
    if c.score_head:
        return None
    on = c.switches()
    if c.pos_emb == "learned":
        gpt2 = (c.norm, c.mlp, c.bias, c.tie_embeddings, c.n_kv_head, c.head_dim * c.n_head) == \
            ("layernorm", "gelu", True, True, c.n_head, c.n_embd)
        return "gpt2" if gpt2 and not on else None
    if (c.norm, c.bias) != ("rmsnorm", False) or c.mlp not in ("swiglu", "geglu"):
        return None
    for kind in [c.hf_model_type, *HF_ARCHITECTURES]:
        if kind in HF_ARCHITECTURES:
            _, always, optional = HF_ARCHITECTURES[kind]
            if set(always) <= on <= set(always) | set(optional):
                return kind
    return None


def _hf_save(model, path):
    """Export to a Hugging Face directory as the architecture hf_architecture names, the reverse of
    from_pretrained: config.json (with the context length and the bos/eos/pad ids the model was loaded
    with), generation_config.json (bos/eos, so that transformers' generate stops at EOS), and
    model.safetensors (pytorch_model.bin when the optional safetensors package is missing)."""
    c, kind = model.config, model.hf_architecture()
    if kind is None:
        raise ValueError("no Hugging Face format holds this model: the gpt2 family exports with tied embeddings "
                         "and no GQA, the modern family when its switches are one row's of HF_ARCHITECTURES, "
                         "neither with a score head")
    I = model.blocks[0].mlp.proj.in_features
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_sd = {}
    prefix = "transformer." if kind == "gpt2" else ""
    for ours, parts, transposed in _hf_name_table(c, kind, I):
        w = sd[ours].t() if transposed else sd[ours]
        pieces = w.split([rows for _, rows in parts]) if len(parts) > 1 else [w]  # q|k|v, gate|up apart again
        hf_sd.update({prefix + name: piece for (name, _), piece in zip(parts, pieces)})
    if kind == "gpt2":
        hf_sd["lm_head.weight"] = sd["tok_emb.weight"]
    ids = {k: c.special_ids.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if kind == "gpt2" and not c.special_ids and c.vocab_size > 50256:  # <|endoftext|>: begin and end of text
        ids.update(bos_token_id=50256, eos_token_id=50256)
    hf_config = {**_hf_config_json(c, kind, I), **ids}
    hf_sd = {k: v.contiguous().clone() for k, v in hf_sd.items()}  # safetensors stores no shared tensors
    files = {"config.json": hf_config}
    if ids["bos_token_id"] is not None or ids["eos_token_id"] is not None:
        files["generation_config.json"] = {k: v for k, v in ids.items() if v is not None}
    os.makedirs(path, exist_ok=True)
    for name, d in files.items():
        atomic_write(os.path.join(path, name), lambda f, d=d: f.write(json.dumps(d, indent=2).encode()))
    try:
        from safetensors.torch import save
    except ImportError:
        atomic_write(os.path.join(path, "pytorch_model.bin"), lambda f: torch.save(hf_sd, f))
    else:
        atomic_write(os.path.join(path, "model.safetensors"), lambda f: f.write(save(hf_sd, {"format": "pt"})))


def _hf_config(hf, where):
    """The GPTConfig of a Hugging Face config.json (hf, read from where). What this decoder does not compute as
    transformers does is refused with a ValueError naming config.json's field."""
    kind = hf.get("model_type", "gpt2")
    special = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None}

    def refuse(name, why):
        raise ValueError(f"{where}: {name} = {json.dumps(hf[name])} {why}")

    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", "is not GPT-2's tanh GELU")
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 0,
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5), hf_model_type=kind, special_ids=special,
                         **FAMILIES["gpt2"])
    if kind == "gemma3":
        refuse("model_type", "is Gemma 3's image-text model (vision_config); load a text-only checkpoint "
                             "(Gemma3ForCausalLM, model_type gemma3_text, e.g. gemma-3-1b-it)")
    if kind not in HF_ARCHITECTURES:
        refuse("model_type", f"does not load: only gpt2, {', '.join(HF_ARCHITECTURES)}")
    gemma = kind.startswith("gemma")
    act_field, act = ("hidden_activation", "gelu_pytorch_tanh") if gemma else ("hidden_act", "silu")
    if hf.get(act_field, act) != act:
        refuse(act_field, f"is not supported by this loader ({act} only)")
    for name in ("attention_bias", "mlp_bias", "use_sliding_window", "num_experts", "use_bidirectional_attention"):
        if hf.get(name):
            refuse(name, "is not supported by this loader")
    if kind == "gemma3_text" and hf.get("attn_logit_softcapping") is not None:
        refuse("attn_logit_softcapping", "is ignored by transformers' Gemma 3, so this loader refuses it")

    # RoPE: transformers 5 writes rope_parameters (Gemma 3: one per layer type); older files rope_theta,
    # rope_scaling, and for Gemma 3 rope_local_base_freq
    rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope, local = hf.get(rope_field) or {}, {}
    if "full_attention" in rope:
        rope, local = rope["full_attention"] or {}, rope.get("sliding_attention") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = {"llama": ("default", "llama3"), "gemma3_text": ("default", "linear")}.get(kind, ("default",))
    if rope_type not in allowed or local.get("rope_type", "default") != "default":  # e.g. Phi-3 128k's longrope (su)
        raise ValueError(f"{where}: {rope_field} of type {rope_type!r} is not supported for {kind} by this loader "
                         f"({' or '.join(allowed)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor = {partial} is not supported by this loader (RoPE on "
                         f"the whole head only)")
    llama3 = tuple(rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                     "original_max_position_embeddings")) if rope_type == "llama3" else ()

    # which layers slide: Mistral and Phi-3 all (when sliding_window is set), Gemma all but every n-th
    L = hf["num_hidden_layers"]
    window = (hf.get("sliding_window") or 0) if gemma or kind in ("mistral", "phi3") else 0
    if gemma:
        n = hf.get("sliding_window_pattern", 2 if kind == "gemma2" else 6)  # what transformers assumes without it
        types = hf.get("layer_types") or ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                                          for i in range(L)]
    else:
        types = ["sliding_attention" if window else "full_attention"] * L
    slides = [t == "sliding_attention" for t in types]
    every = 0 if all(slides) else slides.index(False) + 1
    if set(types) - {"sliding_attention", "full_attention"} or slides != [not every or (i + 1) % every != 0
                                                                        for i in range(L)]:
        refuse("layer_types", "is not supported by this loader (a sliding window on all layers, or all but every n-th)")
    if not any(slides):
        window = every = 0

    C, H = hf["hidden_size"], hf["num_attention_heads"]
    return GPTConfig(block_size=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"], n_layer=L,
                     n_head=H, n_kv_head=hf.get("num_key_value_heads") or H, n_embd=C,
                     head_dim=hf.get("head_dim") or C // H, intermediate_size=hf["intermediate_size"],
                     norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=rope.get("rope_theta", hf.get("rope_theta", 1e6 if kind == "gemma3_text" else 1e4)),
                     tie_embeddings=hf.get("tie_word_embeddings", gemma), qkv_bias=kind == "qwen2", rope_llama3=llama3,
                     qk_norm=kind in ("qwen3", "gemma3_text"), sliding_window=window, global_every=every,
                     rope_local_theta=local.get("rope_theta", hf.get("rope_local_base_freq", 1e4))
                     if kind == "gemma3_text" else 0.0,
                     rope_linear=rope.get("factor", 1.0) if rope_type == "linear" else 1.0,
                     query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else 0.0,
                     attn_softcap=(hf.get("attn_logit_softcapping") or 0.0) if gemma else 0.0,
                     final_softcap=(hf.get("final_logit_softcapping") or 0.0) if gemma else 0.0,
                     norm_plus_one=gemma, sandwich_norm=gemma, embed_scale=gemma, hf_model_type=kind,
                     special_ids=special, **{**FAMILIES["modern"], "mlp": "geglu" if gemma else "swiglu"})


def _hf_config_json(c, kind, I):
    """config.json's architecture fields for config c exported as kind (I: the MLP's hidden width)."""
    if kind == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=I if I != 4 * c.n_embd else None, activation_function="gelu_new",
                    layer_norm_epsilon=c.norm_eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                    tie_word_embeddings=True)
    hf = dict(architectures=[HF_ARCHITECTURES[kind][0]], model_type=kind, vocab_size=c.vocab_size, hidden_size=c.n_embd,
              intermediate_size=I, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
              num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, max_position_embeddings=c.block_size,
              rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
              attention_bias=False, torch_dtype="float32")
    if kind.startswith("gemma"):
        # every field written, None where off: transformers' defaults (softcaps 50 and 30, window 4096) are not ours
        hf.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
                  sliding_window=c.sliding_window or c.block_size,  # no layer slides when 0: any value
                  layer_types=["sliding_attention" if c.slides(i) else "full_attention" for i in range(c.n_layer)],
                  attn_logit_softcapping=c.attn_softcap or None, final_logit_softcapping=c.final_softcap or None)
    else:
        hf["hidden_act"] = "silu"
    if kind in ("mistral", "phi3"):
        hf["sliding_window"] = c.sliding_window or None
    if kind == "gemma3_text":
        hf.update(rope_local_base_freq=c.rope_local_theta or c.rope_theta,
                  rope_scaling=dict(rope_type="linear", factor=c.rope_linear) if c.rope_linear != 1 else None)
    if c.rope_llama3:
        hf["rope_scaling"] = dict(zip(("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings"), c.rope_llama3), rope_type="llama3")
    return hf


def _hf_name_table(c, kind, I):
    """(our name, [(Hugging Face name, rows)], transposed?) for every weight of config c as model_type kind, I
    its MLP width. Where one of ours stacks several of theirs along dim 0 (q, k and v; gate and up), rows says
    how many each holds. GPT-2 stores its projections as Conv1D with weight (in, out); nn.Linear keeps (out, in).
    HF's names: Llama's post_attention_layernorm is the norm before the MLP, Gemma's the one after attention."""
    if kind == "gpt2":
        table = [("tok_emb.weight", "wte.weight", False), ("pos_emb.weight", "wpe.weight", False),
                 ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
        for i in range(c.n_layer):
            for ours, theirs, is_conv in [("ln1", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                          ("attn.proj", "attn.c_proj", True), ("ln2", "ln_2", False),
                                          ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
                table.append((f"blocks.{i}.{ours}.weight", f"h.{i}.{theirs}.weight", is_conv))
                table.append((f"blocks.{i}.{ours}.bias", f"h.{i}.{theirs}.bias", False))
        return [(ours, [(theirs, None)], transposed) for ours, theirs, transposed in table]
    H, Hkv, D = c.n_head, c.n_kv_head, c.head_dim
    gemma = kind.startswith("gemma")
    names = {"tok_emb.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    if not c.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    table = []
    for i in range(c.n_layer):
        a, o = f"model.layers.{i}.", f"blocks.{i}."
        names.update({o + "ln1.weight": a + "input_layernorm.weight",
                      o + "attn.proj.weight": a + "self_attn.o_proj.weight",
                      o + "ln2.weight": a + ("pre_feedforward" if gemma else "post_attention") + "_layernorm.weight",
                      o + "mlp.proj.weight": a + "mlp.down_proj.weight"})
        if gemma:
            names.update({o + "ln1_post.weight": a + "post_attention_layernorm.weight",
                          o + "ln2_post.weight": a + "post_feedforward_layernorm.weight"})
        if c.qk_norm:
            names.update({o + "attn.q_norm.weight": a + "self_attn.q_norm.weight",
                          o + "attn.k_norm.weight": a + "self_attn.k_norm.weight"})
        if kind == "phi3":  # fused on disk as ours are
            names.update({o + "attn.qkv.weight": a + "self_attn.qkv_proj.weight",
                          o + "mlp.fc.weight": a + "mlp.gate_up_proj.weight"})
            continue
        for p in ("weight", "bias") if c.qkv_bias else ("weight",):
            qkv = [(a + f"self_attn.{x}_proj.{p}", rows) for x, rows in zip("qkv", (H * D, Hkv * D, Hkv * D))]
            table.append((o + f"attn.qkv.{p}", qkv, False))
        table.append((o + "mlp.fc.weight", [(a + "mlp.gate_proj.weight", I), (a + "mlp.up_proj.weight", I)], False))
    return [(ours, [(theirs, None)], False) for ours, theirs in names.items()] + table


# buffers that older files carry and no model needs: GPT-2's causal mask, Llama's RoPE frequencies
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_hf_weights(path):
    """{name: function returning that tensor} of a Hugging Face directory: model.safetensors, the shards listed
    in model.safetensors.index.json, or pytorch_model.bin. A tensor is read when its function is called."""
    st, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(st):
        return _safetensors_readers(st)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        readers = [_safetensors_readers(os.path.join(path, shard)) for shard in shards]
        return {name: read for shard in readers for name, read in shard.items()}
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(pt):  # the older format: one pickle, read whole
        return {name: (lambda t=t: t) for name, t in torch.load(pt, map_location="cpu", weights_only=True).items()}
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def _safetensors_readers(file):
    """{name: function reading that tensor} of one .safetensors file. The format: 8 bytes (little-endian) with the
    header's size, a JSON header {name: {dtype, shape, data_offsets}}, then the tensors' bytes. Plain reads into
    the tensor's own memory, not a memory map: mapped pages count as the process's memory while it is open."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)

    def read(info):
        t = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        with open(file, "rb") as f:
            f.seek(8 + n + begin)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{file}: truncated")
        return t
    return {name: (lambda info=info: read(info)) for name, info in header.items()}


# -----------------------------------------------------------------------------
# Training runtime: optimizer, schedule, and what every training loop needs


def get_lr(step, max_lr, warmup_steps, max_steps, min_lr_ratio=0.1):
    """Linear warmup for warmup_steps, then cosine decay from max_lr to min_lr_ratio·max_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    min_lr = min_lr_ratio * max_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


class GracefulStop:
    """Ctrl-C or SIGTERM ask the loop to stop: it finishes the current step, saves a checkpoint and
    exits (check .requested once per step). A second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self, log=print):
        self.requested, self.log = False, log

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


def rng_state(device):
    """The random streams a training step draws from (dropout), to save in a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW with decoupled weight decay (Loshchilov & Hutter 2019) on matrices only.

    Biases and norm weights are not decayed: pulling a norm's scale towards 0 only fights the
    loss (nanoGPT, and GPT-3's training setup).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda"  # one kernel for all parameters; CUDA only
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def optimizer_step(optimizer, scaler, lr, grad_clip=0.0):
    """One update from the gradients that backward() left: set the learning rate, unscale them (fp16),
    clip their global norm to grad_clip (0 = no clipping), step, and zero them. Returns the norm before
    clipping, for the log; with fp16, inf or NaN means the scaler skipped this step and lowers its scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def check_finite(loss, step, ckpt_path):
    """Stop the run with a one-line error when the loss is NaN or inf: the steps after it would only
    spoil the weights, and the last checkpoint written is still good."""
    if not math.isfinite(loss):
        saved = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written"
        sys.exit(f"error: loss is {loss} at step {step}; stopping: {saved} (try a lower --lr or --dtype float32)")


def append_jsonl(path, record):
    """Append one JSON line (a log step, an evaluation) to path: log.jsonl is read by plotting scripts."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def training_state(optimizer, scaler, sampler, device):
    """What --resume needs besides the weights to take the very next step the run would have taken:
    the optimizer's moments, the loss scale, the data position and the random streams."""
    return dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), sampler=sampler.state_dict(),
                rng=rng_state(device))


def restore_training_state(ckpt, optimizer, scaler, sampler):
    """Load what training_state saved, except the random streams (set_rng_state, called last, so that
    no set-up work draws from them after). Returns the step to continue from."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    sampler.load_state_dict(ckpt["sampler"])
    return ckpt["step"]


def positive_int(text):
    """argparse type for counts that divide a step number (--eval-every, --log-every): 0 would divide by 0."""
    import argparse
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def in_range(kind, low=-math.inf, high=math.inf, open_low=False, open_high=False):
    """argparse type: a number of `kind` (int or float) in an interval, so that an inverted or meaningless
    setting (a temperature of -1, a DPO β below 0, a validation share of 1.5) stops at the command line
    with a one-line error instead of running. in_range(float, 0, 1, open_high=True) is [0, 1)."""
    import argparse
    interval = f"{'(' if open_low or low == -math.inf else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not (low < value if open_low else low <= value) or not (value < high if open_high else value <= high):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")  # NaN fails both comparisons
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def resume_args(args, saved_args, names, log=print, warn=()):
    """On --resume the model must be the one that was trained: take the flags in names (LoRA rank,
    targets, ...) from the checkpoint's args, and say so where the command line asked for another value.
    The flags in warn (steps, batch size, learning rate) keep the command line's value, with a warning."""
    for name in names:
        if name not in saved_args:  # a checkpoint from before this flag existed: the command line's value
            continue
        if getattr(args, name) != saved_args[name]:
            log(f"--resume: --{name.replace('_', '-')} {saved_args[name]} from the checkpoint "
                f"(the command line gave {getattr(args, name)})")
            setattr(args, name, saved_args[name])
    for name in warn:  # flags that may change on resume, but then the run is not the one that was started
        if name in saved_args and getattr(args, name) != saved_args[name]:
            log(f"--resume: warning: --{name.replace('_', '-')} was {saved_args[name]}, now {getattr(args, name)}: "
                f"the schedule and batches differ from the interrupted run's")


@dataclass
class Runtime:
    """Where and how this process computes: device, precision, and its place in a torchrun job."""
    device: torch.device
    dtype: torch.dtype
    scaler: object        # torch.amp.GradScaler, active only for fp16
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    why: str = ""         # how the dtype was chosen, for the start-up log

    def autocast(self):
        """A fresh context for one `with` block: matmuls in low precision, weights and optimizer state
        stay fp32; a no-op in fp32. Fresh each time because one torch.autocast object cannot nest:
        re-entering it overwrites the state it restores on exit, and autocast stays on after both."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def master(self):
        return self.rank == 0

    def anyone(self, flag):
        """True on every rank if it is True on any (in one process: flag). A loop's stop (Ctrl-C, SIGTERM,
        --stop-at) is taken together: a rank that stopped alone would wait in the next all-reduce forever."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor(float(flag), device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """True on x86 CPUs whose flags list AVX512-BF16 or AMX-BF16 (Linux; elsewhere False)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setup_runtime(device="auto", dtype="auto", seed=1337):
    """Pick device (cuda > mps > cpu) and dtype, seed every RNG, and join a torchrun job if launched by one.

    dtype "auto": bf16 on GPUs that support it, fp16 with loss scaling on older CUDA GPUs (T4, V100),
    bf16 on CPUs with native bf16 matmuls (AVX512-BF16 or AMX: 2.46x faster to the same loss on an AMD
    EPYC, README), fp32 on other CPUs (emulated bf16 ran at 0.40-0.54x) and on MPS. Runtime.why says which. Under torchrun (RANK/WORLD_SIZE set) each process gets its own GPU and the
    process group uses NCCL on CUDA, gloo on CPU.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if world > 1 and device.startswith("cuda:"):  # every rank would share that one GPU
        sys.exit(f"error: --device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                 f"pass --device cuda (or choose GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda":
        device = f"cuda:{local_rank}"  # one GPU per torchrun process; cuda:0 in a plain run
    try:
        device = torch.device(device)
    except RuntimeError:
        sys.exit(f"error: --device {device}: not a device (auto, cpu, cuda, cuda:N or mps)")
    present = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not present.get(device.type, False):
        sys.exit(f"error: --device {device}: {'none on this machine' if device.type in present else 'not supported'} "
                 f"(auto picks what there is)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        sys.exit(f"error: --device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~8x fp32 speed on Ampere+, same loss curves
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    why = f"--dtype {dtype}"
    if dtype == "auto":
        dtype, why = "float32", f"auto: fp32 on {device.type}"
        if device.type == "cuda":
            # native bf16 only: torch counts emulation too, which would give T4/V100 slow bf16, not fp16
            dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
            why = f"auto: {dtype} on this GPU"
        elif device.type == "cpu" and cpu_has_native_bf16():
            dtype, why = "bfloat16", "auto: bf16, this CPU has native bf16 matmuls (avx512_bf16 or amx_bf16)"
        elif device.type == "cpu":
            why = "auto: fp32, this CPU has no native bf16 (bf16 would be emulated and slower)"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))  # fp16 gradients underflow without it
    if device.type == "cpu" and sys.platform.startswith("linux"):
        # glibc serves every allocation over 32 MB (the (B*T, V) logits and their gradient) with a
        # fresh mmap, and gives freed heap memory back to the OS once over 1 GB of it is free at the
        # top, so each step page-faulted through hundreds of MB of zeroed memory (2026-12-01, default
        # model: about a third of an fp32 step, two thirds of a bf16 one). Keeping the buffers on the
        # heap and never trimming it makes such steps 1.5x (fp32) to 2.8x (bf16) faster; the process
        # keeps its peak memory, as training does anyway. mallopt(M_MMAP_MAX = -4, 0): no mmap; mallopt(M_TRIM_THRESHOLD = -1, -1): no trimming.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-4, 0)
            libc.mallopt(-1, -1)
    random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(device, dtype, scaler, rank, local_rank, world, why)


class _Method(nn.Module):
    """A model's method (scores, logprobs_of) as a module's forward: DDP hooks only forward."""

    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, *args, **kwargs):
        return getattr(self.model, self.name)(*args, **kwargs)


def data_parallel(model, rt, method=None, find_unused=False):
    """Under torchrun, the model (or its method, for a stage whose loss runs through model.scores or
    model.logprobs_of) wrapped in DistributedDataParallel, which averages the ranks' gradients during
    backward; in one process, the model or the method itself. find_unused: some trainable parameter is not
    in the loss (a reward model's untied lm_head), which DDP must be told. Evaluate and generate with the
    model itself: a DDP forward on rank 0 alone would wait for the others."""
    if not rt.ddp:
        return getattr(model, method) if method else model
    return DistributedDataParallel(_Method(model, method) if method else model, find_unused_parameters=find_unused,
                                   device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


# dense bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s; checked in order, so
# the more specific name comes first ("H100 PCIe" before "H100", "L40S" before "L40" before "L4")
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
                  ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
                  ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def peak_flops(device, dtype, seconds=0.5):
    """The FLOP/s that MFU is measured against: a datasheet figure for known GPUs, otherwise the
    measured rate of a large matmul in the training dtype on this machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops if dtype != torch.float32 else flops / 2  # TF32 runs at half the bf16 rate
    n = 1024
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    a = b = torch.full((n, n), 0.5, device=device, dtype=dtype)  # not randn: leave the seeded RNG alone
    a @ b
    sync()
    best = 0.0
    for _ in range(5):  # the best of 5 windows: a peak, so a window slowed by a noisy neighbour does not count
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            a @ b
            count += 1
        sync()
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - t0))
    return best
