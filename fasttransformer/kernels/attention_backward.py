"""Masked flash-attention backward in Triton, FlashAttention-2 style, without atomics.

The probabilities are recomputed from the forward's logsumexp: P = exp(S - lse), with S the
masked, scaled scores (``tile_scores``, shared with the forward). Then, with
delta = rowsum(dO * O):

    dV = P^T dO        dS = P * (dO V^T - delta)        dK = scale * dS^T Q        dQ = scale * dS K

Two kernels, each owning what it writes, so the gradients are deterministic: one program per
(key block, batch, key head) sums dK and dV over the query blocks that can see it and over the
query heads of its GQA group; one program per (query block, batch, query head) sums dQ over
its visible key blocks. Rows that saw no key have lse = +inf, hence P = 0 and zero gradients.
The dK/dV kernel works on transposed tiles (S^T = K Q^T), so all its products have BLOCK_N rows.
Both kernels walk the tile lists of block_lists.py when a boolean mask or key padding is given
(EMPTY tiles skipped, FULL tiles without reading those masks). For a float attn_mask that
requires grad, the dQ kernel also writes dS, which is d(loss)/d(attn_mask).

Internal: the public op is ``fasttransformer.ops`` (issue 3).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fasttransformer.kernels.attention_forward import (LOG2E, MASK_BOOL, dot_precision, key_range, mask_arguments,
                                                       tile_scores)


@triton.jit
def recompute_probabilities(q, k, lse, rows, cols, seqlen_q, seqlen_k, batch, scale_log2, causal_offset,
                            window_left, window_right, mask_block, KeyPadding, stride_pb, stride_pn,
                            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                            HAS_KEY_PADDING: tl.constexpr, READ_MASKS: tl.constexpr,
                            DOT_PRECISION: tl.constexpr):
    """P = exp(S - lse) of one (rows x cols) tile, with the forward's masks (``tile_scores``),
    for the dQ kernel (the dK/dV kernel computes P^T)."""
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    scores = tile_scores(scores, rows, cols, seqlen_q, seqlen_k, batch, causal_offset, window_left,
                         window_right, KeyPadding, stride_pb, stride_pn, mask_block,
                         CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, READ_MASKS)
    return tl.exp2(scores - lse[:, None] * 1.4426950408889634)


@triton.jit
def dkdv_tile(dk, dv, k, v, q_base, do_base, mask_base, start_m, offs_m, offs_n, Lse, Delta, row_base,
              seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left, window_right,
              KeyPadding, stride_pb, stride_pn,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_KEY_PADDING: tl.constexpr, READ_MASKS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block [start_m, start_m + BLOCK_M) into this key block's (dK, dV), computed
    transposed (S^T = K Q^T, P^T, dP^T = V dO^T): every product then has BLOCK_N rows, so a
    BLOCK_M of 32 still runs on sm_90's wgmma (which needs 64 rows per warpgroup)."""
    rows = start_m + offs_m
    m_ok = rows < seqlen_q
    q = tl.load(tl.advance(q_base, (start_m, 0)), boundary_check=(0, 1), padding_option="zero")
    do = tl.load(tl.advance(do_base, (start_m, 0)), boundary_check=(0, 1), padding_option="zero")
    lse = tl.load(Lse + row_base + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
    mask_block = mask_base
    if MASK_KIND != 0:
        mask_block = tl.advance(mask_base, (0, start_m))
    scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
    scores = tile_scores(scores, rows, offs_n, seqlen_q, seqlen_k, batch, causal_offset, window_left,
                         window_right, KeyPadding, stride_pb, stride_pn, mask_block,
                         CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, READ_MASKS, True)
    p_t = tl.exp2(scores - lse[None, :] * 1.4426950408889634)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Mask, KeyPadding, BlockCounts, BlockIndex,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    num_heads, kv_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    scale, scale_log2, causal_offset, window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)

    k_block = tl.make_block_ptr(K + batch * stride_kb + kv_head * stride_kh, shape=(seqlen_k, head_dim),
                                strides=(stride_kn, stride_kd), offsets=(start_n, 0),
                                block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    v_block = tl.make_block_ptr(V + batch * stride_vb + kv_head * stride_vh, shape=(seqlen_k, head_dim),
                                strides=(stride_vn, stride_vd), offsets=(start_n, 0),
                                block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    k = tl.load(k_block, boundary_check=(0, 1), padding_option="zero")
    v = tl.load(v_block, boundary_check=(0, 1), padding_option="zero")
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Without lists: the queries that can see this key block, i >= j - causal_offset (causal),
    # i <= j - offset + left (window).
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
        q_base = tl.make_block_ptr(Q + batch * stride_qb + head * stride_qh, shape=(seqlen_q, head_dim),
                                   strides=(stride_qm, stride_qd), offsets=(0, 0),
                                   block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
        do_base = tl.make_block_ptr(DO + batch * stride_dob + head * stride_doh, shape=(seqlen_q, head_dim),
                                    strides=(stride_dom, stride_dod), offsets=(0, 0),
                                    block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
        mask_base = Mask  # unused without a mask; the transposed view (keys x queries) otherwise
        if MASK_KIND != 0:
            mask_base = tl.make_block_ptr(Mask + batch * stride_mb + head * stride_mh, shape=(seqlen_k, seqlen_q),
                                          strides=(stride_mn, stride_mm), offsets=(start_n, 0),
                                          block_shape=(BLOCK_N, BLOCK_M), order=(0, 1))
        row_base = (batch * num_heads + head) * seqlen_q
        if SPARSE:  # this key block's column of tiles, PARTIAL then FULL (block_lists.py)
            counts = BlockCounts + batch * stride_cb + head * stride_ch + pid_n * stride_cm
            index = BlockIndex + batch * stride_ib + head * stride_ih + pid_n * stride_im
            num_partial = tl.load(counts)
            num_full = tl.load(counts + 1)
            for i in range(0, num_partial):
                start_m = tl.load(index + i) * BLOCK_M
                dk, dv = dkdv_tile(dk, dv, k, v, q_base, do_base, mask_base, start_m, offs_m, offs_n, Lse, Delta,
                                   row_base, seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left,
                                   window_right, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND,
                                   HAS_KEY_PADDING, True, DOT_PRECISION)
            for i in range(num_partial, num_partial + num_full):
                start_m = tl.load(index + i) * BLOCK_M
                dk, dv = dkdv_tile(dk, dv, k, v, q_base, do_base, mask_base, start_m, offs_m, offs_n, Lse, Delta,
                                   row_base, seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left,
                                   window_right, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND,
                                   HAS_KEY_PADDING, False, DOT_PRECISION)
        else:
            for start_m in range(lo, hi, BLOCK_M):
                dk, dv = dkdv_tile(dk, dv, k, v, q_base, do_base, mask_base, start_m, offs_m, offs_n, Lse, Delta,
                                   row_base, seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left,
                                   window_right, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND,
                                   HAS_KEY_PADDING, True, DOT_PRECISION)

    # DK and DV have the layouts of K and V (the launcher allocates them so).
    dk_block = tl.make_block_ptr(DK + batch * stride_kb + kv_head * stride_kh, shape=(seqlen_k, head_dim),
                                 strides=(stride_kn, stride_kd), offsets=(start_n, 0),
                                 block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    dv_block = tl.make_block_ptr(DV + batch * stride_vb + kv_head * stride_vh, shape=(seqlen_k, head_dim),
                                 strides=(stride_vn, stride_vd), offsets=(start_n, 0),
                                 block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    tl.store(dk_block, (dk * scale).to(DK.dtype.element_ty), boundary_check=(0, 1))
    tl.store(dv_block, dv.to(DV.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, dbias_base, start_n, rows, offs_n,
            seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left, window_right,
            KeyPadding, stride_pb, stride_pn,
            CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
            HAS_KEY_PADDING: tl.constexpr, READ_MASKS: tl.constexpr, BIAS_GRAD: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) into this query block's dQ (and, for a float
    attn_mask that requires grad, the tile of its gradient dS)."""
    k = tl.load(tl.advance(k_base, (start_n, 0)), boundary_check=(0, 1), padding_option="zero")
    v = tl.load(tl.advance(v_base, (start_n, 0)), boundary_check=(0, 1), padding_option="zero")
    mask_block = mask_base
    if MASK_KIND != 0:
        mask_block = tl.advance(mask_base, (0, start_n))
    p = recompute_probabilities(q, k, lse, rows, start_n + offs_n, seqlen_q, seqlen_k, batch, scale_log2,
                                causal_offset, window_left, window_right, mask_block, KeyPadding, stride_pb,
                                stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, READ_MASKS, DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:  # d(loss)/d(bias) = dS: the bias is added after the scale
        tl.store(tl.advance(dbias_base, (0, start_n)), ds, boundary_check=(0, 1))
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Mask, KeyPadding, BlockCounts, BlockIndex, DBias,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    num_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    scale, scale_log2, causal_offset, window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, BIAS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_head = head // kv_group
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = rows < seqlen_q
    q_block = tl.make_block_ptr(Q + batch * stride_qb + head * stride_qh, shape=(seqlen_q, head_dim),
                                strides=(stride_qm, stride_qd), offsets=(start_m, 0),
                                block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    do_block = tl.make_block_ptr(DO + batch * stride_dob + head * stride_doh, shape=(seqlen_q, head_dim),
                                 strides=(stride_dom, stride_dod), offsets=(start_m, 0),
                                 block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    q = tl.load(q_block, boundary_check=(0, 1), padding_option="zero")
    do = tl.load(do_block, boundary_check=(0, 1), padding_option="zero")
    row_base = pid_bh * seqlen_q
    lse = tl.load(Lse + row_base + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
    k_base = tl.make_block_ptr(K + batch * stride_kb + kv_head * stride_kh, shape=(seqlen_k, head_dim),
                               strides=(stride_kn, stride_kd), offsets=(0, 0),
                               block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    v_base = tl.make_block_ptr(V + batch * stride_vb + kv_head * stride_vh, shape=(seqlen_k, head_dim),
                               strides=(stride_vn, stride_vd), offsets=(0, 0),
                               block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    mask_base = Mask  # unused without a mask
    if MASK_KIND != 0:
        mask_base = tl.make_block_ptr(Mask + batch * stride_mb + head * stride_mh, shape=(seqlen_q, seqlen_k),
                                      strides=(stride_mm, stride_mn), offsets=(start_m, 0),
                                      block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    dbias_base = DBias  # unused without a bias gradient
    if BIAS_GRAD:  # DBias: contiguous (B, Hq, Lq, Lk) float32, zero where no tile is visited
        dbias_base = tl.make_block_ptr(DBias + pid_bh.to(tl.int64) * seqlen_q * seqlen_k, shape=(seqlen_q, seqlen_k),
                                       strides=(seqlen_k, 1), offsets=(start_m, 0),
                                       block_shape=(BLOCK_M, BLOCK_N), order=(1, 0))
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        counts = BlockCounts + batch * stride_cb + head * stride_ch + pid_m * stride_cm
        index = BlockIndex + batch * stride_ib + head * stride_ih + pid_m * stride_im
        num_partial = tl.load(counts)
        num_full = tl.load(counts + 1)
        for i in range(0, num_partial):
            start_n = tl.load(index + i) * BLOCK_N
            dq = dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, dbias_base, start_n, rows, offs_n,
                         seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left, window_right,
                         KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, True,
                         BIAS_GRAD, DOT_PRECISION)
        for i in range(num_partial, num_partial + num_full):
            start_n = tl.load(index + i) * BLOCK_N
            dq = dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, dbias_base, start_n, rows, offs_n,
                         seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left, window_right,
                         KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, False,
                         BIAS_GRAD, DOT_PRECISION)
    else:
        lo, hi = key_range(start_m, seqlen_k, causal_offset, window_left, window_right, CAUSAL, WINDOW,
                           BLOCK_M, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            dq = dq_tile(dq, q, do, lse, delta, k_base, v_base, mask_base, dbias_base, start_n, rows, offs_n,
                         seqlen_q, seqlen_k, batch, scale_log2, causal_offset, window_left, window_right,
                         KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, True,
                         BIAS_GRAD, DOT_PRECISION)

    dq_block = tl.make_block_ptr(DQ + batch * stride_qb + head * stride_qh, shape=(seqlen_q, head_dim),
                                 strides=(stride_qm, stride_qd), offsets=(start_m, 0),
                                 block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    tl.store(dq_block, (dq * scale).to(DQ.dtype.element_ty), boundary_check=(0, 1))


def attention_backward(grad_out, query, key, value, out, lse, *, attn_mask=None, key_padding_mask=None,
                       scale=None, causal_offset=None, window=None, bias_grad=False, block_m=None, block_n=None,
                       num_warps=None, num_stages=None):
    """Gradients (dq, dk, dv, dbias) for ``attention_forward`` with the same mask arguments.

    ``out`` and ``lse`` are the forward's outputs. dk/dv have the key/value heads (GQA groups
    summed). ``bias_grad=True`` (a float attn_mask): dbias is the gradient of the attn_mask, in
    its shape and dtype (summed over its broadcast dimensions; computed through a float32
    (B, Hq, Lq, Lk) buffer); otherwise None. dq/dk/dv have the inputs' dtypes and strides
    (contiguous copies are made where the strides overlap). The two kernels take their configs
    from the table (configs.py); block_m/block_n/num_warps/num_stages override both.
    """
    from fasttransformer.kernels.attention_forward import list_arguments, uses_block_lists
    from fasttransformer.kernels.block_lists import block_lists, coarsen, tile_classes
    from fasttransformer.kernels.configs import backward_configs

    batch, heads, seqlen_q, head_dim = query.shape
    kv_heads, seqlen_k = key.shape[1], key.shape[2]
    overrides = {name: value for name, value in (("block_m", block_m), ("block_n", block_n),
                                                  ("num_warps", num_warps), ("num_stages", num_stages)) if value}
    dkdv_config, dq_config = (config._replace(**overrides) for config in
                              backward_configs(query.device, query.dtype, head_dim, causal_offset is not None))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    delta = (grad_out.float() * out.float()).sum(-1)  # (B, Hq, Lq)
    lse = lse.contiguous()
    bias_grad = bias_grad and attn_mask is not None and attn_mask.dtype != torch.bool

    def like(tensor):  # a gradient with the input's strides (the kernels store through them)
        grad = torch.empty_like(tensor)
        return (tensor, grad) if grad.stride() == tensor.stride() else (tensor.contiguous(), torch.empty_like(tensor.contiguous()))

    query, dq = like(query)
    key, dk = like(key)
    value, dv = like(value)
    shape = (batch, heads, seqlen_q, seqlen_k)
    mask_kind, mask, mask_strides, padding, padding_strides = mask_arguments(attn_mask, key_padding_mask, shape, query)
    by_query = by_key = None
    if uses_block_lists(attn_mask, key_padding_mask):
        # One classification at the smaller tiles, coarsened exactly for each kernel's tiles.
        fine_m, fine_n = min(dkdv_config.block_m, dq_config.block_m), min(dkdv_config.block_n, dq_config.block_n)
        classes = tile_classes(attn_mask if mask_kind == MASK_BOOL else None, key_padding_mask, shape,
                               fine_m, fine_n, causal_offset, window)
        by_key = block_lists(coarsen(classes, dkdv_config.block_m // fine_m, dkdv_config.block_n // fine_n),
                             batch, heads, by_key=True)
        by_query = block_lists(coarsen(classes, dq_config.block_m // fine_m, dq_config.block_n // fine_n),
                               batch, heads)
    dbias = torch.zeros(shape, device=query.device, dtype=torch.float32) if bias_grad else query
    window_left, window_right = window if window is not None else (0, 0)
    constants = dict(CAUSAL=causal_offset is not None, WINDOW=window is not None, MASK_KIND=mask_kind,
                     HAS_KEY_PADDING=key_padding_mask is not None, SPARSE=by_query is not None,
                     DOT_PRECISION=dot_precision(query),
                     BLOCK_D=max(16, triton.next_power_of_2(head_dim)))
    strides = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *mask_strides, *padding_strides)
    scalars = (scale, scale * LOG2E, causal_offset or 0, window_left, window_right)
    counts, index, list_strides = list_arguments(by_key, query)
    attention_backward_dkdv_kernel[(triton.cdiv(seqlen_k, dkdv_config.block_n), batch * kv_heads)](
        query, key, value, grad_out, lse, delta, dk, dv, mask, padding, counts, index, *strides, *list_strides,
        heads, kv_heads, heads // kv_heads, seqlen_q, seqlen_k, head_dim, *scalars, **constants,
        BLOCK_M=dkdv_config.block_m, BLOCK_N=dkdv_config.block_n, num_warps=dkdv_config.num_warps,
        num_stages=dkdv_config.num_stages)
    counts, index, list_strides = list_arguments(by_query, query)
    attention_backward_dq_kernel[(triton.cdiv(seqlen_q, dq_config.block_m), batch * heads)](
        query, key, value, grad_out, lse, delta, dq, mask, padding, counts, index, dbias, *strides, *list_strides,
        heads, heads // kv_heads, seqlen_q, seqlen_k, head_dim, *scalars, BIAS_GRAD=bias_grad, **constants,
        BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n, num_warps=dq_config.num_warps,
        num_stages=dq_config.num_stages)
    if not bias_grad:
        return dq, dk, dv, None
    return dq, dk, dv, dbias.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
