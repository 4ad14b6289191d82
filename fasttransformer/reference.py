"""The model of "Attention Is All You Need" (Vaswani et al., 2017) in plain, readable PyTorch.

This is the ground truth every fasttransformer test checks against, run in float64. It favours
clarity over speed: every mask is built as a dense boolean matrix and every softmax is explicit.
It is itself checked against ``torch.nn.Transformer`` and torch's SDPA (tests/test_reference.py).

Mask conventions follow the API each function mirrors:
- ``scaled_dot_product_attention`` (as ``fasttransformer.ops`` / ``torch.nn.functional``): a bool
  ``attn_mask`` is True where a query **may** attend; ``key_padding_mask`` is True at padding.
- the modules (as ``torch.nn``): a bool ``attn_mask`` is True where attention is **not** allowed,
  a float one is added; ``key_padding_mask`` is True at padding.
A query row that sees no key gets zeros (torch's math path gives NaN there).
The modules take batch-first inputs ``(B, L, d)``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


# --- Embeddings ----------------------------------------------------------------------------

def sinusoidal_inverse_frequencies(dim: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """``1 / 10000^(2i/d)`` for ``i = 0 .. d/2 - 1``."""
    return 10000.0 ** (-torch.arange(0, dim, 2, dtype=dtype, device=device) / dim)


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``P[..., 2i] = sin(p / 10000^(2i/d))``, ``P[..., 2i+1] = cos(p / 10000^(2i/d))``.

    ``positions``: integer tensor of any shape; returns ``positions.shape + (dim,)`` in float64.
    """
    angle = positions.to(torch.float64)[..., None] * sinusoidal_inverse_frequencies(dim, device=positions.device)
    return torch.stack((torch.sin(angle), torch.cos(angle)), dim=-1).flatten(-2)  # sin, cos, sin, ...


