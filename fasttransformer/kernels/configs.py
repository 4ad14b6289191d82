"""Tile sizes, warps and pipeline stages of the attention kernels, by a small table per
(GPU arch, dtype, head dim, causal): no autotuning at a first call, so the first call costs one
compile and timings are reproducible.

The table's entries were chosen by compiling for the target with ptxas (registers, spills,
shared memory: ``python -m fasttransformer.kernels.aot``), not yet by timing on the GPU; a GPU
session is to retune them with ``fasttransformer bench attention`` (issue 3). Every entry is
compiled for sm_80, sm_86 and sm_90, in bf16 and float32, by the AOT test, which fails on a
spill (or on more shared memory than the arch has).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# (arch, head-dim bucket) -> forward config, for 2-byte dtypes. Chosen by the
# ptxas sweep of 2026-11-23 (worst case: every mask on): the largest tiles without a spill.
FORWARD = {
    (80, 16): Config(128, 64, 8, 2), (80, 32): Config(128, 64, 8, 2), (80, 64): Config(128, 64, 8, 2),
    (80, 128): Config(128, 32, 8, 2), (80, 256): Config(64, 32, 8, 2),
    (90, 16): Config(128, 64, 8, 2), (90, 32): Config(128, 64, 8, 2), (90, 64): Config(128, 64, 8, 2),
    (90, 128): Config(128, 64, 8, 2), (90, 256): Config(64, 32, 8, 2),
}
# The backward's two kernels have their own tiles (one classification of the masks serves both:
# block_lists.coarsen). The dK/dV kernel's products have BLOCK_N rows (it works on S^T), the
# dQ kernel's BLOCK_M rows: each wants its own long side, as in FlashAttention-2.
BACKWARD_DKDV = {
    (80, 16): Config(32, 128, 8, 2), (80, 32): Config(32, 128, 8, 2), (80, 64): Config(64, 32, 8, 1),
    (80, 128): Config(32, 64, 8, 2), (80, 256): Config(16, 32, 8, 1),
    (90, 16): Config(32, 128, 8, 2), (90, 32): Config(32, 128, 8, 2), (90, 64): Config(32, 128, 8, 2),
    (90, 128): Config(32, 64, 8, 2), (90, 256): Config(16, 32, 8, 1),
}
BACKWARD_DQ = {
    (80, 16): Config(128, 64, 8, 2), (80, 32): Config(128, 32, 8, 2), (80, 64): Config(128, 32, 8, 2),
    (80, 128): Config(64, 32, 8, 2), (80, 256): Config(64, 32, 8, 2),
    (90, 16): Config(128, 64, 8, 2), (90, 32): Config(128, 64, 8, 2), (90, 64): Config(128, 64, 8, 2),
    (90, 128): Config(128, 32, 8, 2), (90, 256): Config(64, 32, 8, 2),
}
# float32 inputs (tf32x3 products: three per dot, with split operands in registers) need
# smaller tiles, and above D = 64 the backward spills even at 16 x 16 tiles (sweep of
# 2026-11-23): on CUDA the kernels take float32 up to MAX_FP32_HEAD_DIM, and torch computes the
# rest (ops.scaled_dot_product_attention says so).
MAX_FP32_HEAD_DIM = 64
FORWARD_FP32 = {(arch, d): Config(32, 64, 8, 2) for arch in (80, 90) for d in (16, 32, 64)}
BACKWARD_DKDV_FP32 = {(arch, d): Config(32, 16, 4, 1) if d > 16 else Config(16, 64, 4, 1)
                      for arch in (80, 90) for d in (16, 32, 64)}
BACKWARD_DQ_FP32 = {(arch, d): Config(32, 16, 4, 1) for arch in (80, 90) for d in (16, 32, 64)}
# Once the kernels skipped the masks on interior tiles (their loops split in three), these two
# spilled 16 and 24 bytes; the nearest configs without a spill (ptxas sweep of 2026-11-23),
# both with wgmma where the old ones had none.
FORWARD_FP32[(90, 32)] = Config(64, 32, 8, 2)
BACKWARD_DQ_FP32[(90, 32)] = Config(64, 16, 4, 1)

# With dropout (its Philox state and mask are more live registers), the entries above that
# spill are replaced by these: the largest tiles without a spill (worst-case masks + dropout),
# keeping wgmma on sm_90 where the entry had it; sweep of 2026-11-23 over 400 candidates,
# untimed like the rest. Keys: (kernel, "2-byte" or "fp32", arch, head-dim bucket).
DROPOUT_OVERRIDES = {
    ("dkdv", "2-byte", 80, 128): Config(64, 32, 8, 1),
    ("dq", "2-byte", 80, 64): Config(128, 32, 8, 1),  # since the interior-tile split: 24 bytes at 2 stages
    ("dq", "2-byte", 80, 128): Config(32, 64, 8, 2),  # and 8 bytes at (64, 32, 8, 2)
    ("dq", "2-byte", 80, 256): Config(32, 64, 8, 2),
    ("dkdv", "2-byte", 90, 64): Config(32, 64, 8, 2),
    ("dkdv", "2-byte", 90, 128): Config(16, 64, 8, 2),
    ("dq", "2-byte", 90, 256): Config(128, 16, 8, 2),
    ("forward", "fp32", 80, 32): Config(64, 32, 8, 2),
    ("forward", "fp32", 90, 64): Config(64, 32, 8, 2),
}

# The int64-offset variants (inputs of 2**31 elements or more, attention_forward.int64_offsets)
# of the entries above that spill take these instead; the usual variants keep theirs. Keys:
# (kernel, "2-byte" or "fp32", arch, head-dim bucket, dropout). AOT check of 2026-12-02: the
# nearest config without a spill in every variant of the kernel (masks, dropout, offsets).
INT64_OVERRIDES = {
    ("dkdv", "2-byte", 80, 32, True): Config(32, 64, 8, 2),  # (32, 128, 8, 2): 8 bytes spilled at 255 registers
    ("dq", "2-byte", 80, 32, False): Config(128, 32, 8, 1),  # 2 stages: 16 bytes at 128, with a bool mask
}

# Triton 3.7 and 3.8 (the ones torch 2.13's and 2.14's CUDA wheels pin; CI and the GPU machine
# have 3.6) allocate registers differently: 16 and 13 of the 741 compiles above spilled 8 to 40
# bytes under them. The entries below replace those by the nearest config clean under 3.6.0,
# 3.7.1 and 3.8.0 alike (benchmarks/aot_sweep.py, 2026-12-06: benchmarks/results/2026-12-06-cpu/
# aot-sweep-tritons.json), untimed like the rest; the comment gives the old entry's spill. One is
# kept: sm_80's D = 128 dK/dV entry (32, 64, 8, 2) spills 16 bytes under 3.7.1 only, and every
# config clean under all three has half its tile, for every D = 128 backward on an A100: a change
# no timing supports (it, and the two on sm_86 below, no longer spill since the kernels' move to
# pointer arithmetic, 2026-12-07: see the end of the table).
INT64_OVERRIDES[("dkdv", "2-byte", 80, 32, False)] = Config(32, 128, 8, 1)  # 2 stages: 8 bytes (3.7.1)
INT64_OVERRIDES[("dkdv", "2-byte", 80, 128, False)] = Config(32, 32, 8, 2)  # (32, 64, 8, 2): 16 bytes (3.7.1)
INT64_OVERRIDES[("dkdv", "fp32", 80, 16, False)] = Config(16, 64, 8, 2)  # 4 warps, 1 stage: 16 bytes (3.7.1)
INT64_OVERRIDES[("dkdv", "fp32", 80, 32, True)] = Config(32, 16, 8, 2)  # 4 warps, 1 stage: 16 bytes (3.8.0)
INT64_OVERRIDES[("forward", "fp32", 80, 64, False)] = Config(32, 64, 8, 1)  # 2 stages: 8 bytes, float mask (3.7.1)
DROPOUT_OVERRIDES[("dkdv", "2-byte", 80, 32)] = Config(32, 64, 8, 2)  # (32, 128, 8, 2): 40 and 24 bytes
FORWARD_FP32[(80, 32)] = Config(32, 64, 8, 1)  # 2 stages: 8 bytes (3.8.0)
BACKWARD_DQ_FP32[(90, 64)] = Config(32, 16, 4, 2)  # 1 stage: 8 bytes (3.8.0)
DROPOUT_OVERRIDES[("dq", "2-byte", 90, 32)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes, float mask's gradient (3.7.1)

# The 99 KB parts: sm_86 (A10, A40, RTX 30xx), sm_89 (L4, L40, RTX 40xx) and sm_120 (RTX 50xx)
# give a block at most 101376 bytes of shared memory, where sm_80 gives 166912, and run their
# products as mma.sync, like sm_80. They take sm_80's entries, compiled for sm_86 (target 86 in
# the AOT check, which holds them to 99 KB), but for those that need more or spill there.
SMEM_99KB = 86
SMEM_99KB_BYTES = 101376
for _table in (FORWARD, BACKWARD_DKDV, BACKWARD_DQ, FORWARD_FP32, BACKWARD_DKDV_FP32, BACKWARD_DQ_FP32):
    _table.update({(SMEM_99KB, d): config for (arch, d), config in list(_table.items()) if arch == 80})
DROPOUT_OVERRIDES.update({(kernel, kind, SMEM_99KB, d): config
                          for (kernel, kind, arch, d), config in list(DROPOUT_OVERRIDES.items()) if arch == 80})
INT64_OVERRIDES.update({(kernel, kind, SMEM_99KB, d, dropout): config
                        for (kernel, kind, arch, d, dropout), config in list(INT64_OVERRIDES.items()) if arch == 80})
# sm_80's entries that need more than 99 KB (D = 256's dQ: 104448 bytes, 108544 with the float
# mask's gradient) or spill when compiled for sm_86 (8 to 24 bytes), replaced by the nearest
# config without either on sm_86 and on sm_120 (AOT sweep of 2026-12-04, 552 compiles:
# benchmarks/results/2026-12-04-cpu/aot-99kb-sweep.json). sm_89 compiles as sm_86 does.
# Each comment gives what sm_80's entry did on sm_86 (or on sm_120):
FORWARD[(SMEM_99KB, 16)] = Config(128, 64, 4, 2)  # 8 warps: 16 bytes spilled with a float mask
FORWARD[(SMEM_99KB, 32)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes spilled
BACKWARD_DQ[(SMEM_99KB, 16)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes, 24 with int64 offsets
BACKWARD_DQ[(SMEM_99KB, 256)] = Config(64, 32, 8, 1)  # 2 stages: 104448 bytes of shared memory
DROPOUT_OVERRIDES[("dq", "2-byte", SMEM_99KB, 256)] = Config(32, 32, 8, 1)  # (32, 64, 8, 2): 104448 bytes
FORWARD_FP32[(SMEM_99KB, 32)] = Config(64, 32, 8, 2)  # (32, 64, 8, 2): 8 to 16 bytes on sm_120
# 4 warps: 24 bytes (sm_120: with dropout); 8 warps, 1 stage: 24 bytes (3.7.1, 3.8.0)
BACKWARD_DKDV_FP32[(SMEM_99KB, 32)] = Config(32, 16, 8, 2)
BACKWARD_DQ_FP32[(SMEM_99KB, 32)] = Config(32, 16, 8, 1)  # 4 warps: 8 bytes with the float mask's gradient
INT64_OVERRIDES[("dkdv", "2-byte", SMEM_99KB, 16, False)] = Config(32, 128, 8, 1)  # 2 stages: 24 bytes on sm_120
# Under Triton 3.7 and 3.8 (see above; the 99 KB parts also take sm_80's new entries):
DROPOUT_OVERRIDES[("forward", "2-byte", SMEM_99KB, 16)] = Config(128, 64, 8, 2)  # 4 warps: 8 bytes, float mask (3.7.1)
DROPOUT_OVERRIDES[("forward", "2-byte", SMEM_99KB, 64)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes, split keys (3.8.0)
DROPOUT_OVERRIDES[("dkdv", "2-byte", SMEM_99KB, 32)] = Config(32, 64, 8, 1)  # sm_80's (32, 64, 8, 2): 40 bytes (3.8.0)
INT64_OVERRIDES[("dkdv", "2-byte", SMEM_99KB, 16, True)] = Config(32, 128, 8, 1)  # 2 stages: 16 bytes (3.8.0)
INT64_OVERRIDES[("dq", "fp32", SMEM_99KB, 64, True)] = Config(32, 16, 4, 2)  # 1 stage: 16 bytes (3.8.0)
# Kept, though they spilled under 3.7.1 or 3.8.0 on sm_86 (clean since 2026-12-07): the D = 32
# forward with split keys (8 and 16 bytes) and the D = 128 dK/dV kernel (8 bytes, 3.7.1); the
# configs clean there under all three spill 24 to 72 bytes on sm_120 under 3.6.
# Left as they are, clean on sm_86 but spilling 8 bytes on sm_120: the D = 128 forward with a
# float mask (the configs clean there have 1 stage or half the tile, for every D = 128 call: a
# change no timing supports) and the D = 256 dK/dV kernel with dropout.

# Since the kernels load their tiles through pointer arithmetic (Triton 3.9 removed the block
# pointers they used: attention_forward.load_tile), ptxas allocates their registers differently:
# 3, 7, 8 and 14 of the attention kernels' 741 compiles above spilled 8 to 56 stack bytes under
# 3.6.0, 3.7.1, 3.8.0 and 3.9.0 (AOT reports: benchmarks/results/2026-12-07-cpu/). These
# replace them by the nearest config clean under all four (benchmarks/aot_sweep.py, 2026-12-07),
# untimed like the rest; the comment gives the old entry and where it spilled. They are keyed by
# arch (after the 99 KB parts took sm_80's entries above).
BACKWARD_DQ[(80, 16)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes (3.6.0)
BACKWARD_DQ_FP32[(90, 16)] = Config(32, 16, 4, 2)  # 1 stage: 16 bytes (3.9.0), 8 with dropout, int64 (3.6.0, 3.8.0)
FORWARD_FP32[(90, 64)] = Config(32, 64, 8, 1)  # 2 stages: 16 to 56 bytes (3.9.0)
FORWARD[(SMEM_99KB, 16)] = Config(128, 64, 4, 1)  # 2 stages: 8 to 16 bytes (3.7.1, 3.8.0, 3.9.0)
DROPOUT_OVERRIDES[("forward", "2-byte", SMEM_99KB, 16)] = Config(128, 64, 8, 1)  # 2 stages: 8 bytes (3.7.1 to 3.9.0)
BACKWARD_DKDV_FP32[(SMEM_99KB, 32)] = Config(16, 16, 8, 2)  # (32, 16, 8, 2): 16 to 24 bytes (3.7.1 to 3.9.0)
# (128, 64, 8, 2): 24 bytes (3.8.0, 3.9.0); the new (128, 64, 8, 1) above: 24 bytes (3.6.0)
INT64_OVERRIDES[("dq", "2-byte", 80, 16, False)] = Config(64, 64, 8, 2)
INT64_OVERRIDES[("dq", "2-byte", 90, 256, False)] = Config(64, 16, 8, 2)  # (64, 32, 8, 2): 8 bytes (3.9.0)
INT64_OVERRIDES[("dq", "2-byte", SMEM_99KB, 64, True)] = Config(128, 16, 8, 2)  # (128, 32, 8, 1): 8 bytes (3.9.0)
INT64_OVERRIDES[("dq", "fp32", 80, 32, False)] = Config(32, 16, 8, 2)  # 4 warps, 1 stage: 8 bytes (3.7.1 to 3.9.0)
INT64_OVERRIDES[("dq", "fp32", SMEM_99KB, 16, True)] = Config(32, 16, 4, 2)  # 1 stage: 8 bytes (3.7.1)
INT64_OVERRIDES[("dq", "fp32", SMEM_99KB, 64, False)] = Config(32, 16, 4, 2)  # 1 stage: 16 bytes (3.9.0)
INT64_OVERRIDES[("dkdv", "fp32", 90, 32, False)] = Config(32, 16, 8, 2)  # 4 warps, 1 stage: 8 bytes (3.6.0)

# A value head dim Dv unlike the query's and key's D (DeepSeek's MLA: D = 192, Dv = 128; the
# Differential Transformer: Dv = 2 D) takes the entry of the larger's bucket above, and each is
# padded to its own tile (BLOCK_D, BLOCK_DV: ``tile_head_dims``). With their own tiles, the
# kernels below spill (registers to the stack) under Triton 3.6.0 or 3.9.0, in at least one of
# their variants: ``python -m fasttransformer.kernels.aot --value-head-dims all`` compiles every
# pair of buckets so (records: benchmarks/results/2026-12-07-cpu/aot-value-head-dims-*.json).
# Those pad both to the larger's bucket instead, like the table's own D = Dv kernel (with a second
# bound, for Dv), and pay for the padded columns' products: clean under 3.6.0; under 3.9.0, 11 of
# their 227 compiles still spill 8 to 64 bytes, in rare variants (float32 dQ with the float mask's
# gradient on sm_90; dK/dV with dropout and int64 offsets at D, Dv <= 32), left as they are. Keys: (kernel, "2-byte" or
# "fp32", arch, D's bucket, Dv's bucket, dropout, int64 offsets), written below as (kernel, kind,
# arch, D's, Dv's): its spilling (dropout, int64 offsets) variants. 140 of the 936 such kernels
# (110 under 3.6.0, 131 under 3.9.0), 80 of them the dK/dV kernel with Dv > D; DeepSeek's MLA
# (256, 128) has one, sm_90's dQ with dropout and int64 offsets, under 3.9.0 only.
EVERY_VARIANT = ((False, False), (False, True), (True, False), (True, True))
PADDED_VALUE_HEAD_DIMS = frozenset((*key, dropout, int64) for key, variants in {
    ('forward', '2-byte', 80, 16, 32): ((False, False),),
    ('forward', '2-byte', 80, 128, 64): ((False, False),),
    ('forward', '2-byte', 80, 256, 64): ((False, False), (False, True)),
    ('forward', '2-byte', 86, 32, 64): ((False, False),),
    ('forward', '2-byte', 86, 64, 16): ((False, False),),
    ('forward', '2-byte', 86, 128, 64): ((False, False), (True, True)),
    ('forward', 'fp32', 80, 64, 16): EVERY_VARIANT,
    ('forward', 'fp32', 80, 64, 32): EVERY_VARIANT,
    ('forward', 'fp32', 86, 32, 16): ((False, False),),
    ('forward', 'fp32', 86, 64, 16): EVERY_VARIANT,
    ('forward', 'fp32', 86, 64, 32): EVERY_VARIANT,
    ('forward', 'fp32', 90, 64, 16): ((False, False), (False, True)),
    ('forward', 'fp32', 90, 64, 32): ((False, False), (False, True)),
    ('dkdv', '2-byte', 80, 16, 32): ((True, True),),
    ('dkdv', '2-byte', 80, 16, 64): EVERY_VARIANT,
    ('dkdv', '2-byte', 80, 16, 128): ((False, True), (True, False), (True, True)),
    ('dkdv', '2-byte', 80, 16, 256): EVERY_VARIANT,
    ('dkdv', '2-byte', 80, 32, 64): EVERY_VARIANT,
    ('dkdv', '2-byte', 80, 32, 128): EVERY_VARIANT,
    ('dkdv', '2-byte', 80, 32, 256): EVERY_VARIANT,
    ('dkdv', '2-byte', 80, 64, 128): ((False, False),),
    ('dkdv', '2-byte', 86, 16, 32): ((True, True),),
    ('dkdv', '2-byte', 86, 16, 64): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 16, 128): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 16, 256): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 32, 16): ((True, True),),
    ('dkdv', '2-byte', 86, 32, 64): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 32, 128): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 32, 256): EVERY_VARIANT,
    ('dkdv', '2-byte', 86, 64, 128): ((False, False),),
    ('dkdv', '2-byte', 90, 16, 256): EVERY_VARIANT,
    ('dkdv', '2-byte', 90, 32, 256): EVERY_VARIANT,
    ('dkdv', 'fp32', 80, 16, 32): EVERY_VARIANT,
    ('dkdv', 'fp32', 80, 16, 64): EVERY_VARIANT,
    ('dkdv', 'fp32', 86, 16, 32): ((True, True),),
    ('dkdv', 'fp32', 86, 16, 64): EVERY_VARIANT,
    ('dkdv', 'fp32', 90, 16, 32): EVERY_VARIANT,
    ('dkdv', 'fp32', 90, 16, 64): EVERY_VARIANT,
    ('dkdv', 'fp32', 90, 32, 16): ((False, False),),
    ('dkdv', 'fp32', 90, 64, 32): ((False, True),),
    ('dq', '2-byte', 80, 16, 64): ((False, False),),
    ('dq', '2-byte', 80, 16, 128): ((False, False), (True, False), (True, True)),
    ('dq', '2-byte', 80, 16, 256): ((True, False), (True, True)),
    ('dq', '2-byte', 80, 32, 256): ((True, False), (True, True)),
    ('dq', '2-byte', 86, 16, 64): ((False, False),),
    ('dq', '2-byte', 86, 32, 128): ((False, False),),
    ('dq', '2-byte', 86, 32, 256): ((False, True),),
    ('dq', '2-byte', 86, 64, 256): ((False, False), (False, True)),
    ('dq', '2-byte', 86, 256, 16): ((True, True),),
    ('dq', '2-byte', 86, 256, 64): ((False, False), (False, True)),
    ('dq', '2-byte', 90, 256, 16): ((True, True),),
    ('dq', '2-byte', 90, 256, 32): ((True, True),),
    ('dq', '2-byte', 90, 256, 64): ((True, True),),
    ('dq', '2-byte', 90, 256, 128): ((True, True),),
    ('dq', 'fp32', 90, 16, 64): ((True, False), (True, True)),
    ('dq', 'fp32', 90, 32, 64): EVERY_VARIANT,
    ('dq', 'fp32', 90, 64, 16): ((True, True),),
    ('dq', 'fp32', 90, 64, 32): ((True, True),),
}.items() for dropout, int64 in variants)

# Triton's interpreter (CPU tensors): the tile sizes only change the interpreter's speed. The
# backward's two differ, so the CPU tests run the coarsening of the tile classes.
INTERPRETER = Config(64, 64, 4, 1)
INTERPRETER_DKDV, INTERPRETER_DQ = Config(32, 64, 4, 1), Config(64, 32, 4, 1)


def head_dim_bucket(head_dim: int) -> int:
    """The kernels' BLOCK_D for ``head_dim`` (the next power of two, at least 16), and the tables' key."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def _arch(device) -> int:
    if hasattr(device, "arch"):  # the AOT compile's stand-in for a GPU that is not here
        return device.arch
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_arch(device_index: int) -> int:
    """The tables' arch for a CUDA device: 90 for sm_90 and the datacenter Blackwells (sm_100,
    sm_110), else by shared memory: 80 (sm_80, sm_87) or SMEM_99KB (sm_86, sm_89, sm_120)."""
    properties = torch.cuda.get_device_properties(device_index)
    if properties.major >= 9 and properties.major != 12:
        return 90
    return 80 if properties.shared_memory_per_block_optin > SMEM_99KB_BYTES else SMEM_99KB


