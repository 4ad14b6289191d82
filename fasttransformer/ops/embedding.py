"""Token embedding + positional encoding in one kernel: ``token_positional_embedding``.

Layers, top to bottom: the native op ``torch.ops.fasttransformer.token_positional_embedding``
(C++/CUDA, csrc/embedding*.cpp and csrc/cuda/), its autograd formula and fake (meta)
implementation registered here with ``torch.library`` (so ``torch.compile(fullgraph=True)``
traces it), and the public function, which validates every argument once.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Union

import torch

from fasttransformer import _extension, reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int32, torch.int64)


def token_positional_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    pos_weight: Optional[torch.Tensor] = None,
    *,
    scale: float = 1.0,
    padding_idx: Optional[int] = None,
    start_pos: Union[int, torch.Tensor] = 0,
    dropout_p: float = 0.0,
    check_ids: bool = True,
) -> torch.Tensor:
    r"""Token embedding, scaling, positional encoding and dropout in one kernel.

    ``out[b, t] = dropout(weight[input_ids[b, t]] * scale + P[start_pos + t])``

    Args:
        input_ids: ``(B, L)`` int32 or int64 token ids in ``[0, V)``.
        weight: ``(V, d)`` embedding table (float32, float16, bfloat16 or float64).
            The output has its dtype.
        pos_weight: ``(P_max, d)`` learned position table, or ``None`` for the sinusoidal
            encoding of "Attention Is All You Need", computed in the kernel (no table is read):
            ``P[p, 2i] = sin(p / 10000^(2i/d))``, ``P[p, 2i+1] = cos(p / 10000^(2i/d))``
            (``d`` must then be even).
        scale: multiplies the token embedding (``sqrt(d)`` in the paper); finite.
        padding_idx: as in ``torch.nn.functional.embedding``: that row of ``weight`` gets no
            gradient (the forward is unchanged). Negative values count from the end.
        start_pos: position of token 0: an int, or an integer tensor ``(B,)`` with one start
            per sequence (incremental decoding, left padding). Under torch.compile an int that
            changes between calls stays symbolic: a decoding loop compiles once, not per step.
        dropout_p: dropout probability, applied inside the kernel with a Philox
            counter-based generator seeded from torch's generator (reproducible under
            ``torch.manual_seed``); the backward regenerates the mask instead of storing it.
            Like ``torch.nn.functional.dropout`` with ``training=True``: pass 0 in eval.
        check_ids: on CUDA, an id outside ``[0, V)`` (or a position outside the table) is
            turned into a Python ``IndexError`` by reading a flag back after the kernel, a
            host synchronisation. ``check_ids=False`` skips it: the kernel then stops with a
            device-side assert, as ``torch.nn.functional.embedding`` does. Either way no memory
            outside the tables is read. During CUDA graph capture the device-side assert is
            used. CPU inputs are always checked.

    On devices fasttransformer._C has no kernel for (MPS, XPU; CUDA in a build without CUDA
    kernels) the op runs as torch's unfused ops, with a warning, and torch's dropout masks.
    Under torch.func's transforms (grad, vjp, jacrev, jvp, vmap: per-example gradients, model
    ensembles) it runs as those ops too, which carry the transforms' rules; ids and positions
    that vmap batches cannot be read back, so ``F.embedding``'s own index check raises for
    them (an ``IndexError`` on the CPU, a device-side assert on CUDA), on a lookup of its own:
    under vmap over a stacked table too, torch's batching rule would let an id past one
    example's rows read the next example's.

    Returns:
        ``(B, L, d)`` tensor in ``weight.dtype``. Differentiable in ``weight`` and
        ``pos_weight``; under ``torch.use_deterministic_algorithms(True)`` the backward is
        bitwise reproducible (float16/bfloat16 tables always use that path).
    """
    _check_tensor("input_ids", input_ids)
    _check_tensor("weight", weight)
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64 token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (num_embeddings, dim), got shape {tuple(weight.shape)}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids is on {input_ids.device} but weight is on {weight.device}")
    num_embeddings, dim = weight.shape
    batch, seq_len = input_ids.shape
    if pos_weight is not None:
        _check_tensor("pos_weight", pos_weight)
        if pos_weight.dim() != 2 or pos_weight.shape[1] != dim:
            raise ValueError(
                f"pos_weight must be (max_positions, {dim}) to match weight, "
                f"got shape {tuple(pos_weight.shape)}"
            )
        if pos_weight.dtype != weight.dtype:
            raise TypeError(f"pos_weight is {pos_weight.dtype} but weight is {weight.dtype}")
        if pos_weight.device != weight.device:
            raise ValueError(f"pos_weight is on {pos_weight.device} but weight is on {weight.device}")
    elif dim % 2:
        raise ValueError(
            f"the sinusoidal encoding needs an even embedding dim, got weight.shape[1] = {dim} "
            "(pass pos_weight for learned positions)"
        )
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if scale != scale or abs(scale) == math.inf:  # not math.isfinite: dynamo cannot trace it (a symbolic float)
        raise ValueError(f"scale must be finite, got {scale}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if padding_idx is not None:
        if not isinstance(padding_idx, numbers.Integral) or isinstance(padding_idx, bool):
            raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
        if not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(
                f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}"
            )
        padding_idx = int(padding_idx) % num_embeddings

    start_tensor, start_offset = None, 0
    if isinstance(start_pos, torch.Tensor):
        if start_pos.dtype.is_floating_point or start_pos.dtype.is_complex or start_pos.dtype == torch.bool:
            raise TypeError(f"start_pos must be an integer tensor, got {start_pos.dtype}")
        if start_pos.dim() == 0:
            start_pos = start_pos.expand(batch)
        if start_pos.shape != (batch,):
            raise ValueError(
                f"start_pos must be an int or a (batch,) = ({batch},) tensor, "
                f"got shape {tuple(start_pos.shape)}"
            )
        if start_pos.device != weight.device:
            raise ValueError(f"start_pos is on {start_pos.device} but weight is on {weight.device}")
        start_tensor = start_pos.to(torch.int64)
    elif isinstance(start_pos, numbers.Integral) and not isinstance(start_pos, bool):
        start_offset = int(start_pos)
        if start_offset < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_offset}")
        if start_offset + seq_len > 2**63 - 1:  # positions are int64 in the kernels
            raise ValueError(f"start_pos + seq_len must be below 2**63, got {start_offset} + {seq_len}")
        if pos_weight is not None and seq_len > 0 and start_offset + seq_len > pos_weight.shape[0]:
            raise IndexError(
                f"start_pos + seq_len = {start_offset} + {seq_len} exceeds the "
                f"{pos_weight.shape[0]} rows of pos_weight"
            )
    else:
        raise TypeError(f"start_pos must be an int or an integer tensor, got {type(start_pos).__name__}")

    missing = _no_kernel_for(weight.device)
    if missing or torch._C._are_functorch_transforms_active():
        if missing:
            warnings.warn(f"token_positional_embedding: {missing}; it runs as torch's unfused ops there")
        return _torch_embedding(input_ids, weight, pos_weight, start_tensor, start_offset, float(scale),
                                float(dropout_p), padding_idx)
    _extension.require("fasttransformer.ops.token_positional_embedding")
    dropout_p = float(dropout_p)
    seed = _draw_seed(weight.device) if dropout_p > 0.0 else None
    return torch.ops.fasttransformer.token_positional_embedding(
        input_ids, weight, pos_weight, start_tensor, start_offset, float(scale), dropout_p, seed,
        padding_idx, bool(check_ids),
    )


def _no_kernel_for(device: torch.device) -> Optional[str]:
    """Why fasttransformer._C has no kernel for ``device`` (MPS, XPU; CUDA in a build without its
    CUDA kernels), or None. Meta tensors take the fake implementation."""
    if device.type in ("cpu", "meta") or not _extension.available():  # no _C at all: require() says so
        return None
    if device.type == "cuda":
        return None if _extension._C.WITH_CUDA else "fasttransformer._C was built without CUDA kernels"
    return f"fasttransformer._C has kernels for CPU and CUDA tensors, not {device.type}"


def _torch_embedding(input_ids, weight, pos_weight, start_pos, start_offset, scale, dropout_p, padding_idx):
    """The op in torch's own ops, for the devices _C has no kernel for and under torch.func's
    transforms (grad, vmap, jvp, ...: torch's ops carry their rules): the same value, rounded once
    from float32 (float64 for float64 tables) as the kernels do, torch's autograd and torch's
    dropout masks. The index checks read values back (a host synchronisation), as the CPU kernel
    checks always; the sinusoid is computed in float64 on the CPU (MPS has no float64)."""
    num_embeddings, dim = weight.shape
    # Values vmap batches cannot be read back: see _check_batched_indices.
    check = not any(_vmapped(tensor) for tensor in (input_ids, start_pos) if tensor is not None)
    low, high = torch.stack([input_ids.min(), input_ids.max()]).tolist() if check and input_ids.numel() else (0, 0)
    if not 0 <= low <= high < num_embeddings:  # one host synchronisation
        bad = input_ids[(input_ids < 0) | (input_ids >= num_embeddings)][0].item()
        raise IndexError(f"token_positional_embedding: input id {bad} is outside [0, num_embeddings = "
                         f"{num_embeddings})")
    starts = start_pos.cpu() if start_pos is not None else torch.zeros(input_ids.shape[0], dtype=torch.int64)
    positions = _positions(starts, start_offset, input_ids.shape, "cpu")  # (B, L) on the CPU
    rows = pos_weight.shape[0] if pos_weight is not None else math.inf
    if check and positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < rows:
        raise IndexError(f"token_positional_embedding: positions (start_pos + t) reach "
                         f"[{int(positions.min())}, {int(positions.max())}], outside [0, {rows})")
    if not check:
        _check_batched_indices(input_ids, num_embeddings, positions, rows)
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out = torch.nn.functional.embedding(input_ids, weight, padding_idx).to(compute) * scale
    if pos_weight is not None:
        out = out + torch.nn.functional.embedding(positions.to(weight.device), pos_weight).to(compute)
    else:  # one (L, d) table when every sequence starts at the same position
        same = start_pos is None
        table = reference.sinusoidal_positions(positions[:1] if same else positions, dim)
        out = out + table.to(device=weight.device, dtype=compute)
    return (torch.nn.functional.dropout(out, dropout_p) if dropout_p > 0.0 else out).to(weight.dtype)


def _check_batched_indices(input_ids, num_embeddings, positions, rows) -> None:
    """The index checks for ids and positions that vmap batches, which cannot be read back to
    raise on: ``F.embedding``'s own check, on a lookup that fails where an id is outside
    ``[0, num_embeddings)`` or a position outside ``[0, rows)`` (an IndexError on the CPU, a
    device-side assert on CUDA). Not the lookups into the tables themselves: under vmap over a
    stacked table too (an ensemble), torch's batching rule offsets each example's indices into
    one flattened table, where an id past an example's rows reads the next one's, silently."""
    outside = (input_ids < 0) | (input_ids >= num_embeddings)
    outside = outside | ((positions < 0) | (positions >= rows)).to(input_ids.device)
    # index 1 of a one-row table (unbatched: made here) is out of range; 0 is not
    torch.nn.functional.embedding(outside.long(), torch.zeros(1, 1, device=input_ids.device))


def _vmapped(tensor: torch.Tensor) -> bool:
    """Whether torch.func.vmap batches ``tensor``, under any of its other transforms' wrappers."""
    from torch._C import _functorch

    while _functorch.is_gradtrackingtensor(tensor) or _functorch.is_functionaltensor(tensor):
        tensor = _functorch.get_unwrapped(tensor)
    return _functorch.is_batchedtensor(tensor)


def _check_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _draw_seed(device: torch.device) -> torch.Tensor:
    # Drawn on the tensors' device from torch's generator: reproducible under torch.manual_seed,
    # no host synchronisation, and captured correctly by CUDA graphs.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _positions(start_pos: Optional[torch.Tensor], start_offset: int, shape, device) -> torch.Tensor:
    positions = torch.arange(shape[1], device=device, dtype=torch.int64) + start_offset
    positions = positions.expand(shape[0], shape[1])
    return positions + start_pos[:, None] if start_pos is not None else positions


def _setup_context(ctx, inputs, output):
    input_ids, weight, pos_weight, start_pos, start_offset, scale, dropout_p, seed, padding_idx, _ = inputs
    ctx.save_for_backward(input_ids, start_pos, seed)
    ctx.num_embeddings = weight.shape[0]
    ctx.max_positions = pos_weight.shape[0] if pos_weight is not None else 0
    ctx.start_offset, ctx.scale, ctx.dropout_p, ctx.padding_idx = start_offset, scale, dropout_p, padding_idx


def _backward(ctx, grad_output):
    input_ids, start_pos, seed = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    backward = torch.ops.fasttransformer.token_positional_embedding_backward
    grad_weight = grad_pos_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = backward(grad_output, input_ids, ctx.num_embeddings, ctx.scale, ctx.dropout_p,
                               seed, ctx.padding_idx, deterministic)
    if ctx.needs_input_grad[2]:
        positions = _positions(start_pos, ctx.start_offset, input_ids.shape, input_ids.device)
        grad_pos_weight = backward(grad_output, positions, ctx.max_positions, 1.0, ctx.dropout_p,
                                   seed, None, deterministic)
    return None, grad_weight, grad_pos_weight, None, None, None, None, None, None, None


if _extension.available():
    torch.library.register_autograd(
        "fasttransformer::token_positional_embedding", _backward, setup_context=_setup_context
    )

    @torch.library.register_fake("fasttransformer::token_positional_embedding")
    def _(input_ids, weight, pos_weight, start_pos, start_offset, scale, dropout_p, seed,
          padding_idx, check_ids):
        return weight.new_empty((input_ids.shape[0], input_ids.shape[1], weight.shape[1]))

    @torch.library.register_fake("fasttransformer::token_positional_embedding_backward")
    def _(grad_output, index, num_rows, multiplier, dropout_p, seed, padding_idx, deterministic):
        return grad_output.new_empty((num_rows, grad_output.shape[2]))
