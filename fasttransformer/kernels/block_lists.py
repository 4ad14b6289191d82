"""Which tiles of the (Lq x Lk) score matrix the attention kernels visit, and which of them read
the boolean masks: one cheap pass over the masks before the kernels (issue 3).

Every (query block, key block) tile is put in one of three classes:

* EMPTY: no query of the tile may see any of its keys (the boolean ``attn_mask`` is all False
  there, or every key of the block is padding, or the causal/window bounds exclude it). The
  kernels never visit it: no loads, no dot.
* PARTIAL: the kernels visit it and mask it element-wise (bounds, causal, window, and the
  boolean ``attn_mask`` / ``key_padding_mask`` read).
* FULL: every query of the tile (before Lq) sees every key of it: the masks are all True/all
  kept there, the tile is inside the causal and window bounds, and none of its keys is past Lk
  (a ragged last key block is never FULL). The kernels visit it without any element-wise mask.

FULL is exact, and so is EMPTY as far as the masks go: with both masks their combination is
judged element by element (a tile where each is partial but no element is kept by both is
EMPTY). The causal/window bounds are judged by the tile's corners: a tile that they and the
masks leave partial, but whose kept elements all lie outside the bounds, is called PARTIAL
(conservative, never the other way round). Query rows past Lq do not count: the kernels never
store them (and they add nothing to dK/dV).

For the kernels the classes become lists, as FlexAttention's BlockMask: for each row of tiles
(a query block; or a key block for the dK/dV kernel) the PARTIAL tiles' indices first, then the
FULL ones, and the two counts. Broadcast dimensions of the masks stay broadcast (stride 0): a
``(B, 1, 1, Lk)`` padding-style mask gives one list per sequence.

The launchers build the lists with two Triton kernels (``build_block_lists``): one computes
every tile's class from the masks, one compacts each row of classes into its list. A torch
version of each step (``tile_classes``, ``coarsen``, ``block_lists``) is the readable
definition the kernels are tested against. The kernels replace its ~15 torch ops (a sort
among them) per list with two launches, which is what a decoding step with key padding paid
for in host time. Neither synchronises with the host (CUDA graphs capture them).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

EMPTY, PARTIAL, FULL = 0, 1, 2


class BlockLists(NamedTuple):
    """``counts (B, H, R, 2)`` int32: PARTIAL and FULL tiles of each row of tiles;
    ``indices (B, H, R, C)`` int32: their column indices, PARTIAL first. Both are broadcast
    views (stride 0 where every batch/head/row shares a list)."""
    counts: torch.Tensor
    indices: torch.Tensor


def _compact(mask: torch.Tensor) -> torch.Tensor:
    """The mask with every stride-0 (broadcast) dimension reduced to size 1."""
    index = tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                  for size, stride in zip(mask.shape, mask.stride()))
    return mask[index]


def _tile_min_max(values: torch.Tensor, block_rows: int, block_cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tile (min, max) of a uint8 (..., rows, cols) tensor; ragged edges are padded by
    repeating the last row/column, which changes no tile's min or max."""
    pad_rows, pad_cols = -values.shape[-2] % block_rows, -values.shape[-1] % block_cols
    if pad_rows:
        values = torch.cat([values, values[..., -1:, :].expand(*values.shape[:-2], pad_rows, values.shape[-1])], -2)
    if pad_cols:
        values = torch.cat([values, values[..., -1:].expand(*values.shape[:-1], pad_cols)], -1)
    tiles = values.reshape(*values.shape[:-2], values.shape[-2] // block_rows, block_rows,
                           values.shape[-1] // block_cols, block_cols)
    # Reduce the columns first: the second reduction then reads block_cols times less.
    low, high = tiles.aminmax(dim=-1)
    return low.amin(-2), high.amax(-2)


def tile_classes(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], shape,
                 block_m: int, block_n: int, causal_offset: Optional[int] = None,
                 window: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """uint8 ``(Bc, Hc, M, N)`` of EMPTY/PARTIAL/FULL, broadcastable to
    ``(B, H, M, N) = (B, H, cdiv(Lq, block_m), cdiv(Lk, block_n))`` (Bc, Hc are 1 where both
    masks broadcast).

    attn_mask: bool (True = may attend) broadcastable to ``shape = (B, H, Lq, Lk)``, or None;
    key_padding_mask: bool ``(B, Lk)``, True = padding, or None (not both None); causal_offset /
    window as the kernels take them.

    Every step is a whole-tensor torch op, as few as can be: each is a launch, and a decoding
    step's host time is counted in launches."""
    batch, heads, seqlen_q, seqlen_k = shape
    num_m, num_n = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    kept = None if attn_mask is None else _compact(attn_mask.expand(shape))
    if key_padding_mask is not None:  # both masks: the elements both keep
        not_padding = ~key_padding_mask[:, None, None, :]
        kept = not_padding if kept is None else kept & not_padding
    low, high = _tile_min_max(kept.view(torch.uint8), block_m if kept.shape[2] > 1 else 1, block_n)
    classes = low + high  # of a 0/1 mask: 0 EMPTY, 1 PARTIAL, 2 FULL

    device = classes.device
    offset = causal_offset or 0
    first_row = torch.arange(num_m, device=device)[:, None] * block_m
    last_row = torch.clamp(first_row + block_m, max=seqlen_q) - 1
    first_col = torch.arange(num_n, device=device)[None, :] * block_n
    last_col = torch.clamp(first_col + block_n, max=seqlen_k) - 1
    visible = torch.ones(num_m, num_n, dtype=torch.bool, device=device)  # some element in bounds
    inside = (first_col + block_n <= seqlen_k).expand(num_m, num_n)  # every element in bounds
    if causal_offset is not None:  # key j <= i + offset
        visible &= first_col <= last_row + offset
        inside = inside & (first_col + block_n - 1 <= first_row + offset)
    if window is not None:  # key j in [i + offset - left, i + offset + right]
        visible &= (last_col >= first_row + offset - window[0]) & (first_col <= last_row + offset + window[1])
        inside = inside & (first_col >= last_row + offset - window[0])
        inside = inside & (first_col + block_n - 1 <= first_row + offset + window[1])
    classes = classes * visible  # EMPTY (0) where the bounds remove the whole tile
    classes = torch.where(inside, classes, classes.clamp(max=PARTIAL))  # FULL only inside them
    return classes.expand(*classes.shape[:2], num_m, num_n)


def coarsen(classes: torch.Tensor, factor_m: int, factor_n: int) -> torch.Tensor:
    """The classes of tiles ``factor_m x factor_n`` times larger, from the classes of the small
    ones, exactly: EMPTY if all are EMPTY, FULL if all are FULL, PARTIAL otherwise. One
    classification then serves kernels with different tile sizes. A large tile that reaches
    past the small tiles' last key block holds keys past Lk: never FULL."""
    if factor_m == factor_n == 1:
        return classes
    pad_cols = -classes.shape[-1] % factor_n
    if pad_cols:
        edge = classes[..., -1:].clamp(max=PARTIAL)
        classes = torch.cat([classes, edge.expand(*classes.shape[:-1], pad_cols)], -1)
    low, high = _tile_min_max(classes, factor_m, factor_n)
    return high.clamp(max=PARTIAL) + (low == FULL)  # 0 all EMPTY; 2 all FULL; else 1


def block_lists(classes: torch.Tensor, batch: int, heads: int, by_key: bool = False) -> BlockLists:
    """The kernels' lists from ``tile_classes``: one list per query block (``by_key=False``), or
    per key block (``by_key=True``, for the dK/dV kernel), broadcast to ``batch`` x ``heads``."""
    if by_key:
        classes = classes.transpose(-2, -1)
    # Sort key (class + 2) % 3: PARTIAL (1) -> 0, FULL (2) -> 1, EMPTY (0) -> 2; a stable sort
    # keeps the columns in order within each class.
    order = torch.remainder(classes + 2, 3)
    indices = torch.sort(order, dim=-1, stable=True).indices.to(torch.int32).contiguous()  # kernels: stride 1
    counts = torch.stack([order == 0, order == 1], -1).sum(-2, dtype=torch.int32)
    rows = classes.shape[2]
    return BlockLists(counts.expand(batch, heads, rows, 2), indices.expand(batch, heads, rows, indices.shape[-1]))


# --- the Triton builder the launchers use --------------------------------------------------------

@triton.jit
def tile_classes_kernel(Mask, KeyPadding, Classes,
                        stride_mb, stride_mh, stride_mm, stride_mn, stride_pb, stride_pn,
                        heads, seqlen_q, seqlen_k, num_m, num_n, causal_offset, window_left, window_right,
                        HAS_MASK: tl.constexpr, MASK_ROWS: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
                        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr):
    """The classes of TILES tiles of one row of tiles (one query block) of one (batch, head) of
    the lists: ``tile_classes`` with the masks read once, ROWS mask rows at a time."""
    pid_bh = tl.program_id(0) // num_m  # (batch x heads) x rows on x: y and z stop at 65535
    pid_m = tl.program_id(0) % num_m
    batch = pid_bh // heads
    head = pid_bh % heads
    tiles = tl.program_id(1) * TILES + tl.arange(0, TILES)
    cols = tl.program_id(1) * (TILES * BLOCK_N) + tl.arange(0, TILES * BLOCK_N)
    col_ok = cols < seqlen_k
    # 0/1 per element, 1 where every mask keeps it: per tile, min + max is 0 EMPTY, 1 PARTIAL, 2 FULL
    kept = tl.full([TILES * BLOCK_N], 1, tl.int32)
    if HAS_KEY_PADDING:  # True = padding
        kept = 1 - tl.load(KeyPadding + batch.to(tl.int64) * stride_pb + cols * stride_pn, mask=col_ok,
                           other=0).to(tl.int32)
    if HAS_MASK:  # both masks: judged element by element
        base = Mask + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh + cols * stride_mn
        if MASK_ROWS:
            low = tl.full([TILES * BLOCK_N], 1, tl.int32)
            high = tl.zeros([TILES * BLOCK_N], tl.int32)
            for start in range(0, BLOCK_M, ROWS):
                rows = pid_m * BLOCK_M + start + tl.arange(0, ROWS)
                ok = (rows < seqlen_q)[:, None] & col_ok[None, :]
                values = tl.load(base[None, :] + rows.to(tl.int64)[:, None] * stride_mm, mask=ok, other=0)
                values = values.to(tl.int32) & kept[None, :]
                low = tl.minimum(low, tl.min(tl.where(ok, values, 1), 0))
                high = tl.maximum(high, tl.max(values, 0))
        else:  # the mask is the same for every query (stride 0): one row
            values = tl.load(base, mask=col_ok, other=0).to(tl.int32) & kept
            low = tl.where(col_ok, values, 1)
            high = values
    else:
        low = tl.where(col_ok, kept, 1)
        high = tl.where(col_ok, kept, 0)
    classes = tl.min(tl.reshape(low, [TILES, BLOCK_N]), 1) + tl.max(tl.reshape(high, [TILES, BLOCK_N]), 1)
    # EMPTY where the bounds remove the whole tile; FULL only where every element is inside them.
    first_row = pid_m * BLOCK_M
    last_row = tl.minimum(first_row + BLOCK_M, seqlen_q) - 1
    first_col = tiles * BLOCK_N
    last_col = tl.minimum(first_col + BLOCK_N, seqlen_k) - 1
    inside = first_col + BLOCK_N <= seqlen_k
    if CAUSAL:
        classes = tl.where(first_col <= last_row + causal_offset, classes, 0)
        inside = inside & (first_col + BLOCK_N - 1 <= first_row + causal_offset)
    if WINDOW:
        visible = ((last_col >= first_row + causal_offset - window_left)
                   & (first_col <= last_row + causal_offset + window_right))
        classes = tl.where(visible, classes, 0)
        inside = inside & (first_col >= last_row + causal_offset - window_left)
        inside = inside & (first_col + BLOCK_N - 1 <= first_row + causal_offset + window_right)
    classes = tl.where(inside, classes, tl.minimum(classes, 1))
    tl.store(Classes + (pid_bh * num_m + pid_m).to(tl.int64) * num_n + tiles, classes.to(tl.uint8),
             mask=tiles < num_n)


@triton.jit
def _append_class(base, out, found, pid_r, fine_rows, fine_cols, stride_fr, stride_fc, num_cols,
                  WANTED: tl.constexpr, FACTOR_R: tl.constexpr, FACTOR_C: tl.constexpr, TILES: tl.constexpr,
                  KEYS_ON_ROWS: tl.constexpr):
    """Appends to the list at ``out + found`` the columns of class WANTED, in order; the new count.
    A coarse tile reaching past the fine grid's keys is never FULL (it holds keys past Lk);
    past its queries, the fine tiles do not count."""
    for start in range(0, num_cols, TILES):
        cols = start + tl.arange(0, TILES)
        low = tl.full([TILES], 2, tl.int32)
        high = tl.zeros([TILES], tl.int32)
        for i in tl.static_range(FACTOR_R):
            for j in tl.static_range(FACTOR_C):
                row, col = pid_r * FACTOR_R + i, cols * FACTOR_C + j
                # One compare, not (row < fine_rows) & (col < fine_cols): triton 3.9's interpreter
                # gives a scalar bool & a tensor of bools int32 values, which tl.load refuses as a mask.
                ok = col < tl.where(row < fine_rows, fine_cols, 0)
                fine = tl.load(base + row * stride_fr + col * stride_fc, mask=ok, other=0).to(tl.int32)
                if KEYS_ON_ROWS:
                    past_keys = row >= fine_rows
                else:
                    past_keys = col >= fine_cols
                low = tl.minimum(low, tl.where(ok, fine, tl.where(past_keys, 1, 2)))
                high = tl.maximum(high, fine)
        classes = tl.minimum(high, 1) + (low == 2).to(tl.int32)  # 0 all EMPTY, 2 all FULL, else 1
        hit = ((classes == WANTED) & (cols < num_cols)).to(tl.int32)
        tl.store(out + found + tl.cumsum(hit, 0) - 1, cols, mask=hit != 0)
        found += tl.sum(hit, 0)
    return found


@triton.jit
def block_lists_kernel(Classes, Counts, Indices, fine_rows, fine_cols, stride_fr, stride_fc,
                       num_rows, num_cols,
                       FACTOR_R: tl.constexpr, FACTOR_C: tl.constexpr, TILES: tl.constexpr,
                       KEYS_ON_ROWS: tl.constexpr):
    """One row of the lists (``block_lists`` of ``coarsen``): the row's classes, coarsened by
    FACTOR_R x FACTOR_C, compacted PARTIAL first then FULL, each in column order, in two passes
    over the (small) classes. ``stride_fr``/``stride_fc`` walk the fine classes in the lists'
    orientation (transposed for lists by key: KEYS_ON_ROWS). Slots past the two counts are not
    written."""
    pid_bh = tl.program_id(0) // num_rows  # one grid axis: y stops at 65535
    pid_r = tl.program_id(0) % num_rows
    base = Classes + pid_bh.to(tl.int64) * fine_rows * fine_cols
    out = Indices + (pid_bh * num_rows + pid_r).to(tl.int64) * num_cols
    num_partial = _append_class(base, out, tl.zeros([], tl.int32), pid_r, fine_rows, fine_cols, stride_fr,
                                stride_fc, num_cols, 1, FACTOR_R, FACTOR_C, TILES, KEYS_ON_ROWS)  # PARTIAL
    found = _append_class(base, out, num_partial, pid_r, fine_rows, fine_cols, stride_fr, stride_fc, num_cols,
                          2, FACTOR_R, FACTOR_C, TILES, KEYS_ON_ROWS)  # FULL
    counts = Counts + (pid_bh * num_rows + pid_r).to(tl.int64) * 2
    tl.store(counts, num_partial)
    tl.store(counts + 1, found - num_partial)


CLASS_COLUMNS, CLASS_ROWS, LIST_TILES = 512, 8, 128  # mask elements per program row / per load; list chunk


def _unchanged_mark(tensor: Optional[torch.Tensor]):
    """What identifies ``tensor``'s values while it lives: its storage, view and version (every
    in-place write, through any view, bumps the version). False for an inference tensor, which
    has no version: its values cannot be vouched for."""
    if tensor is None:
        return None
    if tensor.is_inference():
        return False
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor._version)


def build_block_lists(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], shape,
                      tiles: Sequence[Tuple[int, int, bool]], causal_offset: Optional[int] = None,
                      window: Optional[Tuple[int, int]] = None, store: Optional[dict] = None) -> List[BlockLists]:
    """The kernels' lists for each ``(block_m, block_n, by_key)`` in ``tiles``: what
    ``block_lists(coarsen(tile_classes(...)), by_key)`` gives (slots past the counts aside),
    from one classification at the smallest tiles (each size a power of two), by launches.

    attn_mask: bool (True = may attend) broadcastable to ``shape = (B, H, Lq, Lk)``, or None;
    key_padding_mask: bool ``(B, Lk)``, True = padding, or None (not both None).

    ``store``: a dict that keeps the lists built for each (shape, tiles, causal_offset, window)
    with the masks they came from, and gives them back, with no launch, to a later call with
    the same masks unchanged (the same storage and view, not written since: ``_unchanged_mark``;
    the entry holds the masks, so their storage cannot be freed and reused meanwhile). A
    decoding step's cross-attention passes its cache's store: every layer and step has the same
    memory padding mask."""
    key = marks = None
    if store is not None:
        key = (tuple(shape), tuple(tiles), causal_offset, window)
        marks = (_unchanged_mark(attn_mask), _unchanged_mark(key_padding_mask))
        entry = store.get(key)
        if entry is not None and False not in marks and entry[0] == marks:
            return entry[2]
    lists = _build_block_lists(attn_mask, key_padding_mask, shape, tiles, causal_offset, window)
    if store is not None and False not in marks:
        store[key] = (marks, (attn_mask, key_padding_mask), lists)
    return lists


def _build_block_lists(attn_mask, key_padding_mask, shape, tiles, causal_offset, window) -> List[BlockLists]:
    batch, heads, seqlen_q, seqlen_k = shape
    device = (attn_mask if attn_mask is not None else key_padding_mask).device
    block_m, block_n = min(tile[0] for tile in tiles), min(tile[1] for tile in tiles)
    num_m, num_n = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    # bool read as uint8 (same bytes); an absent mask's place is taken by the other (never read)
    mask = padding = None
    mask_strides, padding_strides = (0, 0, 0, 0), (0, 0)
    if attn_mask is not None:
        mask = attn_mask.expand(shape).view(torch.uint8)
        mask_strides = mask.stride()
    if key_padding_mask is not None:
        padding, padding_strides = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    mask, padding = (mask if mask is not None else padding), (padding if padding is not None else mask)
    list_batch = batch if key_padding_mask is not None or mask_strides[0] else min(batch, 1)
    list_heads = heads if mask_strides[1] else min(heads, 1)
    classes = torch.empty(list_batch, list_heads, num_m, num_n, dtype=torch.uint8, device=device)
    if classes.numel():
        class_tiles = max(1, CLASS_COLUMNS // block_n)
        tile_classes_kernel[(list_batch * list_heads * num_m, -(-num_n // class_tiles))](
            mask, padding, classes, *mask_strides, *padding_strides, list_heads, seqlen_q, seqlen_k, num_m, num_n,
            causal_offset or 0, *(window or (0, 0)),
            HAS_MASK=attn_mask is not None, MASK_ROWS=mask_strides[2] != 0 and seqlen_q > 1,
            HAS_KEY_PADDING=key_padding_mask is not None, CAUSAL=causal_offset is not None,
            WINDOW=window is not None, BLOCK_M=block_m, BLOCK_N=block_n, TILES=class_tiles, ROWS=CLASS_ROWS,
            num_warps=4, enable_fp_fusion=True)
    lists = []
    for tile_m, tile_n, by_key in tiles:
        factor_m, factor_n = tile_m // block_m, tile_n // block_n
        if factor_m * block_m != tile_m or factor_n * block_n != tile_n:
            raise ValueError(f"tile sizes {tiles} are not multiples of the smallest ({block_m}, {block_n})")
        rows, cols = -(-seqlen_q // tile_m), -(-seqlen_k // tile_n)
        fine = (num_m, num_n, num_n, 1, factor_m, factor_n)  # rows, cols, their strides, factors
        if by_key:
            rows, cols, fine = cols, rows, (num_n, num_m, 1, num_n, factor_n, factor_m)
        counts = torch.empty(list_batch, list_heads, rows, 2, dtype=torch.int32, device=device)
        indices = torch.empty(list_batch, list_heads, rows, cols, dtype=torch.int32, device=device)
        if counts.numel():
            block_lists_kernel[(list_batch * list_heads * rows,)](
                classes, counts, indices, *fine[:4], rows, cols, FACTOR_R=fine[4], FACTOR_C=fine[5],
                TILES=LIST_TILES, KEYS_ON_ROWS=by_key, num_warps=4,
                enable_fp_fusion=True)
        lists.append(BlockLists(counts.expand(batch, heads, rows, 2), indices.expand(batch, heads, rows, cols)))
    return lists