def _lookup(kernel, tables, device, dtype, head_dim, interpreter: Config, dropout: bool, int64: bool,
            head_dim_v=None) -> Config:
    """tables: (2-byte dtypes' table, float32's table). ``head_dim_v``: the value's head dim
    (None: ``head_dim``): the entry is the larger's."""
    if not hasattr(device, "arch"):
        device = torch.device(device)
    if device.type != "cuda":
        return interpreter
    key = (_arch(device), head_dim_bucket(max(head_dim, head_dim if head_dim_v is None else head_dim_v)))
    table = tables[1] if dtype == torch.float32 else tables[0]
    kind = "fp32" if dtype == torch.float32 else "2-byte"
    if int64 and (kernel, kind, *key, dropout) in INT64_OVERRIDES:
        return INT64_OVERRIDES[(kernel, kind, *key, dropout)]
    if dropout and (kernel, kind, *key) in DROPOUT_OVERRIDES:
        return DROPOUT_OVERRIDES[(kernel, kind, *key)]
    return table[key]


# The GQA row-packed forward (attention_forward.gqa_row_packing: PACK_GQA) holds each row's query
# index and its head's offset besides the unpacked kernel's state; three of sm_80's entries
# spilled with it: two with 64-bit offsets (stop 37, 2026-12-07), one under Triton 3.9 once spare
# rows came (stop 38). These replace them for packed calls only, keeping the entry's block_m (the
# launcher decides to pack from the table's block_m before it asks for this one): the first
# clean of the few tried. Keys: ("2-byte" or "fp32", arch, bucket, int64 offsets).
PACKED_OVERRIDES = {
    # 32-bit offsets: the table's (128, 32, 8, 2) is clean under Triton 3.6 at 255 registers, but
    # spilled 16 bytes under 3.9.0 once spare rows came (stop 38); (128, 16, 8, 2) takes 178 / 180
    ("2-byte", 80, 128, False): Config(128, 16, 8, 2),
    ("2-byte", 80, 128, True): Config(128, 32, 8, 1),  # 2 stages: 16 bytes spilled
    ("2-byte", 80, 256, True): Config(64, 16, 8, 2),  # (64, 32, 8, 2): 24 bytes; 1 stage: 568
}


