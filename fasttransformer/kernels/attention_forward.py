"""Masked flash-attention forward in Triton: online softmax, the Lq x Lk scores never stored.

One program computes a BLOCK_M x D tile of the output for one (batch, query head): it walks the
key blocks that its causal / window bounds leave (the others are never loaded), masks the scores
(sequence ends, causal, window, key padding, a boolean or float ``attn_mask`` read through its
strides, so broadcast dimensions cost nothing), and keeps running max / sum in base 2. A row
that sees no key ends with l = 0: its output is zeros and its logsumexp +inf (the backward then
gives it zero gradients). The logsumexp (natural log) is stored for the backward.

Internal: the public op (validation, dispatch, autograd) is ``fasttransformer.ops`` (issue 3).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
LOG2E = 1.4426950408889634


@triton.jit
def tile_scores(scores, rows, cols, seqlen_q, seqlen_k, batch, causal_offset, window_left, window_right,
                KeyPadding, stride_pb, stride_pn, mask_block,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_KEY_PADDING: tl.constexpr):
    """Scores (base-2 units) of one (rows x cols) tile with every mask applied: -inf where a
    query may not see a key. Shared by the forward and the backward kernels."""
    visible = (rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
    if WINDOW:
        visible = visible & (cols[None, :] >= rows[:, None] + causal_offset - window_left)
        visible = visible & (cols[None, :] <= rows[:, None] + causal_offset + window_right)
    if HAS_KEY_PADDING:
        padding = tl.load(KeyPadding + batch * stride_pb + cols * stride_pn, mask=cols < seqlen_k, other=1)
        visible = visible & (padding == 0)[None, :]
    if MASK_KIND == 1:
        visible = visible & (tl.load(mask_block, boundary_check=(0, 1), padding_option="zero") != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_block, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        scores = scores + bias * 1.4426950408889634
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def key_range(start_m, seqlen_k, causal_offset, window_left, window_right,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that queries [start_m, start_m + BLOCK_M) may see, lo a multiple of
    BLOCK_N: key blocks outside it are never loaded."""
    lo = tl.full([], 0, tl.int32)  # typed scalars: a Python int bound breaks the compiled loop
    hi = tl.full([], 0, tl.int32) + seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset)
    if WINDOW:
        lo = tl.maximum(0, start_m + causal_offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, start_m + BLOCK_M + causal_offset + window_right)
    return lo, hi


