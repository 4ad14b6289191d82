"""Forward-mode derivative (JVP) of masked attention in Triton, from the forward's logsumexp.

With S the masked, scaled scores, P = softmax(S) and O = P V, tangents dQ, dK, dV (and dB of a
float attn_mask, added to the scores) give

    dS = scale * (dQ K^T + Q dK^T) + dB        r = rowsum(P * dS)
    dO = (P * dS) V + P dV - r * O

(Q, K, dQ, dK over the query's head dim D; V, O, dV, dO over the value's, Dv). One program per
(query block, query head, batch) walks the key blocks its rows see, as the dQ kernel does: P is
recomputed from the forward's logsumexp (``recompute_probabilities``, every mask applied), so
no Lq x Lk matrix is written, where torch's math backend (the one torch SDPA kernel with a
forward-mode derivative) writes the scores, the probabilities and their tangents. The walk is
the dQ kernel's: the tile lists of block_lists.py with a boolean mask or key padding (EMPTY
tiles skipped, FULL ones without element-wise masks), else the interior tiles unmasked. Rows
that saw no key have lse = +inf, so P = 0 and their tangent is zero, as their output.

Not with dropout: the op leaves forward mode with dropout to torch's math backend.

Internal: the public op is ``fasttransformer.ops`` (issue 3).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fasttransformer.kernels.attention_backward import recompute_probabilities
from fasttransformer.kernels.attention_forward import (LOG2E, MASK_BOOL, MASK_FLOAT, batch_chunks, batch_slice, cdiv,
                                                       check_launch_sizes, dot_precision, int64_offsets,
                                                       interior_keys, key_range, list_arguments, list_segments,
                                                       load_tile, mask_arguments, output_like, segment_range,
                                                       store_tile, tile_pointers, uses_block_lists)


@triton.jit
def jvp_tile(acc, rowsum, q, tq, lse, k_base, v_base, tk_base, tv_base, mask_base, tmask_base, start_n, rows,
             offs_n, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_tkn, stride_tkd,
             stride_tvn, stride_tvd, stride_mm, stride_mn, stride_tmm, stride_tmn,
             seqlen_q, seqlen_k, head_dim, head_dim_v, batch, scale, scale_log2, causal_offset, window_left,
             window_right, KeyPadding, stride_pb, stride_pn,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
             HAS_KEY_PADDING: tl.constexpr, MASKED: tl.constexpr, MASK_TANGENT: tl.constexpr,
             DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) into this query block's (P * dS) V + P dV
    (``acc``) and rowsum(P * dS) (``rowsum``). MASKED=False: every key of the block is before
    seqlen_k and visible to every query (``tile_scores``)."""
    keys = start_n + offs_n  # checked against seqlen_k only on masked tiles
    k = load_tile(k_base, keys, offs_d, stride_kn, stride_kd, seqlen_k, head_dim, MASKED, True, INT64_OFFSETS)
    tk = load_tile(tk_base, keys, offs_d, stride_tkn, stride_tkd, seqlen_k, head_dim, MASKED, True, INT64_OFFSETS)
    p = recompute_probabilities(q, k, lse, rows, keys, seqlen_q, seqlen_k, batch, scale_log2,
                                causal_offset, window_left, window_right, mask_base, stride_mm, stride_mn, KeyPadding,
                                stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, MASKED,
                                DOT_PRECISION, INT64_OFFSETS)
    ds = tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION)
    ds = tl.dot(q, tl.trans(tk), ds, input_precision=DOT_PRECISION) * scale
    if MASK_TANGENT:  # the float mask's tangent, added to the scores as the mask is (after the scale)
        inside = (rows[:, None] < seqlen_q) & (keys[None, :] < seqlen_k)
        pointers = tile_pointers(tmask_base, rows, keys, stride_tmm, stride_tmn, INT64_OFFSETS)
        ds += tl.load(pointers, mask=inside, other=0.0).to(tl.float32)
    pds = tl.where(p > 0, p * ds, 0.0)  # a hidden key's tangents never reach the rows (0 * inf)
    rowsum += tl.sum(pds, 1)
    v = load_tile(v_base, keys, offs_dv, stride_vn, stride_vd, seqlen_k, head_dim_v, MASKED, True, INT64_OFFSETS)
    tv = load_tile(tv_base, keys, offs_dv, stride_tvn, stride_tvd, seqlen_k, head_dim_v, MASKED, True,
                   INT64_OFFSETS)
    acc = tl.dot(pds.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    acc = tl.dot(p.to(tv.dtype), tv, acc, input_precision=DOT_PRECISION)
    return acc, rowsum


@triton.jit
def attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, Out, Lse, TOut, Mask, TMask, KeyPadding, BlockCounts, BlockIndex,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tqb, stride_tqh, stride_tqm, stride_tqd,
    stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tob, stride_toh, stride_tom, stride_tod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_tmb, stride_tmh, stride_tmm, stride_tmn,
    stride_pb, stride_pn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    num_heads, kv_group, seqlen_q, seqlen_k, head_dim, head_dim_v,
    scale, scale_log2, causal_offset, window_left, window_right,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, MASK_TANGENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr, DV_DIFFERS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    if not DV_DIFFERS:  # Dv = D: one bound for both (as in the other kernels)
        head_dim_v = head_dim
    pid_m, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # grid (blocks, heads, batch)
    pid_bh = batch * num_heads + head
    kv_head = head // kv_group
    if INT64_OFFSETS:  # see attention_forward.int64_offsets
        batch, head, kv_head = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q + batch * stride_qb + head * stride_qh, rows, offs_d, stride_qm, stride_qd, seqlen_q, head_dim,
                  True, True, INT64_OFFSETS)
    tq = load_tile(TQ + batch * stride_tqb + head * stride_tqh, rows, offs_d, stride_tqm, stride_tqd, seqlen_q,
                   head_dim, True, True, INT64_OFFSETS)
    lse = tl.load(Lse + pid_bh * seqlen_q + rows, mask=rows < seqlen_q, other=float("inf"))
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    tk_base = TK + batch * stride_tkb + kv_head * stride_tkh
    tv_base = TV + batch * stride_tvb + kv_head * stride_tvh
    mask_base = Mask + batch * stride_mb + head * stride_mh  # read only with a mask
    tmask_base = TMask + batch * stride_tmb + head * stride_tmh  # read only with its tangent
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    rowsum = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Three segments of key blocks, masked / whole / masked, as in the dQ kernel.
    if SPARSE:
        index = BlockIndex + batch * stride_ib + head * stride_ih + pid_m * stride_im
        lo, full_lo, full_hi, hi = list_segments(BlockCounts + batch * stride_cb + head * stride_ch + pid_m * stride_cm)
        STEP: tl.constexpr = 1
    else:
        lo, hi = key_range(start_m, seqlen_k, causal_offset, window_left, window_right, CAUSAL, WINDOW,
                           BLOCK_M, BLOCK_N)
        full_lo, full_hi = interior_keys(start_m, lo, hi, seqlen_q, seqlen_k, causal_offset, window_left,
                                         window_right, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
        STEP: tl.constexpr = BLOCK_N
    for segment in tl.static_range(3):
        start, stop = segment_range(segment, lo, full_lo, full_hi, hi)
        if not (SPARSE and segment == 2):
            for position in range(start, stop, STEP):
                start_n = position
                if SPARSE:
                    start_n = tl.load(index + position) * BLOCK_N
                acc, rowsum = jvp_tile(acc, rowsum, q, tq, lse, k_base, v_base, tk_base, tv_base, mask_base,
                                       tmask_base, start_n, rows, offs_n, offs_d, offs_dv, stride_kn, stride_kd,
                                       stride_vn, stride_vd, stride_tkn, stride_tkd, stride_tvn, stride_tvd,
                                       stride_mm, stride_mn, stride_tmm, stride_tmn, seqlen_q, seqlen_k, head_dim,
                                       head_dim_v, batch, scale, scale_log2, causal_offset, window_left,
                                       window_right, KeyPadding, stride_pb, stride_pn, CAUSAL, WINDOW, MASK_KIND,
                                       HAS_KEY_PADDING, segment != 1, MASK_TANGENT, DOT_PRECISION, INT64_OFFSETS)

    out = load_tile(Out + batch * stride_ob + head * stride_oh, rows, offs_dv, stride_om, stride_od, seqlen_q,
                    head_dim_v, True, True, INT64_OFFSETS).to(tl.float32)
    tangent = acc - rowsum[:, None] * out
    store_tile(TOut + batch * stride_tob + head * stride_toh, rows, offs_dv, stride_tom, stride_tod, seqlen_q,
               head_dim_v, tangent.to(TOut.dtype.element_ty), INT64_OFFSETS)


def attention_jvp(query, key, value, out, lse, tangent_query=None, tangent_key=None, tangent_value=None, *,
                  attn_mask=None, key_padding_mask=None, tangent_mask=None, scale=None, causal_offset=None,
                  window=None, config=None):
    """The tangent of ``attention_forward``'s output (B, Hq, Lq, Dv), in the query's dtype and
    the output's layout, for the tangents of the query, key and value (None: zero) and of a
    float ``attn_mask`` (``tangent_mask``, broadcastable as the mask is). ``out`` and ``lse`` are
    the forward's outputs; the mask arguments are the forward's (no dropout). The kernel's
    config is ``configs.jvp_config`` (the dQ kernel's, whose walk it shares, but where it
    spills), or ``config`` (a ``configs.Config``). A batch above MAX_GRID_YZ takes one launch per
    chunk (``batch_chunks``)."""
    from fasttransformer.kernels.block_lists import build_block_lists
    from fasttransformer.kernels.configs import jvp_config, tile_head_dims

    batch, heads, seqlen_q, head_dim = query.shape
    kv_heads, seqlen_k, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    check_launch_sizes(batch, heads, seqlen_q, False)
    if tangent_mask is not None and (attn_mask is None or attn_mask.dtype == torch.bool):
        raise ValueError("tangent_mask needs a float attn_mask")

    def zero_if_none(tangent, primal):  # a zero tangent: one element, read through stride-0 views
        return primal.new_zeros(()).expand(primal.shape) if tangent is None else tangent

    tangent_query, tangent_key, tangent_value = (zero_if_none(tangent, primal) for tangent, primal in
                                                 ((tangent_query, query), (tangent_key, key), (tangent_value, value)))
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    lse = lse.contiguous()
    shape = (batch, heads, seqlen_q, seqlen_k)
    mask_kind, mask, mask_strides, padding, padding_strides = mask_arguments(attn_mask, key_padding_mask, shape, query)
    tmask, tmask_strides = query, (0, 0, 0, 0)
    if tangent_mask is not None:
        tmask = tangent_mask.expand(shape)
        tmask_strides = tmask.stride()
    tangent_out = output_like(query, head_dim_v)
    wide = int64_offsets(query, key, value, tangent_query, tangent_key, tangent_value, out, tangent_out, mask,
                         tmask, padding)
    if config is None:
        config = jvp_config(query.device, query.dtype, head_dim, wide, head_dim_v)
    block_d, block_dv = tile_head_dims("dq", query.device, query.dtype, head_dim, head_dim_v, False, wide)
    lists = None
    if uses_block_lists(attn_mask, key_padding_mask):
        lists, = build_block_lists(attn_mask if mask_kind == MASK_BOOL else None, key_padding_mask, shape,
                                   [(config.block_m, config.block_n, False)], causal_offset, window)
    counts, index, list_strides = list_arguments(lists, query)
    window_left, window_right = window if window is not None else (0, 0)
    per_batch = (query, key, value, tangent_query, tangent_key, tangent_value, out, lse, tangent_out, mask, tmask,
                 padding, counts, index)  # placeholders too
    strides = (*query.stride(), *key.stride(), *value.stride(), *tangent_query.stride(), *tangent_key.stride(),
               *tangent_value.stride(), *out.stride(), *tangent_out.stride(), *mask_strides, *tmask_strides,
               *padding_strides, *list_strides)
    for start, stop in batch_chunks(batch):  # one launch up to MAX_GRID_YZ sequences
        attention_jvp_kernel[(cdiv(seqlen_q, config.block_m), heads, stop - start)](
            *batch_slice(per_batch, start, stop, batch), *strides,
            heads, heads // kv_heads if kv_heads else 1, seqlen_q, seqlen_k, head_dim, head_dim_v,
            scale, scale * LOG2E, causal_offset or 0, window_left, window_right,
            CAUSAL=causal_offset is not None, WINDOW=window is not None, MASK_KIND=mask_kind,
            HAS_KEY_PADDING=key_padding_mask is not None, SPARSE=lists is not None,
            MASK_TANGENT=tangent_mask is not None and mask_kind == MASK_FLOAT, DOT_PRECISION=dot_precision(query),
            INT64_OFFSETS=wide, DV_DIFFERS=head_dim_v != head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=config.num_warps, num_stages=config.num_stages,
            enable_fp_fusion=True,
        )
    return tangent_out