def forward_config(device, dtype, head_dim: int, causal: bool, dropout: bool = False, int64: bool = False,
                   head_dim_v=None, packed: bool = False) -> Config:
    """The forward kernel's config. ``causal`` is part of the key for the table to come; no
    entry differs by it yet (no GPU timing has shown a reason). ``int64``: the launch uses the
    int64-offset variant. ``head_dim_v``: the value's head dim, when it differs from ``head_dim``.
    ``packed``: a GQA row-packed launch (PACKED_OVERRIDES; the same block_m)."""
    config = _lookup("forward", (FORWARD, FORWARD_FP32), device, dtype, head_dim, INTERPRETER, dropout, int64,
                     head_dim_v)
    return (packed and packed_override(device, dtype, head_dim, head_dim_v, int64)) or config


def packed_override(device, dtype, head_dim: int, head_dim_v=None, int64: bool = False) -> Optional[Config]:
    """PACKED_OVERRIDES' entry for a GQA row-packed forward, or None where the table's stands
    (the launcher asks only once it packs: host time)."""
    key = _override_key(device, dtype, head_dim, head_dim_v)
    return None if key is None else PACKED_OVERRIDES.get((*key, int64))


def _override_key(device, dtype, head_dim: int, head_dim_v=None):
    """("2-byte" or "fp32", arch, the larger head dim's bucket): the key of a CUDA launch in the
    override tables of one kernel's variants; None off CUDA (the interpreter's configs)."""
    if not hasattr(device, "arch"):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    kind = "fp32" if dtype == torch.float32 else "2-byte"
    return kind, _arch(device), head_dim_bucket(max(head_dim, head_dim if head_dim_v is None else head_dim_v))