@triton.jit
def attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, KeyPadding,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    num_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    scale_log2,             # softmax scale * log2(e)
    causal_offset,          # query i is aligned with key i + causal_offset
    window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // kv_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < seqlen_q
    lo, hi = key_range(pid_m * BLOCK_M, seqlen_k, causal_offset, window_left, window_right,
                       CAUSAL, WINDOW, BLOCK_M, BLOCK_N)

    # Block pointers, not 2-D pointer tensors: the latter held 64-bit addresses per element and
    # pushed D = 64 to 255 registers (ptxas, sm_90).
    q_block = tl.make_block_ptr(Q + batch * stride_qb + head * stride_qh, shape=(seqlen_q, head_dim),
                                strides=(stride_qm, stride_qd), offsets=(pid_m * BLOCK_M, 0),
                                block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    q = tl.load(q_block, boundary_check=(0, 1), padding_option="zero")
    k_block = tl.make_block_ptr(K + batch * stride_kb + kv_head * stride_kh, shape=(head_dim, seqlen_k),
                                strides=(stride_kd, stride_kn), offsets=(0, lo),
                                block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    v_block = tl.make_block_ptr(V + batch * stride_vb + kv_head * stride_vh, shape=(seqlen_k, head_dim),
                                strides=(stride_vn, stride_vd), offsets=(lo, 0),
                                block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    mask_block = Mask  # unused without a mask
    if MASK_KIND != 0:
        mask_block = tl.make_block_ptr(Mask + batch * stride_mb + head * stride_mh, shape=(seqlen_q, seqlen_k),
                                       strides=(stride_mm, stride_mn), offsets=(pid_m * BLOCK_M, lo),
                                       block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(k_block, boundary_check=(0, 1), padding_option="zero")
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        scores = tile_scores(scores, offs_m, cols, seqlen_q, seqlen_k, batch, causal_offset, window_left,
                             window_right, KeyPadding, stride_pb, stride_pn, mask_block,
                             CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING)

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # Rows that have seen no key yet keep m = -inf: subtract 0 there instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_block, boundary_check=(0, 1), padding_option="zero")
        # Accumulate inside the dot: `acc * alpha + tl.dot(p, v)` holds a second BLOCK_M x D
        # float32 tile (at D = 128, BLOCK_M = 128, 8 warps: 468 bytes spilled on sm_90).
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_block = tl.advance(k_block, (0, BLOCK_N))
        v_block = tl.advance(v_block, (BLOCK_N, 0))
        if MASK_KIND != 0:
            mask_block = tl.advance(mask_block, (0, BLOCK_N))

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    o_block = tl.make_block_ptr(Out + batch * stride_ob + head * stride_oh, shape=(seqlen_q, head_dim),
                                strides=(stride_om, stride_od), offsets=(pid_m * BLOCK_M, 0),
                                block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    tl.store(o_block, out.to(Out.dtype.element_ty), boundary_check=(0, 1))
    tl.store(Lse + pid_bh * seqlen_q + offs_m, lse, mask=row_ok)


def mask_arguments(attn_mask, key_padding_mask, shape, placeholder):
    """(MASK_KIND, mask, its 4 strides, key padding, its 2 strides) for the kernels' arguments.
    The mask is a broadcast view (stride 0 where it broadcasts); bool tensors are reinterpreted
    as uint8 (same bytes). Absent tensors are replaced by ``placeholder`` (never read)."""
    if attn_mask is None:
        mask_kind, mask, mask_strides = MASK_NONE, placeholder, (0, 0, 0, 0)
    else:
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_FLOAT
        mask = attn_mask.expand(shape)
        if mask_kind == MASK_BOOL:
            mask = mask.view(torch.uint8)
        mask_strides = mask.stride()
    if key_padding_mask is None:
        return mask_kind, mask, mask_strides, placeholder, (0, 0)
    return mask_kind, mask, mask_strides, key_padding_mask.view(torch.uint8), key_padding_mask.stride()


def attention_forward(query, key, value, *, attn_mask=None, key_padding_mask=None, scale=None,
                      causal_offset=None, window=None, block_m=64, block_n=64, num_warps=4, num_stages=2):
    """Launches the kernel on already validated ``(B, H, L, D)`` tensors.

    attn_mask: bool (True = may attend) or float, already broadcastable to (B, Hq, Lq, Lk)
    (expanded views are fine: stride 0 dimensions are read in place). key_padding_mask: bool
    (B, Lk), True = padding. causal_offset: None (no causal mask) or the alignment: query i sees
    keys j <= i + causal_offset (0: top-left, Lk - Lq: lower-right). window: None or
    (left, right), relative to the same alignment (0 when not causal).
    Returns (out (B, Hq, Lq, D) in the query's dtype, lse (B, Hq, Lq) float32).
    """
    batch, heads, seqlen_q, head_dim = query.shape
    kv_heads, seqlen_k = key.shape[1], key.shape[2]
    out = torch.empty_like(query)
    lse = torch.empty(batch, heads, seqlen_q, device=query.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    mask_kind, mask, mask_strides, padding, padding_strides = mask_arguments(
        attn_mask, key_padding_mask, (batch, heads, seqlen_q, seqlen_k), query)
    window_left, window_right = window if window is not None else (0, 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(seqlen_q, block_m), batch * heads)
    attention_forward_kernel[grid](
        query, key, value, out, lse, mask, padding,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mask_strides, *padding_strides,
        heads, heads // kv_heads, seqlen_q, seqlen_k, head_dim,
        scale * LOG2E, causal_offset or 0, window_left, window_right,
        CAUSAL=causal_offset is not None, WINDOW=window is not None, MASK_KIND=mask_kind,
        HAS_KEY_PADDING=key_padding_mask is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse
