"""Masked flash-attention forward in Triton: online softmax, the Lq x Lk scores never stored.

One program computes a BLOCK_M x Dv tile of the output for one (batch, query head) (Dv the value's
head dim, D the query's and key's: usually equal, each padded to its own tile): it walks the
key blocks that its causal / window bounds leave (the others are never loaded), masks the scores
(sequence ends, causal, window, key padding, a boolean or float ``attn_mask`` read through its
strides, so broadcast dimensions cost nothing), and keeps running max / sum in base 2. Key
blocks that every query of the tile sees whole (``interior_keys``; FULL tiles of the lists)
are computed without element-wise masks: only the tiles a bound crosses pay for them. A row
that sees no key ends with l = 0: its output is zeros and its logsumexp +inf (the backward then
gives it zero gradients). The logsumexp (natural log) is stored for the backward.

Dropout (``dropout_p > 0``) drops probabilities after the softmax's normalisation: the sum l
counts every probability, the product with V only the kept ones, scaled by 1 / (1 - p). Whether
(batch, query head, query i, key j) is kept is a Philox draw (``dropout_keep``) keyed by a
64-bit seed that the launcher takes from a tensor (drawn from torch's generator by the public
op), with counters (j // 8, i, batch * Hq + head, 0): a pure function of the element, so the
backward regenerates the same mask in any tile shape or orientation, and nothing of size
Lq x Lk is stored.

Split keys (SPLIT_KEYS, flash-decoding): when a call has too few programs to fill the GPU (a
decoding step), each query block's key tiles are shared out between ``num_splits`` programs
(contiguous runs of its key blocks, or of its tile list), which write float32 partial outputs
and base-2 logsumexps; ``attention_combine_kernel`` merges them.

Internal: the public op (validation, dispatch, autograd) is ``fasttransformer.ops`` (issue 3).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from fasttransformer.kernels.block_lists import CLASS_ROWS

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
LOG2E = 1.4426950408889634


@triton.jit
def tile_pointers(base, rows, cols, stride_r, stride_c, INT64_OFFSETS: tl.constexpr):
    """Pointers to the (len(rows), len(cols)) tile ``base + rows[:, None] * stride_r + cols[None, :]
    * stride_c``. Offsets are int32 (every offset into a tensor of fewer than 2**31 elements fits)
    but with INT64_OFFSETS (``int64_offsets``), where one (batch, head) slice may be larger."""
    if INT64_OFFSETS:
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    return base + rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def tile_bounds(rows, cols, num_rows, num_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """The tile's elements inside [0, num_rows) x [0, num_cols), on the dimensions checked (at
    least one); the rows and columns are never negative."""
    if CHECK_ROWS and CHECK_COLS:
        inside = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    elif CHECK_ROWS:
        inside = rows[:, None] < num_rows
    else:
        inside = cols[None, :] < num_cols
    return inside


@triton.jit
def load_tile(base, rows, cols, stride_r, stride_c, num_rows, num_cols, CHECK_ROWS: tl.constexpr,
              CHECK_COLS: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """The tile of a 2-D (num_rows, num_cols) view at ``base`` with those strides, zeros outside
    it on the dimensions checked. Plain pointer arithmetic, what Triton lowered block pointers to
    on NVIDIA GPUs: Triton 3.9 (torch 2.15's) removed ``tl.make_block_ptr``."""
    pointers = tile_pointers(base, rows, cols, stride_r, stride_c, INT64_OFFSETS)
    return tl.load(pointers, mask=tile_bounds(rows, cols, num_rows, num_cols, CHECK_ROWS, CHECK_COLS), other=0.0)


@triton.jit
def store_tile(base, rows, cols, stride_r, stride_c, num_rows, num_cols, value, INT64_OFFSETS: tl.constexpr):
    """Stores ``value`` into the tile of a 2-D (num_rows, num_cols) view, inside it only."""
    pointers = tile_pointers(base, rows, cols, stride_r, stride_c, INT64_OFFSETS)
    tl.store(pointers, value, mask=tile_bounds(rows, cols, num_rows, num_cols, True, True))


@triton.jit
def packed_row_pointers(base, heads, queries, cols, stride_h, stride_m, stride_c, INT64_OFFSETS: tl.constexpr):
    """Pointers to the rows (heads[r], queries[r]) of a (B, H, L, D) tensor's (batch) slice at
    ``base``, columns ``cols``: a packed GQA block's rows (PACK_GQA)."""
    if INT64_OFFSETS:
        heads, queries, cols = heads.to(tl.int64), queries.to(tl.int64), cols.to(tl.int64)
    return base + (heads * stride_h + queries * stride_m)[:, None] + cols[None, :] * stride_c


@triton.jit
def load_packed_rows(base, heads, queries, rows_ok, cols, stride_h, stride_m, stride_c, num_cols,
                     INT64_OFFSETS: tl.constexpr):
    """``load_tile`` of a packed GQA block's rows (``packed_row_pointers``), zeros outside."""
    pointers = packed_row_pointers(base, heads, queries, cols, stride_h, stride_m, stride_c, INT64_OFFSETS)
    return tl.load(pointers, mask=rows_ok[:, None] & (cols[None, :] < num_cols), other=0.0)


@triton.jit
def store_packed_rows(base, heads, queries, rows_ok, cols, stride_h, stride_m, stride_c, num_cols, value,
                      INT64_OFFSETS: tl.constexpr):
    """``store_tile`` into a packed GQA block's rows (``packed_row_pointers``), inside only."""
    pointers = packed_row_pointers(base, heads, queries, cols, stride_h, stride_m, stride_c, INT64_OFFSETS)
    tl.store(pointers, value, mask=rows_ok[:, None] & (cols[None, :] < num_cols))


@triton.jit
def tile_scores(scores, rows, cols, seqlen_q, seqlen_k, batch, causal_offset, window_left, window_right,
                KeyPadding, stride_pb, stride_pn, mask_base, stride_mm, stride_mn,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_KEY_PADDING: tl.constexpr, MASKED: tl.constexpr, INT64_OFFSETS: tl.constexpr,
                TRANSPOSED: tl.constexpr = False):
    """Scores (base-2 units) of one (rows x cols) tile with every mask applied: -inf where a
    query may not see a key. Shared by the forward and the backward kernels. MASKED=False: the
    tile is known to be all visible (an interior tile, see ``interior_keys``, or a FULL one of
    block_lists.py): no element-wise mask is applied, not even the sequence ends, and the
    boolean attn_mask and key padding are not read. A float attn_mask is always added.
    ``mask_base``: this (batch, head)'s attn_mask, read through its strides (0 where it
    broadcasts). TRANSPOSED: the tile is (keys x queries), S^T."""
    if TRANSPOSED:
        query_index = rows[None, :]
        key_index = cols[:, None]
    else:
        query_index = rows[:, None]
        key_index = cols[None, :]
    if MASK_KIND != 0:
        if INT64_OFFSETS:
            mask_pointers = mask_base + query_index.to(tl.int64) * stride_mm + key_index.to(tl.int64) * stride_mn
        else:
            mask_pointers = mask_base + query_index * stride_mm + key_index * stride_mn
        mask_inside = (query_index < seqlen_q) & (key_index < seqlen_k)
    if MASK_KIND == 2:
        bias = tl.load(mask_pointers, mask=mask_inside, other=0.0).to(tl.float32)
        scores = scores + bias * 1.4426950408889634
    if MASKED:
        visible = (query_index < seqlen_q) & (key_index < seqlen_k)
        if CAUSAL:
            visible = visible & (key_index <= query_index + causal_offset)
        if WINDOW:
            visible = visible & (key_index >= query_index + causal_offset - window_left)
            visible = visible & (key_index <= query_index + causal_offset + window_right)
        if HAS_KEY_PADDING:
            padding = tl.load(KeyPadding + batch * stride_pb + key_index * stride_pn, mask=key_index < seqlen_k,
                              other=1)
            visible = visible & (padding == 0)
        if MASK_KIND == 1:
            visible = visible & (tl.load(mask_pointers, mask=mask_inside, other=0) != 0)
        scores = tl.where(visible, scores, float("-inf"))
    return scores


@triton.jit
def interior_keys(start_m, end_m, lo, hi, seqlen_q, seqlen_k, causal_offset, window_left, window_right,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """[full_lo, full_hi), multiples of BLOCK_N with lo <= full_lo <= full_hi <= hi: the key
    blocks within [lo, hi) that every query of [start_m, end_m) before seqlen_q sees
    whole (no key past seqlen_k, inside the causal and window bounds). The forward and dQ
    kernels visit them with MASKED=False; the rows past seqlen_q are never stored."""
    full_lo = lo
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if CAUSAL:  # every key j <= start_m + causal_offset
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    if WINDOW:  # every key j in [last row + offset - left, start_m + offset + right]
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + causal_offset + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
        last_row = tl.minimum(end_m, seqlen_q) - 1
        first = tl.maximum(last_row + causal_offset - window_left, 0)
        full_lo = tl.maximum(full_lo, ((first + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return full_lo, full_hi


@triton.jit
def list_segments(counts):
    """(lo, full_lo, full_hi, hi): the three segments of one row of the tile lists
    (block_lists.py), as positions in it: [lo, full_lo) its PARTIAL tiles (masked), [full_lo,
    full_hi) its FULL ones (whole), and an empty third."""
    full_lo = tl.load(counts)
    full_hi = full_lo + tl.load(counts + 1)
    return tl.zeros([], tl.int32), full_lo, full_hi, full_hi


@triton.jit
def segment_range(SEGMENT: tl.constexpr, lo, full_lo, full_hi, hi):
    """[start, stop) of segment 0 (masked, before the whole tiles), 1 (the whole tiles: no
    element-wise mask) or 2 (masked, after them)."""
    start = lo
    stop = full_lo
    if SEGMENT == 1:
        start = full_lo
        stop = full_hi
    if SEGMENT == 2:
        start = full_hi
        stop = hi
    return start, stop


@triton.jit
def interior_queries(start_n, lo, hi, seqlen_q, seqlen_k, causal_offset, window_left, window_right,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[full_lo, full_hi) with lo <= full_lo <= full_hi <= hi, full_lo a multiple of BLOCK_M: the
    query blocks within [lo, hi) that see every key of [start_n, start_n + BLOCK_N) before
    seqlen_k (the dK/dV kernel's interior tiles). Rows past seqlen_q need no mask there: their
    lse is +inf, so they add nothing to dK and dV; keys past seqlen_k are never stored."""
    full_lo = lo
    full_hi = hi
    last_key = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    if CAUSAL:  # every query i >= last_key - causal_offset
        first = tl.maximum(last_key - causal_offset, 0)
        full_lo = tl.maximum(full_lo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    if WINDOW:  # every query i in [last_key - offset - right, start_n - offset + left]
        first = tl.maximum(last_key - causal_offset - window_right, 0)
        full_lo = tl.maximum(full_lo, ((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        last = start_n - causal_offset + window_left  # the last query that sees key start_n
        below = (tl.maximum(last + 1, 0) // BLOCK_M) * BLOCK_M
        full_hi = tl.where(seqlen_q - 1 <= last, full_hi, tl.minimum(full_hi, below))
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return full_lo, full_hi


DROPOUT_BITS = 16  # one draw per element: p is rounded to a multiple of 2**-16


@triton.jit
def dropout_keep(seed, head_row, start_m, start_n, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUNDS: tl.constexpr = 7):
    """(BLOCK_M, BLOCK_N) bool, True where the probability of query start_m + i and key
    start_n + j survives dropout (start_n a multiple of 8).

    One Philox-4x32 call (``ROUNDS`` rounds; 7 passes BigCrush, Salmon et al. 2011, and is what
    FlashAttention uses), keyed by ``seed``, with counters (key group g = j // 8, query i,
    head_row = batch * Hq + head, 0), gives four 32-bit words w0..w3: eight 16-bit draws for
    keys 8g .. 8g + 7, in the order (w0 low, w0 high, w2 low, w2 high, w1 low, w1 high, w3 low,
    w3 high). A draw keeps when it is >= threshold = round(p * 2**16). Eight draws per call
    keep the Philox state at half a register per element (one draw per call needed four, and
    spilled)."""
    rows = start_m + tl.arange(0, BLOCK_M)[:, None]
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)[None, :]
    zero = (rows * 0 + groups * 0).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, zero + groups.to(tl.uint32), zero + rows.to(tl.uint32),
                               zero + head_row.to(tl.uint32), zero, ROUNDS)
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # [..., a, b] = w(a + 2b)
    draws = tl.join(words & 0xFFFF, words >> 16)  # [..., a, b, h]: half h of w(a + 2b)
    return tl.reshape(draws, (BLOCK_M, BLOCK_N)).to(tl.int32) >= threshold


@triton.jit
def key_range(start_m, end_m, seqlen_k, causal_offset, window_left, window_right,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that queries [start_m, end_m) may see, lo a multiple of BLOCK_N: key
    blocks outside it are never loaded."""
    lo = tl.full([], 0, tl.int32)  # typed scalars: a Python int bound breaks the compiled loop
    hi = tl.full([], 0, tl.int32) + seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, end_m + causal_offset)
    if WINDOW:
        lo = tl.maximum(0, start_m + causal_offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, end_m + causal_offset + window_right)
    return lo, hi


@triton.jit
def forward_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, offs_m, offs_n, offs_d, offs_dv,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                 seqlen_q, seqlen_k, head_dim, head_dim_v, batch, scale_log2, causal_offset, window_left, window_right,
                 KeyPadding, stride_pb, stride_pn, seed, head_row, start_m, dropout_threshold,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
                 HAS_KEY_PADDING: tl.constexpr, MASKED: tl.constexpr, DROPOUT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, POSITIVE_SCALE: tl.constexpr, INT64_OFFSETS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) into the running (acc, max, sum). With
    DROPOUT the sum counts every probability and acc only the kept ones (unscaled: the
    launcher's 1 / (1 - p) is applied once, at the end). MASKED=False: every key of the block
    is before seqlen_k and visible to every query (``tile_scores``). POSITIVE_SCALE (scale > 0
    and no float mask): the row max is taken on the unscaled products, max(s * c) = max(s) * c
    exactly for c > 0, so the scale is multiplied once per row there and fused into the
    exponent's subtraction (one FFMA per score instead of an FMUL and an FFMA)."""
    keys = start_n + offs_n
    # K^T's (D, BLOCK_N) tile; the keys are checked against seqlen_k only on masked tiles
    k = load_tile(k_base, offs_d, keys, stride_kd, stride_kn, head_dim, seqlen_k, True, MASKED, INT64_OFFSETS)
    scores = tl.dot(q, k, input_precision=DOT_PRECISION)
    if not POSITIVE_SCALE:
        scores = scores * scale_log2
    scores = tile_scores(scores, offs_m, keys, seqlen_q, seqlen_k, batch, causal_offset, window_left,
                         window_right, KeyPadding, stride_pb, stride_pn, mask_base, stride_mm, stride_mn,
                         CAUSAL, WINDOW, MASK_KIND, HAS_KEY_PADDING, MASKED, INT64_OFFSETS)
    if POSITIVE_SCALE:  # -inf * c stays -inf
        m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2)
    else:
        m_new = tl.maximum(m_i, tl.max(scores, 1))
    if MASKED or MASK_KIND == 2:
        # Rows that have seen no key yet keep m = -inf: subtract 0 there instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every score of the tile is finite, so is m_new
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    if POSITIVE_SCALE:
        p = tl.exp2(scores * scale_log2 - m_safe[:, None])
    else:
        p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = dropout_keep(seed, head_row, start_m, start_n, dropout_threshold, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    v = load_tile(v_base, keys, offs_dv, stride_vn, stride_vd, seqlen_k, head_dim_v, MASKED, True, INT64_OFFSETS)
    # Accumulate inside the dot: `acc * alpha + tl.dot(p, v)` holds a second BLOCK_M x D
    # float32 tile (at D = 128, BLOCK_M = 128, 8 warps: 468 bytes spilled on sm_90).
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, KeyPadding, BlockCounts, BlockIndex, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od, stride_os,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb, stride_pn,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    num_heads, kv_group, seqlen_q, seqlen_k, head_dim,
    group_shift,            # PACK_GQA: log2 of a query's rows, kv_group rounded up to a power of two (0 otherwise)
    head_dim_v,             # the value's (and output's) head dim, BLOCK_DV its tile's; D the query's and key's
    num_splits,             # SPLIT_KEYS: programs per query block, each over its share of the key tiles
    scale_log2,             # softmax scale * log2(e)
    causal_offset,          # query i is aligned with key i + causal_offset
    window_left, window_right,
    dropout_threshold,      # round(dropout_p * 2**16): a draw below it drops
    dropout_scale,          # 1 / (1 - the rounded dropout_p); 0 when everything drops
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    POSITIVE_SCALE: tl.constexpr, SPLIT_KEYS: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    DV_DIFFERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PACK_GQA: tl.constexpr = False,
):
    """PACK_GQA (``gqa_row_packing``): the program's head is a key head, and its rows are the
    (query, query head) pairs of its group, query-major, each query's kv_group heads in its
    2^group_shift rows: row r is query r >> group_shift of query head head * kv_group + (r mod
    2^group_shift), a spare row (r mod 2^group_shift >= kv_group, a group that is not a power of
    two) is computed but never stored (num_heads counts key heads, seqlen_q queries). The causal /
    window bounds and the masks (the same for every head of a group) take each row's query; the
    output and logsumexp are stored at each row's (head, query); split keys' partial results
    are written by row, and the merge stores them likewise."""
    if not DV_DIFFERS:  # Dv = D: one bound for both (a second runtime bound cost registers: 379 of 744 compiles)
        head_dim_v = head_dim
    pid_m, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # grid (blocks, heads, batch)
    split = 0
    if SPLIT_KEYS:  # grid (blocks * num_splits, heads, batch)
        split = pid_m % num_splits
        pid_m = pid_m // num_splits
    pid_bh = batch * num_heads + head
    if PACK_GQA:
        kv_head = head
    else:
        kv_head = head // kv_group
    if INT64_OFFSETS:  # see int64_offsets
        batch, head, kv_head = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if PACK_GQA:  # rows -> (query, query head); the block's queries are [start_q, end_q)
        num_rows = seqlen_q << group_shift
        # shifts, not a runtime division's dozen instructions; a spare row (its slot past the
        # group) is given the query past the last, so that it is masked as a ragged block's are
        offs_q = tl.where((offs_m & ((1 << group_shift) - 1)) < kv_group, offs_m >> group_shift, seqlen_q)
        start_q = (pid_m * BLOCK_M) >> group_shift
        end_q = ((pid_m * BLOCK_M + BLOCK_M - 1) >> group_shift) + 1
    else:
        num_rows = seqlen_q
        offs_q = offs_m
        start_q = pid_m * BLOCK_M
        end_q = start_q + BLOCK_M
    row_ok = offs_q < seqlen_q

    # Each tile's pointers are computed where it is loaded, from this (batch, head)'s base and
    # int32 offsets: pointer tensors carried from one key block to the next held 64-bit
    # addresses per element and pushed D = 64 to 255 registers (ptxas, sm_90).
    if PACK_GQA:
        offs_h = head * kv_group + (offs_m & ((1 << group_shift) - 1))
        q = load_packed_rows(Q + batch * stride_qb, offs_h, offs_q, row_ok, offs_d, stride_qh, stride_qm, stride_qd,
                             head_dim, INT64_OFFSETS)
    else:
        q = load_tile(Q + batch * stride_qb + head * stride_qh, offs_m, offs_d, stride_qm, stride_qd, seqlen_q,
                      head_dim, True, True, INT64_OFFSETS)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    mask_base = Mask + batch * stride_mb + head * stride_mh  # read only with a mask

    seed = Seed  # unused without dropout
    if DROPOUT:
        seed = tl.load(Seed)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Three segments of tiles: masked element-wise, whole (every query sees every key: no
    # element-wise mask), masked. Without lists they are the key blocks within the causal /
    # window bounds (the others are never loaded): before the interior ones (window start), the
    # interior ones, after them (diagonal, window end, ragged last block). With lists, positions
    # in this row's list: the PARTIAL tiles, then the FULL ones; EMPTY ones are not in it.
    if SPARSE:
        index = BlockIndex + batch * stride_ib + head * stride_ih + pid_m * stride_im
        lo, full_lo, full_hi, hi = list_segments(BlockCounts + batch * stride_cb + head * stride_ch + pid_m * stride_cm)
        STEP: tl.constexpr = 1
    else:
        lo, hi = key_range(start_q, end_q, seqlen_k, causal_offset, window_left, window_right, CAUSAL, WINDOW,
                           BLOCK_N)
        full_lo, full_hi = interior_keys(start_q, end_q, lo, hi, seqlen_q, seqlen_k, causal_offset, window_left,
                                         window_right, CAUSAL, WINDOW, BLOCK_N)
        STEP: tl.constexpr = BLOCK_N
    if SPLIT_KEYS:
        # This program's share of the row's tiles, positions [lo, hi) of one contiguous run
        # (BLOCK_N-aligned key offsets, or places in the list), and the segments clipped to it.
        share = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), STEP), num_splits) * STEP
        lo = lo + split * share
        hi = tl.minimum(lo + share, hi)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    for segment in tl.static_range(3):
        start, stop = segment_range(segment, lo, full_lo, full_hi, hi)
        if not (SPARSE and segment == 2):
            for position in range(start, stop, STEP):
                start_n = position
                if SPARSE:
                    start_n = tl.load(index + position) * BLOCK_N
                acc, m_i, l_i = forward_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, offs_q, offs_n,
                                             offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                                             stride_mn, seqlen_q, seqlen_k, head_dim, head_dim_v, batch, scale_log2,
                                             causal_offset, window_left, window_right, KeyPadding, stride_pb,
                                             stride_pn, seed, pid_bh, pid_m * BLOCK_M, dropout_threshold, CAUSAL,
                                             WINDOW, MASK_KIND, HAS_KEY_PADDING, segment != 1, DROPOUT,
                                             DOT_PRECISION, POSITIVE_SCALE, INT64_OFFSETS, BLOCK_M, BLOCK_N)

    seen = l_i > 0
    normaliser = tl.where(seen, l_i, 1.0)
    if DROPOUT:
        out = acc * (dropout_scale / normaliser)[:, None]
    else:
        out = acc / normaliser[:, None]
    log2_sum = m_i + tl.log2(normaliser)
    if SPLIT_KEYS:  # a partial result for attention_combine_kernel: float32, base-2 lse, -inf if unseen
        lse = tl.where(seen, log2_sum, float("-inf"))
        lse_row = (pid_bh * num_splits + split) * num_rows  # by row, packed or not
    else:
        lse = tl.where(seen, log2_sum / 1.4426950408889634, float("inf"))
        lse_row = pid_bh * seqlen_q
    if PACK_GQA and not SPLIT_KEYS:  # at each row's (head, query)
        # the heads recomputed here, not kept through the key loop: one vector fewer live there
        offs_h = head * kv_group + ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) & ((1 << group_shift) - 1))
        store_packed_rows(Out + batch * stride_ob, offs_h, offs_q, row_ok, offs_dv, stride_oh, stride_om, stride_od,
                          head_dim_v, out.to(Out.dtype.element_ty), INT64_OFFSETS)
        tl.store(Lse + (batch * num_heads * kv_group + offs_h) * seqlen_q + offs_q, lse, mask=row_ok)
    else:
        store_tile(Out + batch * stride_ob + head * stride_oh + split * stride_os, offs_m, offs_dv, stride_om,
                   stride_od, num_rows, head_dim_v, out.to(Out.dtype.element_ty), INT64_OFFSETS)
        tl.store(Lse + lse_row + offs_m, lse, mask=row_ok)


@triton.jit
def attention_combine_kernel(Partial, PartialLse, Out, Lse,
                             stride_pb, stride_ph, stride_ps, stride_pm, stride_pd,
                             stride_ob, stride_oh, stride_om, stride_od,
                             num_heads, num_splits, seqlen_q, head_dim, kv_group, group_shift,
                             INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                             PACK_GQA: tl.constexpr = False):
    """Merges the forward's key splits: out = sum_s w_s out_s / sum_s w_s with w_s = 2^lse_s
    (each partial out_s is normalised by its own sum), lse = log(sum_s w_s); a row that no split
    saw gets zeros and lse +inf, as from the unsplit kernel. Grid (query blocks, heads, batch).
    PACK_GQA: the partials' rows are a packed GQA block's (``attention_forward_kernel``), heads
    the key heads and seqlen_q the rows (queries x 2^group_shift), stored at their (head, query)
    but the spare ones."""
    pid_m, head, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if INT64_OFFSETS:  # see int64_offsets
        head, batch = head.to(tl.int64), batch.to(tl.int64)
    pid_bh = batch * num_heads + head
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    lse_rows = PartialLse + pid_bh * num_splits * seqlen_q + offs_m
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(num_splits):
        m = tl.maximum(m, tl.load(lse_rows + split * seqlen_q, mask=row_ok, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)  # unseen rows: every weight is 2^-inf = 0
    partial = (Partial + batch * stride_pb + head * stride_ph + offs_m[:, None] * stride_pm
               + offs_d[None, :] * stride_pd)
    in_bounds = row_ok[:, None] & (offs_d[None, :] < head_dim)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for split in range(num_splits):
        weight = tl.exp2(tl.load(lse_rows + split * seqlen_q, mask=row_ok, other=float("-inf")) - m)
        acc += weight[:, None] * tl.load(partial + split * stride_ps, mask=in_bounds, other=0.0)
        total += weight
    seen = total > 0
    normaliser = tl.where(seen, total, 1.0)
    out = acc / normaliser[:, None]
    lse = tl.where(seen, (m + tl.log2(normaliser)) / 1.4426950408889634, float("inf"))
    if PACK_GQA:  # a spare row (its slot past the group) is not stored
        slot = offs_m & ((1 << group_shift) - 1)
        offs_h = head * kv_group + slot
        offs_q = offs_m >> group_shift
        queries = seqlen_q >> group_shift
        stored = row_ok & (slot < kv_group)
        store_packed_rows(Out + batch * stride_ob, offs_h, offs_q, stored, offs_d, stride_oh, stride_om, stride_od,
                          head_dim, out.to(Out.dtype.element_ty), INT64_OFFSETS)
        tl.store(Lse + (batch * num_heads * kv_group + offs_h) * queries + offs_q, lse, mask=stored)
    else:
        tl.store(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om
                 + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=in_bounds)
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


INT32_ELEMENTS = 2 ** 31


def int64_offsets(*tensors) -> bool:
    """Whether the kernels need int64 (batch, head) offsets (their INT64_OFFSETS): whether any of
    ``tensors`` (None skipped) lies in a storage of 2**31 elements or more, such as a KV cache of
    B = 64, Hk = 8, Lk = 32k, D = 128. Every offset into a tensor is below its storage's size,
    so below that they cannot wrap in int32; above it ``batch * stride_kb`` can, although each
    stride fits in int32 (Triton then passes it as int32), and read out of bounds. The flag
    keeps the usual kernels as they were: int64 indices cost registers (always on, +905 over
    the 269 AOT jobs, up to +69 in one, and an 8-byte spill).
    Conservative for a small view of a large storage (the int64 variant then runs; correct).
    A storage's size costs ~0.4 us of host time a tensor; the exact span, 1.5 us."""
    return any(tensor is not None and tensor.untyped_storage().nbytes() >= INT32_ELEMENTS * tensor.element_size()
               for tensor in tensors)


def dot_precision(query) -> str:
    """float32 inputs: three tf32 products per dot on CUDA ("tf32x3", float32-level accuracy on
    the tensor cores; "ieee" has none and spills), exact float32 in the interpreter. 2-byte
    inputs ignore it."""
    if query.dtype != torch.float32:
        return "tf32"
    return "tf32x3" if query.device.type == "cuda" else "ieee"


def uses_block_lists(attn_mask, key_padding_mask) -> bool:
    """The kernels walk tile lists (block_lists.py) when a boolean mask can empty tiles."""
    return key_padding_mask is not None or (attn_mask is not None and attn_mask.dtype == torch.bool)


def effective_dropout_p(dropout_p: float) -> float:
    """The p the kernels apply: ``dropout_p`` rounded to a multiple of 2**-16 (their draws are
    16-bit); the kept probabilities are scaled by 1 / (1 - this)."""
    return min(round(dropout_p * 2 ** DROPOUT_BITS), 2 ** DROPOUT_BITS) / 2 ** DROPOUT_BITS


def dropout_arguments(dropout_p, seed, placeholder):
    """(DROPOUT, seed tensor, threshold, scale) for the kernels: p is rounded to a multiple of
    2**-16 and the kept probabilities are scaled by exactly 1 / (1 - that), so the expectation
    is unbiased. ``seed``: an int64 tensor of one element on the inputs' device."""
    threshold = min(round(dropout_p * 2 ** DROPOUT_BITS), 2 ** DROPOUT_BITS)
    if threshold == 0:
        return False, placeholder, 0, 1.0
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != placeholder.device:
        raise ValueError(f"dropout needs seed: an int64 tensor of one element on {placeholder.device}, got "
                         f"{None if seed is None else (seed.dtype, tuple(seed.shape), str(seed.device))}")
    kept = 2 ** DROPOUT_BITS - threshold
    return True, seed, threshold, (2 ** DROPOUT_BITS / kept if kept else 0.0)


@triton.jit
def dropout_mask_kernel(Seed, Keep, seqlen_q, seqlen_k, dropout_threshold,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid_bh = tl.program_id(0) // num_m  # (batch x heads) x query blocks on x: y and z stop at 65535
    start_m, start_n = (tl.program_id(0) % num_m) * BLOCK_M, tl.program_id(1) * BLOCK_N
    keep = dropout_keep(tl.load(Seed), pid_bh, start_m, start_n, dropout_threshold, BLOCK_M, BLOCK_N)
    rows = start_m + tl.arange(0, BLOCK_M)[:, None]
    cols = start_n + tl.arange(0, BLOCK_N)[None, :]
    offsets = (pid_bh.to(tl.int64) * seqlen_q + rows) * seqlen_k + cols
    tl.store(Keep + offsets, keep.to(tl.int8), mask=(rows < seqlen_q) & (cols < seqlen_k))


def dropout_keep_mask(seed, shape, dropout_p):
    """The kept elements (bool ``shape = (B, Hq, Lq, Lk)``) of the kernels' dropout with this seed
    and p: the mask the forward and backward apply, materialised for tests and debugging."""
    batch, heads, seqlen_q, seqlen_k = shape
    enabled, seed, threshold, _ = dropout_arguments(dropout_p, seed, seed)
    if not enabled:
        return torch.ones(shape, dtype=torch.bool, device=seed.device)
    keep = torch.empty(shape, dtype=torch.int8, device=seed.device)
    grid = (cdiv(seqlen_q, 32) * batch * heads, cdiv(seqlen_k, 32))
    dropout_mask_kernel[grid](seed, keep, seqlen_q, seqlen_k, threshold, BLOCK_M=32, BLOCK_N=32, enable_fp_fusion=True)
    return keep.view(torch.bool)


MAX_GRID_YZ = 65535  # CUDA's cap on a grid's y and z: the kernels' heads and batch axes


def batch_chunks(batch: int, most: Optional[int] = None) -> List[Tuple[int, int]]:
    """The (start, stop) sequences of each launch: one launch for up to MAX_GRID_YZ sequences
    (the grid's z axis) or ``most``, several for more, each on slices of the per-sequence
    tensors (views, same strides). Not with dropout: ``launch_sizes_unsupported``."""
    size = MAX_GRID_YZ if most is None else min(most, MAX_GRID_YZ)
    if batch <= size:  # the usual case (host time: a decoding step is bound by it)
        return [(0, batch)]
    return [(start, min(batch, start + size)) for start in range(0, batch, size)]


def batch_slice(tensors, start: int, stop: int, batch: int):
    """Sequences [start, stop) of each of ``tensors`` (all with the batch first: views, same
    strides), or the tensors themselves when that is the whole batch."""
    return tensors if (start, stop) == (0, batch) else [tensor[start:stop] for tensor in tensors]


def launch_sizes_unsupported(batch: int, heads: int, seqlen_q: int, dropping: bool) -> Optional[str]:
    """Why the kernels' launches cannot hold these sizes, or None: their grids are (blocks, heads,
    batch), and CUDA caps y and z at MAX_GRID_YZ; a larger batch takes several launches
    (``batch_chunks``), but dropout keys its draws by the (batch, head) index within a launch."""
    if heads > MAX_GRID_YZ:
        return (f"heads {heads} > {MAX_GRID_YZ}: the kernels' grid has a program per (block, head, sequence), "
                f"and CUDA caps the axis that holds the heads at {MAX_GRID_YZ}")
    if dropping and batch > MAX_GRID_YZ:
        return (f"dropout with batch {batch} > {MAX_GRID_YZ}: a larger batch takes several launches, which would "
                f"draw the same dropout masks for sequences {MAX_GRID_YZ} apart")
    if batch * heads * seqlen_q >= 2 ** 31:
        return (f"batch * heads * Lq = {batch * heads * seqlen_q} >= 2**31: the kernels index their float32 row "
                "statistics (logsumexp) with int32 offsets")
    return None


def check_launch_sizes(batch: int, heads: int, seqlen_q: int, dropping: bool):
    """Raises ValueError where ``launch_sizes_unsupported`` says why (the op checks first, and
    sends such calls to torch; an exported graph holding the op meets this one)."""
    if reason := launch_sizes_unsupported(batch, heads, seqlen_q, dropping):
        raise ValueError(reason)


def cdiv(numerator: int, denominator: int) -> int:
    """Host-side ceil division for the grids (triton.cdiv is a constexpr_function: ~3 us a call)."""
    return -(-numerator // denominator)


def list_arguments(lists, placeholder):
    """(counts, index, their 6 strides) for the kernels; placeholders when there are no lists."""
    if lists is None:
        return placeholder, placeholder, (0, 0, 0, 0, 0, 0)
    return lists.counts, lists.indices, (*lists.counts.stride()[:3], *lists.indices.stride()[:3])


def attention_forward(query, key, value, *, attn_mask=None, key_padding_mask=None, scale=None,
                      causal_offset=None, window=None, dropout_p=0.0, seed=None, block_m=None, block_n=None,
                      num_warps=None, num_stages=None, num_splits=None, block_list_store=None, pack_gqa=True):
    """Launches the kernel on already validated ``(B, H, L, D)`` tensors (the value's head dim Dv
    may differ from the query's and key's D).

    attn_mask: bool (True = may attend) or float, already broadcastable to (B, Hq, Lq, Lk)
    (expanded views are fine: stride 0 dimensions are read in place). key_padding_mask: bool
    (B, Lk), True = padding. causal_offset: None (no causal mask) or the alignment: query i sees
    keys j <= i + causal_offset (0: top-left, Lk - Lq: lower-right). window: None or
    (left, right), relative to the same alignment (0 when not causal). dropout_p > 0 needs
    ``seed``, an int64 tensor of one element on the inputs' device (``dropout_keep_mask`` gives
    the mask it draws). block_m/block_n/num_warps/num_stages: None takes them from the config
    table (configs.py). num_splits: programs per query block, each over a contiguous share of
    its key tiles, merged by ``attention_combine_kernel`` (flash-decoding); None lets
    ``configs.forward_splits`` choose (more than 1 only on CUDA, when the call has too few
    programs to fill the GPU: a decoding step). block_list_store: a dict in which the tile
    lists of the boolean masks are kept and reused (``block_lists.build_block_lists``).
    pack_gqa: a GQA decoding step computes each key head's group of query heads in one program
    where ``gqa_packing`` allows it, and a GQA call with a few queries a head (speculative
    decoding, chunked prefill) its groups' (query, head) pairs as rows where ``gqa_row_packing``
    does (False: one program per query head).
    A batch above MAX_GRID_YZ takes one launch per chunk of sequences (``batch_chunks``).
    Returns (out (B, Hq, Lq, Dv) in the query's dtype, with the query's layout (``output_like``),
    lse (B, Hq, Lq) float32).
    """
    from fasttransformer.kernels.block_lists import build_block_lists
    from fasttransformer.kernels.configs import (forward_config, forward_splits, head_dim_bucket, packed_override,
                                                 tile_head_dims)

    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):  # before any launch
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    unpacked_shape = query.shape
    batch, heads, seqlen_q, head_dim = unpacked_shape
    dropping = effective_dropout_p(dropout_p) > 0
    check_launch_sizes(batch, heads, seqlen_q, dropping)
    kv_heads, seqlen_k, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    group = 1  # query heads computed as one program's rows (gqa_packing)
    if pack_gqa and seqlen_q == 1 and kv_heads != heads:  # (a quick test first: host time)
        keys = gqa_packing(heads, kv_heads, seqlen_q, seqlen_k, causal_offset, window, dropout_p)
        if keys is not None:  # rows = query heads: the bounds become the key range
            key, value, attn_mask, key_padding_mask = _pack_gqa(key, value, attn_mask, key_padding_mask, keys,
                                                                batch, heads)
            group, heads, seqlen_q, seqlen_k = heads // kv_heads, kv_heads, heads // kv_heads, key.shape[2]
            causal_offset = window = None
    shape = (batch, heads, seqlen_q, seqlen_k)
    mask_kind, mask, mask_strides, padding, padding_strides = mask_arguments(attn_mask, key_padding_mask, shape, query)
    # The split keys' partial results are left out: forward_splits keeps them to one wave of
    # programs (SMs x block_m x D floats at most).
    wide = int64_offsets(query, key, value, mask, padding)
    config = forward_config(query.device, query.dtype, head_dim, causal_offset is not None, dropout=dropping,
                            int64=wide, head_dim_v=head_dim_v)
    block_d, block_dv = tile_head_dims("forward", query.device, query.dtype, head_dim, head_dim_v, dropping, wide)
    requested = block_n, num_warps, num_stages  # the caller's (None: the table's)
    block_m, block_n = block_m or config.block_m, block_n or config.block_n
    num_warps, num_stages = num_warps or config.num_warps, num_stages or config.num_stages
    out = output_like(query, head_dim_v)
    query_strides, out_strides = packed_strides(query.stride(), group), packed_strides(out.stride(), group)
    # Packed, the kernels' row (batch * Hk + hk) * group + r is row batch * Hq + head: the same lse
    lse = torch.empty(unpacked_shape[:3], device=query.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    listed = uses_block_lists(attn_mask, key_padding_mask)
    # (rows per query, heads) of the grid: a key head's rows are its group's (query, head) pairs (gqa_row_packing)
    row_group, grid_heads, rows = 1, heads, seqlen_q
    if pack_gqa and seqlen_q > 1 and kv_heads != heads:
        row_group = gqa_row_packing(heads, kv_heads, seqlen_q, block_m, mask_strides[1] if mask_kind else 0, listed,
                                    dropout_p)
        grid_heads, rows = (kv_heads, seqlen_q * row_group) if row_group > 1 else (heads, seqlen_q)
        packed = packed_override(query.device, query.dtype, head_dim, head_dim_v, wide) if row_group > 1 else None
        if packed is not None:  # the packed kernel's own entry (the same block_m), but what the caller asked for
            block_n, num_warps, num_stages = (requested[0] or packed.block_n, requested[1] or packed.num_warps,
                                              requested[2] or packed.num_stages)
    lists = None
    if listed:  # packed rows: each list row is the block's block_m / group queries
        lists, = build_block_lists(attn_mask if mask_kind == MASK_BOOL else None, key_padding_mask, shape,
                                   [(block_m // row_group, block_n, False)], causal_offset, window,
                                   store=block_list_store)
    counts, index, list_strides = list_arguments(lists, query)
    dropout, seed, dropout_threshold, dropout_scale = dropout_arguments(dropout_p, seed, query)
    window_left, window_right = window if window is not None else (0, 0)
    query_blocks = cdiv(rows, block_m)
    if num_splits is None:
        visible_keys = seqlen_k  # an upper bound on what one query block sees
        if causal_offset is not None:
            visible_keys = min(visible_keys, max(seqlen_q + causal_offset, 0))
        if window is not None:
            visible_keys = min(visible_keys, block_m + window_left + window_right + block_n)
        num_splits = forward_splits(query.device, query_blocks * grid_heads * batch, cdiv(visible_keys, block_n))
    if num_splits > 1:  # float32 partial results per split (by row, packed or not), merged below
        target = torch.empty(batch, grid_heads, num_splits, rows, head_dim_v, device=query.device,
                             dtype=torch.float32)
        target_lse = torch.empty(batch, grid_heads, num_splits, rows, device=query.device, dtype=torch.float32)
        target_strides = (*target.stride()[:2], *target.stride()[3:], target.stride(2))
    else:
        target, target_lse, target_strides = out, lse, (*out_strides, 0)
    per_batch = (query, key, value, target, target_lse, mask, padding, counts, index)  # placeholders too
    for start, stop in batch_chunks(batch):  # one launch up to MAX_GRID_YZ sequences
        # enable_fp_fusion, in every launch: the kernels are written for fused multiply-adds (forward_tile:
        # one FFMA per score), Triton 3.9 warns when a launch leaves it unset and 3.10 turns it off by default.
        attention_forward_kernel[(query_blocks * num_splits, grid_heads, stop - start)](
            *batch_slice(per_batch, start, stop, batch), seed,
            *query_strides, *key.stride(), *value.stride(), *target_strides, *mask_strides, *padding_strides,
            *list_strides,
            grid_heads, heads // kv_heads if kv_heads else 1, seqlen_q, seqlen_k, head_dim, row_group.bit_length() - 1,
            head_dim_v, num_splits,
            scale * LOG2E, causal_offset or 0, window_left, window_right, dropout_threshold, dropout_scale,
            CAUSAL=causal_offset is not None, WINDOW=window is not None, MASK_KIND=mask_kind,
            HAS_KEY_PADDING=key_padding_mask is not None, SPARSE=lists is not None, DROPOUT=dropout,
            DOT_PRECISION=dot_precision(query), POSITIVE_SCALE=scale > 0 and mask_kind != MASK_FLOAT,
            SPLIT_KEYS=num_splits > 1, INT64_OFFSETS=wide, DV_DIFFERS=head_dim_v != head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, PACK_GQA=row_group > 1,
            num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True,
        )
        if num_splits > 1:
            attention_combine_kernel[(cdiv(rows, COMBINE_BLOCK_M), grid_heads, stop - start)](
                *batch_slice((target, target_lse, out, lse), start, stop, batch), *target.stride()[:3],
                *target.stride()[3:],
                *out_strides, grid_heads, num_splits, rows, head_dim_v, heads // kv_heads if kv_heads else 1,
                row_group.bit_length() - 1, INT64_OFFSETS=wide,
                BLOCK_M=COMBINE_BLOCK_M, BLOCK_D=head_dim_bucket(head_dim_v), PACK_GQA=row_group > 1, num_warps=4,
                enable_fp_fusion=True,
            )
    return out, lse


COMBINE_BLOCK_M = 16  # query rows per program of the split merge: a decoding step has one


def output_like(query, head_dim_v: int):
    """The output ``(B, Hq, Lq, Dv)`` laid out as ``empty_like(query)`` is, which it is when Dv =
    D: the query's order of dimensions in memory where the query is dense, else contiguous (an
    expanded query's stride-0 dimensions are not kept, nor a slice's gaps). The op's fake (meta)
    implementation gives the same strides."""
    if query.shape[-1] == head_dim_v:
        return torch.empty_like(query)
    like = torch.empty_like(query, device="meta")  # torch's choice of layout, without allocating
    order = sorted(range(query.dim()), key=lambda dim: -like.stride(dim))  # outermost first; stable on ties
    shape = (*query.shape[:-1], head_dim_v)
    return query.new_empty([shape[dim] for dim in order]).permute([order.index(dim) for dim in range(query.dim())])


def gqa_packing(heads, kv_heads, seqlen_q, seqlen_k, causal_offset, window, dropout_p):
    """Whether a call packs the query heads of each key head into one program's rows, and if so
    the keys ``(first, stop)`` its query sees; else None.

    A GQA decoding step (one query per (batch, query head), Hq = group * Hk, group > 1) without
    packing runs one program per query head, each of one live row, and each reads its key
    head's K and V: the group's programs read them ``group`` times over. Packed, the query
    ``(B, Hq, 1, D)`` is read as ``(B, Hk, group, D)`` (query head hk * group + r is row r of key
    head hk: ``packed_strides``, whatever the layout), the output written likewise, and one
    program per key head reads K and V once.
    The kernel's causal and window bounds are per row, and the rows are now heads: with one
    query they are a range of keys, which is sliced from K, V and the masks instead. Dropout
    keeps the unpacked path: its draws are keyed by (head, query) and the backward regenerates
    them unpacked. A query that sees no key there takes the usual path (zeros, lse +inf)."""
    if seqlen_q != 1 or kv_heads == 0 or heads == kv_heads or effective_dropout_p(dropout_p) > 0:
        return None
    offset = causal_offset or 0  # the window's alignment: 0 when not causal
    first, stop = 0, seqlen_k
    if causal_offset is not None:
        stop = min(stop, causal_offset + 1)
    if window is not None:
        first, stop = max(first, offset - window[0]), min(stop, offset + window[1] + 1)
    return (first, stop) if first < stop else None


def gqa_row_packing(heads, kv_heads, seqlen_q, block_m, mask_head_stride, listed, dropout_p) -> int:
    """The rows per query (the group rounded up to a power of two) of a program that computes
    its group's (query, query head) pairs as its rows (the forward kernel's PACK_GQA), or 1 for
    one program per query head.

    A GQA call with a few queries a head (Lq < block_m: speculative decoding's drafts, a chunked
    prefill's chunk) runs, unpacked, one program per query head, each with Lq live rows of its
    block_m, and the group's programs read their key head's K and V ``group`` times over.
    Packed, query i of query head hk * group + r is row i * rows + r of key head hk: one
    program reads K and V once for up to block_m / Lq heads' queries, and more of its rows are
    live. A group that is not a power of two leaves ``rows - group`` spare rows per query
    (Qwen2's 7 heads: 7 of 8 rows live), so that the kernel maps rows to queries by shifts and a
    block's queries are whole. Each row keeps its own query's causal / window bounds and mask
    row, so every mask works, but the masks must be the same for every head of a group
    (``mask_head_stride`` 0: a mask broadcast over the heads, key padding) and, with tile lists,
    a block's queries (block_m / rows of them) must fill the lists' rows (at least
    block_lists.CLASS_ROWS). Not when the spare rows would make more programs (each reading K
    and V) than the group's heads unpacked (3 heads, 63 queries: 4 blocks of 64 rows), not with
    dropout (its draws are keyed by (head, query)), and not for one query a head, which
    ``gqa_packing`` packs as heads."""
    if seqlen_q < 2 or seqlen_q >= block_m or kv_heads == 0 or heads == kv_heads or mask_head_stride != 0:
        return 1
    group = heads // kv_heads
    rows = 1 << (group - 1).bit_length()  # the group, or the next power of two
    if rows > block_m or (listed and block_m // rows < CLASS_ROWS) or cdiv(seqlen_q * rows, block_m) > group:
        return 1
    return 1 if dropout_p and effective_dropout_p(dropout_p) > 0 else rows


def packed_list_rows(block_m: int) -> List[int]:
    """The rows of the tile lists that a packed GQA block of ``block_m`` rows may take
    (``gqa_row_packing``): its queries for each group it packs with lists."""
    return [block_m // group for group in (2 ** power for power in range(1, block_m.bit_length()))
            if block_m // group >= CLASS_ROWS]


def packed_strides(strides, group):
    """The strides of a ``(B, Hq, 1, D)`` tensor's view as ``(B, Hq / group, group, D)``
    (``strides`` itself for group 1): what ``view`` gives, without its host time."""
    if group == 1:
        return strides
    return strides[0], strides[1] * group, strides[1], strides[3]


def _pack_gqa(key, value, attn_mask, key_padding_mask, keys, batch, heads):
    """K, V and the masks of a GQA decoding step packed as ``gqa_packing`` says, views all: the
    keys in ``keys``, a mask ``(B, Hk, group, Lk)`` (its rows the query heads)."""
    kv_heads, seqlen_k = key.shape[1], key.shape[2]
    first, stop = keys
    if attn_mask is not None:
        attn_mask = attn_mask.expand(batch, heads, 1, seqlen_k).view(batch, kv_heads, heads // kv_heads, seqlen_k)
    if (first, stop) != (0, seqlen_k):
        key, value = key[:, :, first:stop], value[:, :, first:stop]
        attn_mask = attn_mask[..., first:stop] if attn_mask is not None else None
        key_padding_mask = key_padding_mask[:, first:stop] if key_padding_mask is not None else None
    return key, value, attn_mask, key_padding_mask