def backward_configs(device, dtype, head_dim: int, causal: bool, dropout: bool = False,
                     int64: bool = False, head_dim_v=None) -> Tuple[Config, Config]:
    """(dK/dV kernel config, dQ kernel config)."""
    return (_lookup("dkdv", (BACKWARD_DKDV, BACKWARD_DKDV_FP32), device, dtype, head_dim, INTERPRETER_DKDV, dropout,
                    int64, head_dim_v),
            _lookup("dq", (BACKWARD_DQ, BACKWARD_DQ_FP32), device, dtype, head_dim, INTERPRETER_DQ, dropout, int64,
                    head_dim_v))


# The forward-mode (JVP) kernel (attention_jvp.py) walks the key tiles as the dQ kernel does and
# takes its config, but it holds the query's tangent besides the query, and its accumulator is
# over Dv: 41 of its 120 compiles spilled (or passed sm_86's shared memory) with the dQ kernel's
# configs. Where they did, these replace them: the largest tiles that compile clean in every JVP
# variant of the key (bool mask; float mask with its tangent; 32- and 64-bit offsets; the (D, Dv)
# pairs of the bucket), on the tensor cores (AOT sweep of 2026-12-07:
# benchmarks/results/2026-12-07-cpu/aot_jvp_sweep.py and aot-jvp-sweep.json). Untimed, like the
# rest; D = 256 keeps 16 query rows a program (no wgmma on sm_90): the query, its tangent and the
# float32 accumulator are 2 KB of registers a row there. Keys: ("2-byte" or "fp32", arch, bucket).
JVP_OVERRIDES = {
    ("2-byte", 80, 128): Config(128, 16, 8, 1), ("2-byte", 80, 256): Config(16, 64, 8, 2),
    ("2-byte", SMEM_99KB, 128): Config(32, 64, 8, 2), ("2-byte", SMEM_99KB, 256): Config(16, 64, 8, 1),
    ("2-byte", 90, 256): Config(16, 64, 8, 2),
    ("fp32", 80, 64): Config(16, 32, 8, 2), ("fp32", SMEM_99KB, 64): Config(16, 32, 8, 2),
    ("fp32", 90, 16): Config(16, 32, 8, 2), ("fp32", 90, 64): Config(16, 32, 8, 2),
}


