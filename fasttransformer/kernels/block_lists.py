"""Which tiles of the (Lq x Lk) score matrix the attention kernels visit, and which of them read
the boolean masks: one cheap pass over the masks before the kernels (issue 3).

Every (query block, key block) tile is put in one of three classes:

* EMPTY: no query of the tile may see any of its keys (the boolean ``attn_mask`` is all False
  there, or every key of the block is padding, or the causal/window bounds exclude it). The
  kernels never visit it: no loads, no dot.
* PARTIAL: the kernels visit it and read the boolean ``attn_mask`` / ``key_padding_mask``.
* FULL: both masks are all True/all kept there: the kernels visit it without reading them.

The causal and window bounds only remove tiles here; the kernels still apply them element-wise
on the tiles they visit (a few integer compares). With one boolean mask the classes are exact.
With both, their combination is judged tile by tile (the exact one would need a
``(B, H, Lq, Lk)`` temporary), so a tile where each mask is partial but their combination is
empty is called PARTIAL: conservative, never the other way round.

For the kernels the classes become lists, as FlexAttention's BlockMask: for each row of tiles
(a query block; or a key block for the dK/dV kernel) the PARTIAL tiles' indices first, then the
FULL ones, and the two counts. Broadcast dimensions of the masks stay broadcast (stride 0): a
``(B, 1, 1, Lk)`` padding-style mask gives one list per sequence.

Pure torch, no synchronisation with the host (CUDA graphs capture it).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

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
    classes = None
    for values, block_rows in (
            (None if attn_mask is None else _compact(attn_mask.expand(shape)).view(torch.uint8), block_m),
            (None if key_padding_mask is None else (~key_padding_mask).view(torch.uint8)[:, None, None, :], 1)):
        if values is None:
            continue
        low, high = _tile_min_max(values, block_rows if values.shape[2] > 1 else 1, block_n)
        mask_classes = low + high  # of a 0/1 mask: 0 EMPTY, 1 PARTIAL, 2 FULL
        # Two masks: EMPTY if either is, FULL if both are, else PARTIAL (judged tile by tile).
        classes = mask_classes if classes is None else torch.minimum(classes, mask_classes)

    if causal_offset is not None or window is not None:
        device = classes.device
        offset = causal_offset or 0
        first_row = torch.arange(num_m, device=device)[:, None] * block_m
        last_row = torch.clamp(first_row + block_m, max=seqlen_q) - 1
        first_col = torch.arange(num_n, device=device)[None, :] * block_n
        last_col = torch.clamp(first_col + block_n, max=seqlen_k) - 1
        visible = torch.ones(num_m, num_n, dtype=torch.bool, device=device)
        if causal_offset is not None:  # some key j <= i + offset
            visible &= first_col <= last_row + offset
        if window is not None:  # some key in [i + offset - left, i + offset + right]
            visible &= (last_col >= first_row + offset - window[0]) & (first_col <= last_row + offset + window[1])
        classes = classes * visible  # EMPTY (0) where the bounds remove the whole tile
    return classes.expand(*classes.shape[:2], num_m, num_n)


def coarsen(classes: torch.Tensor, factor_m: int, factor_n: int) -> torch.Tensor:
    """The classes of tiles ``factor_m x factor_n`` times larger, from the classes of the small
    ones, exactly: EMPTY if all are EMPTY, FULL if all are FULL, PARTIAL otherwise. One
    classification then serves kernels with different tile sizes."""
    if factor_m == factor_n == 1:
        return classes
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