def token_positional_embedding(input_ids: torch.Tensor, weight: torch.Tensor,
                               pos_weight: Optional[torch.Tensor] = None, *, scale: float = 1.0,
                               start_pos: Union[int, torch.Tensor] = 0,
                               dropout_mask: Optional[torch.Tensor] = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """``weight[input_ids] * scale + P[start_pos + t]``, then ``dropout_mask / (1 - dropout_p)``.

    ``start_pos``: int or ``(B,)`` tensor. ``dropout_mask``: bool ``(B, L, d)``, True = kept.
    """
    batch, seq_len = input_ids.shape
    starts = torch.as_tensor(start_pos, device=input_ids.device).reshape(-1, 1)
    positions = (starts + torch.arange(seq_len, device=input_ids.device)).expand(batch, seq_len)
    if pos_weight is None:
        encoding = sinusoidal_positions(positions, weight.shape[1]).to(weight.dtype)
    else:
        encoding = pos_weight[positions]
    out = weight[input_ids] * scale + encoding
    if dropout_mask is not None:
        out = out * dropout_mask / (1.0 - dropout_p) if dropout_p < 1.0 else torch.zeros_like(out)
    return out


# --- Attention -----------------------------------------------------------------------------

def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *,
                                 key_padding_mask: Optional[torch.Tensor] = None,
                                 dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask) V`` on ``(B, H, L, D)`` tensors.

    ``attn_mask``: bool (True = may attend) or float (added), broadcastable to
    ``(B, Hq, Lq, Lk)``. ``is_causal``: query i sees keys ``j <= i`` (top-left). ``key_padding_mask``:
    bool ``(B, Lk)``, True = padding. ``dropout_mask``: bool ``(B, Hq, Lq, Lk)``, True = kept,
    applied to the probabilities with ``1 / (1 - dropout_p)``. Fully masked rows give zeros.
    """
    if enable_gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    allowed = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row whose scores are all -inf sees no key: its probabilities are zero, not NaN.
    no_key = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(no_key, 0.0), dim=-1).masked_fill(no_key, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p) if dropout_p < 1.0 else torch.zeros_like(probs)
    return probs @ value


class MultiheadAttention(nn.Module):
    """Multi-head attention with the parameters (and state_dict keys) of torch.nn.MultiheadAttention."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False):
        batch, seq_q, _ = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3

        def heads(x, w, b):  # (B, L, d) -> (B, H, L, d / H)
            return F.linear(x, w, b).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        def additive(mask):  # torch.nn convention (bool True = not allowed) -> float to add
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(mask, float("-inf"))
            return mask.to(query.dtype)

        bias = None
        if attn_mask is not None:
            bias = additive(attn_mask)
            if bias.dim() == 3:  # (B * H, Lq, Lk), as torch.nn
                bias = bias.view(batch, self.num_heads, seq_q, -1)
        if key_padding_mask is not None:
            padding = additive(key_padding_mask)[:, None, None, :]
            bias = padding if bias is None else bias + padding
        out = scaled_dot_product_attention(
            heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
            attn_mask=bias, is_causal=is_causal,
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TransformerEncoderLayer(nn.Module):
    """Self-attention and a ReLU feed-forward block, each with a residual and LayerNorm."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, layer_norm_eps=1e-5, norm_first=False,
                 bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, nhead, bias=bias, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        def attend(x):
            return self.self_attn(x, x, x, key_padding_mask=src_key_padding_mask,
                                  attn_mask=src_mask, is_causal=is_causal)

        def feed_forward(x):
            return self.linear2(F.relu(self.linear1(x)))

        if self.norm_first:
            src = src + attend(self.norm1(src))
            return src + feed_forward(self.norm2(src))
        src = self.norm1(src + attend(src))
        return self.norm2(src + feed_forward(src))


class TransformerDecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder (cross) attention and a feed-forward block."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, layer_norm_eps=1e-5, norm_first=False,
                 bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm_first = norm_first
        self.self_attn = MultiheadAttention(d_model, nhead, bias=bias, **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, bias=bias, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        def self_attend(x):
            return self.self_attn(x, x, x, key_padding_mask=tgt_key_padding_mask,
                                  attn_mask=tgt_mask, is_causal=tgt_is_causal)

        def cross_attend(x):
            return self.multihead_attn(x, memory, memory, key_padding_mask=memory_key_padding_mask,
                                       attn_mask=memory_mask, is_causal=memory_is_causal)

        def feed_forward(x):
            return self.linear2(F.relu(self.linear1(x)))

        if self.norm_first:
            tgt = tgt + self_attend(self.norm1(tgt))
            tgt = tgt + cross_attend(self.norm2(tgt))
            return tgt + feed_forward(self.norm3(tgt))
        tgt = self.norm1(tgt + self_attend(tgt))
        tgt = self.norm2(tgt + cross_attend(tgt))
        return self.norm3(tgt + feed_forward(tgt))


class Transformer(nn.Module):
    """Encoder and decoder stacks, each closed by a LayerNorm (torch.nn.Transformer's layout)."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, layer_norm_eps=1e-5, norm_first=False, bias=True,
                 device=None, dtype=None):
        super().__init__()
        layer = {"d_model": d_model, "nhead": nhead, "dim_feedforward": dim_feedforward,
                 "layer_norm_eps": layer_norm_eps, "norm_first": norm_first, "bias": bias,
                 "device": device, "dtype": dtype}
        norm = {"eps": layer_norm_eps, "bias": bias, "device": device, "dtype": dtype}
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(TransformerEncoderLayer(**layer) for _ in range(num_encoder_layers))
        self.encoder.norm = nn.LayerNorm(d_model, **norm)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(TransformerDecoderLayer(**layer) for _ in range(num_decoder_layers))
        self.decoder.norm = nn.LayerNorm(d_model, **norm)

    def encode(self, src, src_mask=None, src_key_padding_mask=None):
        for layer in self.encoder.layers:
            src = layer(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask)
        return self.encoder.norm(src)

    def decode(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
               memory_key_padding_mask=None, tgt_is_causal=False):
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask,
                        memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal)
        return self.decoder.norm(tgt)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None,
                src_key_padding_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False):
        memory = self.encode(src, src_mask, src_key_padding_mask)
        return self.decode(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask,
                           memory_key_padding_mask, tgt_is_causal)


class Seq2Seq(nn.Module):
    """The paper's translation model: scaled token embeddings plus the sinusoidal encoding,
    the Transformer, and a linear projection to the target vocabulary. Padding tokens
    (``pad_id``) are masked as keys, except the first target token (the start token, which may be
    ``pad_id``); the decoder's self-attention is causal."""

    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, nhead=8, num_encoder_layers=6,
                 num_decoder_layers=6, dim_feedforward=2048, pad_id=0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.pad_id, self.d_model = pad_id, d_model
        self.src_embedding = nn.Parameter(torch.randn(src_vocab_size, d_model, **factory) * d_model ** -0.5)
        self.tgt_embedding = nn.Parameter(torch.randn(tgt_vocab_size, d_model, **factory) * d_model ** -0.5)
        self.transformer = Transformer(d_model, nhead, num_encoder_layers, num_decoder_layers,
                                       dim_feedforward, **factory)
        self.output_projection = nn.Linear(d_model, tgt_vocab_size, **factory)

    def forward(self, src_ids, tgt_ids):
        scale = math.sqrt(self.d_model)
        src = token_positional_embedding(src_ids, self.src_embedding, scale=scale)
        tgt = token_positional_embedding(tgt_ids, self.tgt_embedding, scale=scale)
        memory = self.transformer.encode(src, src_key_padding_mask=src_ids == self.pad_id)
        tgt_padding = (tgt_ids == self.pad_id) & (torch.arange(tgt_ids.shape[1], device=tgt_ids.device) > 0)
        out = self.transformer.decode(tgt, memory, tgt_key_padding_mask=tgt_padding,
                                      memory_key_padding_mask=src_ids == self.pad_id,
                                      tgt_is_causal=True)
        return self.output_projection(out)