# With dropout (its Philox state and draws) and 64-bit offsets, two of the entries above spilled
# 16 bytes: sm_80's D = 128 with the float mask's tangent, sm_90's D = 64 with a bool mask. These
# replace them there, the largest tiles clean in every job of the variant, on the tensor cores
# (AOT sweep of 2026-12-07, stop 36: benchmarks/results/2026-12-07-cpu/aot_jvp_dropout_sweep.py,
# aot-jvp-dropout-sweep.json). Keys: ("2-byte" or "fp32", arch, bucket, dropout, int64 offsets).
JVP_VARIANT_OVERRIDES = {
    ("2-byte", 80, 128, True, True): Config(128, 16, 8, 2),  # (128, 16, 8, 1): 16 bytes
    ("2-byte", 90, 64, True, True): Config(128, 32, 8, 2),  # (128, 64, 8, 2): 16 bytes
}


def jvp_config(device, dtype, head_dim: int, int64: bool = False, head_dim_v=None, dropout: bool = False) -> Config:
    """The forward-mode (JVP) kernel's config: the dQ kernel's (with dropout, its dropout entry),
    whose walk it shares, but where JVP_VARIANT_OVERRIDES or JVP_OVERRIDES has an entry for it
    (the JVP kernel holds the query's tangent besides the query, and accumulates over Dv)."""
    config = _lookup("dq", (BACKWARD_DQ, BACKWARD_DQ_FP32), device, dtype, head_dim, INTERPRETER_DQ, dropout, int64,
                     head_dim_v)
    key = _override_key(device, dtype, head_dim, head_dim_v)
    if key is None:
        return config
    return JVP_VARIANT_OVERRIDES.get((*key, dropout, int64)) or JVP_OVERRIDES.get(key, config)


