"""Masked flash-attention backward in Triton, FlashAttention-2 style, without atomics.

The probabilities are recomputed from the forward's logsumexp: P = exp(S - lse), with S the
masked, scaled scores (``tile_scores``, shared with the forward). Then, with
delta = rowsum(dO * O):

    dV = P^T dO        dS = P * (dO V^T - delta)        dK = scale * dS^T Q        dQ = scale * dS K

Two kernels, each owning what it writes, so the gradients are deterministic: one program per
(key block, batch, key head) sums dK and dV over the query blocks that can see it and over the
query heads of its GQA group; one program per (query block, batch, query head) sums dQ over
its visible key blocks. Rows that saw no key have lse = +inf, hence P = 0 and zero gradients.

Internal: the public op is ``fasttransformer.ops`` (issue 3).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fasttransformer.kernels.attention_forward import LOG2E, key_range, mask_arguments, tile_scores


@triton.jit
def recompute_probabilities(q, k, lse, rows, cols, start_m, start_n, batch, head, seqlen_q, seqlen_k,
                            scale_log2, causal_offset, window_left, window_right,
                            Mask, stride_mb, stride_mh, stride_mm, stride_mn, KeyPadding, stride_pb, stride_pn,
                            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                            HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """P = exp(S - lse) of one (rows x cols) tile, with the forward's masks (``tile_scores``).
    Shared by both backward kernels. dP is left to the callers: computed here, before dV's
    product, it raised the dK/dV kernel's spills from 272 to 336 bytes (sm_90)."""
    mask_block = Mask  # unused without a mask
    if MASK_KIND != 0:
        mask_block = tl.make_block_ptr(Mask + batch * stride_mb + head * stride_mh, shape=(seqlen_q, seqlen_k),
                                       strides=(stride_mm, stride_mn), offsets=(start_m, start_n),
                                       block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    scores = tile_scores(scores, rows, cols, seqlen_q, seqlen_k, batch, causal_offset, window_left,
                         window_right, KeyPadding, stride_pb, stride_pn, mask_block,
                         CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING)
    return tl.exp2(scores - lse[:, None] * 1.4426950408889634)


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, KeyPadding,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    num_heads, kv_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    scale, scale_log2, causal_offset, window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen_k
    d_ok = offs_d < head_dim

    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Queries that can see this key block: i >= j - causal_offset (causal), i <= j - offset + left (window).
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + seqlen_q
    if CAUSAL:
        lo = tl.maximum(lo, start_n - causal_offset)
    if WINDOW:
        lo = tl.maximum(lo, start_n - causal_offset - window_right)
        hi = tl.minimum(hi, start_n + BLOCK_N - causal_offset + window_left)
    lo = (lo // BLOCK_M) * BLOCK_M

    for group in range(0, kv_group):
        head = kv_head * kv_group + group
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DO + batch * stride_dob + head * stride_doh
        row_base = (batch * num_heads + head) * seqlen_q
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            m_ok = rows < seqlen_q
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(Lse + row_base + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
            p = recompute_probabilities(
                q, k, lse, rows, offs_n, start_m, start_n, batch, head, seqlen_q, seqlen_k,
                scale_log2, causal_offset, window_left, window_right, Mask, stride_mb, stride_mh, stride_mm,
                stride_mn, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING,
                DOT_PRECISION, BLOCK_M, BLOCK_N)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)

    # DK and DV have the layouts of K and V (the launcher allocates them so).
    tl.store(DK + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, KeyPadding,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    num_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    scale, scale_log2, causal_offset, window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // kv_group
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = rows < seqlen_q
    d_ok = offs_d < head_dim
    q_mask = m_ok[:, None] & d_ok[None, :]
    q_offsets = rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(Q + batch * stride_qb + head * stride_qh + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    row_base = pid_bh * seqlen_q
    lse = tl.load(Lse + row_base + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi = key_range(start_m, seqlen_k, causal_offset, window_left, window_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < seqlen_k)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        p = recompute_probabilities(
            q, k, lse, rows, cols, start_m, start_n, batch, head, seqlen_q, seqlen_k,
            scale_log2, causal_offset, window_left, window_right, Mask, stride_mb, stride_mh, stride_mm,
            stride_mn, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING,
            DOT_PRECISION, BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)

    tl.store(DQ + batch * stride_qb + head * stride_qh + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def attention_backward(grad_out, query, key, value, out, lse, *, attn_mask=None, key_padding_mask=None,
                       scale=None, causal_offset=None, window=None, block_m=64, block_n=64, num_warps=4,
                       num_stages=1):
    """Gradients (dq, dk, dv) for ``attention_forward`` with the same mask arguments.

    ``out`` and ``lse`` are the forward's outputs. dk/dv have the key/value heads (GQA groups
    summed). Returns tensors in the inputs' dtypes; dk/dv/dq strides follow q/k (contiguous
    copies are made for the outputs).
    """
    batch, heads, seqlen_q, head_dim = query.shape
    kv_heads, seqlen_k = key.shape[1], key.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Hq, Lq)
    lse = lse.contiguous()

    def like(tensor):  # a gradient with the input's strides (the kernels store through them)
        grad = torch.empty_like(tensor)
        return (tensor, grad) if grad.stride() == tensor.stride() else (tensor.contiguous(), torch.empty_like(tensor.contiguous()))

    query, dq = like(query)
    key, dk = like(key)
    value, dv = like(value)
    mask_kind, mask, mask_strides, padding, padding_strides = mask_arguments(
        attn_mask, key_padding_mask, (batch, heads, seqlen_q, seqlen_k), query)
    window_left, window_right = window if window is not None else (0, 0)
    constants = dict(CAUSAL=causal_offset is not None, WINDOW=window is not None, MASK_KIND=mask_kind,
                     HAS_KEY_PADDING=key_padding_mask is not None,
                     DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                     num_warps=num_warps, num_stages=num_stages)
    strides = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *mask_strides, *padding_strides)
    scalars = (scale, scale * LOG2E, causal_offset or 0, window_left, window_right)
    attention_backward_dkdv_kernel[(triton.cdiv(seqlen_k, block_n), batch * kv_heads)](
        query, key, value, grad_out, lse, delta, dk, dv, mask, padding, *strides,
        heads, kv_heads, heads // kv_heads, seqlen_q, seqlen_k, head_dim, *scalars, **constants)
    attention_backward_dq_kernel[(triton.cdiv(seqlen_q, block_m), batch * heads)](
        query, key, value, grad_out, lse, delta, dq, mask, padding, *strides,
        heads, heads // kv_heads, seqlen_q, seqlen_k, head_dim, *scalars, **constants)
    return dq, dk, dv