def tile_head_dims(kernel: str, device, dtype, head_dim: int, head_dim_v: int, dropout: bool = False,
                   int64: bool = False) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_DV) of ``kernel`` ("forward", "dkdv" or "dq"): each head dim's bucket, but
    the larger's for both where PADDED_VALUE_HEAD_DIMS says that kernel spills with its own
    (CUDA only: the interpreter has no registers to spill)."""
    buckets = (head_dim_bucket(head_dim), head_dim_bucket(head_dim_v))
    if buckets[0] == buckets[1]:
        return buckets
    if not hasattr(device, "arch"):
        device = torch.device(device)
    if device.type == "cuda":
        kind = "fp32" if dtype == torch.float32 else "2-byte"
        if (kernel, kind, _arch(device), *buckets, dropout, int64) in PADDED_VALUE_HEAD_DIMS:
            return max(buckets), max(buckets)
    return buckets


# Split keys (flash-decoding): a call with fewer forward programs than the GPU has SMs (a
# decoding step: Lq = 1 and few sequences x heads) leaves SMs idle while each program walks
# all of Lk. Its key tiles are then shared out between num_splits programs per query block,
# at most one wave (SMs // programs) and at least MIN_TILES_PER_SPLIT tiles each, so the
# float32 partial results and the merge stay small next to the keys read. Untimed: a GPU
# session is to measure it (issue 3).
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 128


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def forward_splits(device, programs: int, key_tiles: int) -> int:
    """The forward's num_splits for a call with ``programs`` programs (query blocks x heads x
    batch) of ``key_tiles`` key tiles each: 1 off CUDA and whenever one wave is filled."""
    device = torch.device(device)
    if device.type != "cuda" or programs == 0:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(sms // programs, key_tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))


def delta_config(head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the backward's delta pre-pass: 8192 elements of each
    input per program (64 per thread), for every arch and dtype; a bandwidth-bound row sum."""
    block_d = head_dim_bucket(head_dim)
    return 8192 // block_d, block_d, 4
