"""Masked scaled-dot-product attention: ``fasttransformer.ops.scaled_dot_product_attention``.

Layers, top to bottom: the Triton kernels (fasttransformer/kernels/attention_*.py), their
launches registered as the custom ops ``fasttransformer::attention_forward`` /
``attention_backward`` (torch.library, with fake implementations and an autograd formula, so
torch.compile traces them) and wrapped, with the same formula, in an autograd.Function for eager
calls (less host time), the torch fallback, and the public function, which validates everything
once and dispatches.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import numbers
import os
from typing import List, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from fasttransformer.ops import autotune

logger = logging.getLogger("fasttransformer")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = ("auto", "triton", "torch")
MAX_HEAD_DIM = 256


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, key_padding_mask=None, window_size=None,
                                 backend="auto"):
    r"""``softmax(Q K^T * scale + mask) V``, as ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes: ``query (B, Hq, Lq, D)``, ``key (B, Hk, Lk, D)``, ``value (B, Hk, Lk, Dv)``; returns
    ``(B, Hq, Lq, Dv)`` in the query's dtype. As torch, other ranks work too, all three the same:
    ``(..., Hq, Lq, D)`` with any leading dims (equal in the three, none broadcast), folded into
    the batch; ``(Hq, Lq, D)`` and ``(Lq, D)``. ``key_padding_mask`` is then ``(..., Lk)``, the
    leading dims (none for ranks 2 and 3) followed by Lk. The value's head dim may differ from
    the query's (``Dv != D``, as in DeepSeek's MLA: D = 192, Dv = 128); the kernels then pad
    each to its own tile and take the config of the larger.

    Masks (they combine):
      * ``attn_mask``: bool (True = may attend) or float (added to the scores), broadcastable to
        ``(B, Hq, Lq, Lk)``; broadcast dimensions are read in place, never expanded. torch's
        ``causal_upper_left(Lq, Lk)`` / ``causal_lower_right(Lq, Lk)`` objects are accepted.
      * ``is_causal``: query i sees keys ``j <= i`` (top-left, as torch). May be combined with
        ``attn_mask`` (torch refuses that).
      * ``key_padding_mask``: bool ``(B, Lk)``, **True = padding** (torch.nn.MultiheadAttention's
        convention).
      * ``window_size``: ``w`` (the w keys before the query and itself) or ``(left, right)``,
        relative to the causal alignment in use (top-left when there is none). Without a causal
        mask, a window whose left reach covers key 0 for every query (``left >= Lq - 1``) is the
        causal mask ``j <= i + right`` and runs as one.
    A query that sees no key gets zeros and zero gradients, never NaN. In the Triton kernels a
    float mask value at or below about -2.4e38 (``torch.finfo(torch.float32).min``) acts as
    -inf (its base-2 scaling overflows): a row of only such values gives zeros there, where
    torch's math gives the mean of the values.

    ``backend``: ``"triton"`` (the fused kernels; on CPU tensors only under
    ``TRITON_INTERPRET=1``, set before triton is imported), ``"torch"`` (torch's SDPA, masks
    merged into one), or ``"auto"``: Triton for CUDA tensors when the kernels support the case,
    torch otherwise; the reason is logged at DEBUG level by the ``fasttransformer`` logger. Not
    in the kernels, so sent to torch by ``"auto"``: head dims (D or Dv) above 256, query heads
    above 65535, ``B * Hq * Lq >= 2**31`` (the kernels' int32 row offsets), dropout with a batch
    above 65535, and float32 CUDA tensors with head dims above 64 (float32 runs as tf32x3 products
    on CUDA). A batch above 65535 (CUDA's cap on the grid axis that holds it) takes one launch of
    each kernel per 65535 sequences.

    ``dropout_p > 0`` (applied whenever it is given, as torch's SDPA; pass 0 in eval): the
    kernels drop probabilities with Philox draws keyed by a seed taken from torch's generator
    on the inputs' device, so ``torch.manual_seed`` makes it reproducible, CUDA-graph replays
    draw fresh masks, and the backward regenerates the mask (nothing of size Lq x Lk is stored).
    p is rounded to a multiple of 2**-16. The torch backend draws its own, different masks.

    A float ``attn_mask`` that requires grad gets its gradient (summed over its broadcast
    dimensions; the Triton backward computes it through a float32 ``(B', Hq, Lq, Lk)`` buffer,
    B' sequences at a time, as many as fit in 1 GiB (at least one); all B with dropout).
    The Triton path has no second derivative: differentiating its gradients raises.

    torch.func works with the kernels: ``grad``, ``vjp``, ``jacrev`` and ``vmap`` (per-example
    gradients, a float mask's too; vmap folds its examples into the batch, one launch, or one
    per example with dropout, whose seed follows vmap's ``randomness``). Forward-mode
    derivatives (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) run in the Triton
    JVP kernel (kernels/attention_jvp.py: the output's tangent from the forward's logsumexp,
    nothing of size Lq x Lk written), for the tangents of the query, key, value and a float
    mask, with dropout too (the forward's mask, regenerated from its seed). No second
    derivatives (of a gradient or of a tangent). torch.compile over
    ``vmap`` runs the kernels; over ``grad`` (``vjp``, ``jacrev``) the custom op's autograd meets
    pytorch/pytorch#168393 in the compiled region: ``"auto"`` takes torch's SDPA there.

    Under ``torch.autocast`` for the inputs' device, every backend computes in the autocast
    dtype, as torch's SDPA does: the floating inputs (the float ``attn_mask`` too) but float64
    ones are cast to it first, and the output has it.

    ``scale`` (default ``1/sqrt(D)``) must be finite: a NaN or infinite one raises (torch's CPU
    kernel turns a NaN scale into numbers). Under torch.compile a changed scale recompiles.
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    if (all(isinstance(tensor, torch.Tensor) for tensor in (query, key, value))
            and any(tensor.dim() != 4 for tensor in (query, key, value))):
        lead, query_rank = query.shape[:-3], query.dim()
        query, key, value, attn_mask, key_padding_mask = _fold_to_4d(query, key, value, attn_mask, key_padding_mask)
        out = scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                           key_padding_mask=key_padding_mask, window_size=window_size,
                                           backend=backend)
        return out.reshape(*lead, *out.shape[-3:]) if lead else out.reshape(out.shape[4 - query_rank:])
    spec = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     key_padding_mask, window_size, backend)
    reason = _triton_unsupported(query, spec)
    forward_mode = not torch.compiler.is_compiling() and _forward_mode(query, key, value, spec["attn_mask"])
    if not reason and torch.compiler.is_compiling() and _func_differentiates():
        reason = ("torch.compile over torch.func's grad, vjp, jacrev or jvp: in the compiled region the custom op's "
                  "autograd hits pytorch/pytorch#168393 (torch.func outside torch.compile runs the kernels)")
    if backend == "triton" and reason:
        raise RuntimeError(f"backend='triton' cannot run this call: {reason}")
    if backend == "auto" and query.device.type != "cuda":
        reason = reason or "CPU tensors go to torch"
    if backend == "torch" or reason:
        if backend == "auto" and not torch.compiler.is_compiling():  # dynamo cannot trace logging
            logger.debug("scaled_dot_product_attention: torch backend (%s)", reason)
        if forward_mode:  # torch's fused kernels (flash, efficient, cuDNN, CPU flash) have no jvp either
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):
                return _torch_attention(query, key, value, spec)
        return _torch_attention(query, key, value, spec)
    seed = _dropout_seed(query.device) if spec["dropout_p"] > 0 else None
    args = (query, key, value, spec["attn_mask"], spec["key_padding_mask"], spec["scale"], spec["causal_offset"],
            list(spec["window"]) if spec["window"] else None, spec["dropout_p"], seed)
    tensors = (query, key, value, spec["attn_mask"])
    if forward_mode or torch._C._are_functorch_transforms_active():  # torch.func's transforms, dual tensors
        return _FuncAttention.apply(*args)[0]
    if _eager(*tensors):
        # Eager calls skip the custom op's dispatch, which costs ~40 us of host time a call without
        # autograd and ~180 us with it (benchmarks/bench_attention.py::test_attention_host_time),
        # as much as a decoding step's kernel: the same launches and autograd formula.
        if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
            return _EagerAttention.apply(*args)[0]
        return _launch_forward(*args)[0]
    return torch.ops.fasttransformer.attention_forward(*args)[0]


def _fold_to_4d(query, key, value, attn_mask, key_padding_mask):
    """Inputs of rank 2, 3 or >= 5 (all three the same rank) as the (B, H, L, D) the rest takes:
    rank >= 5 folds its leading dims into the batch, ranks 2 and 3 get size-1 batch (and heads).
    Masks follow: ``attn_mask`` broadcast to ``(..., Hq, Lq, Lk)`` (folded: its leading dims are
    expanded first, its last three stay broadcast), ``key_padding_mask (..., Lk)``."""
    rank = query.dim()
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != rank:
            raise ValueError(f"{name} is {tensor.dim()}-D but query is {rank}-D: query, key and value must have "
                             "the same rank")
    if rank < 2:
        raise ValueError(f"query, key and value must be at least 2-D (..., seq_len, head_dim), got shape "
                         f"{tuple(query.shape)}")
    lead = query.shape[:-3]
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape[:-3] != lead:
            raise ValueError(f"{name}'s leading dims {tuple(tensor.shape[:-3])} differ from query's {tuple(lead)} "
                             f"(shapes {tuple(tensor.shape)} and {tuple(query.shape)}; they are not broadcast)")

    from torch.nn.attention.bias import CausalBias

    if isinstance(attn_mask, torch.Tensor) and not isinstance(attn_mask, CausalBias):
        full = (*query.shape[:-1], key.shape[-2])
        try:
            broadcasts = attn_mask.dim() <= rank and torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            broadcasts = False
        if not broadcasts:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(..., heads, Lq, Lk) = {full}")
        if rank >= 5:
            attn_mask = attn_mask[(None,) * (rank - attn_mask.dim())]
            attn_mask = attn_mask.expand(*lead, *attn_mask.shape[-3:]).reshape(-1, *attn_mask.shape[-3:])
    if isinstance(key_padding_mask, torch.Tensor):
        expected = (*lead, key.shape[-2])
        if key_padding_mask.shape != expected:
            raise ValueError(f"key_padding_mask must be (..., Lk) = {expected} for {rank}-D inputs, got "
                             f"{tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.reshape(-1, key.shape[-2])
    if rank >= 5:
        query, key, value = (tensor.reshape(-1, *tensor.shape[-3:]) for tensor in (query, key, value))
    else:
        query, key, value = (tensor[(None,) * (4 - rank)] for tensor in (query, key, value))
    return query, key, value, attn_mask, key_padding_mask


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """torch.amp.is_autocast_available, evaluated once at trace time under torch.compile: torch
    2.11's dynamo cannot trace it (a graph break, so fullgraph=True failed), 2.13's can."""
    return torch.amp.is_autocast_available(device_type)


def _autocast(*tensors):
    """The tensors as torch's autocast hands them to its SDPA (in its lower-precision list):
    when autocast is on for the query's device, every floating tensor but float64 is cast to
    the autocast dtype. Unchanged otherwise (non-tensors too: validation names them)."""
    query = tensors[0]
    if (not isinstance(query, torch.Tensor) or not _autocast_available(query.device.type)
            or not torch.is_autocast_enabled(query.device.type)):  # meta tensors: no autocast
        return tensors
    from torch.nn.attention.bias import CausalBias

    dtype = torch.get_autocast_dtype(query.device.type)
    # Not a causal bias: it holds no values, and its .to() returns one without its variant.
    return tuple(tensor.to(dtype) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                 and tensor.dtype != torch.float64 and not isinstance(tensor, CausalBias) else tensor
                 for tensor in tensors)


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once, at trace time
def _func_differentiates() -> bool:
    """Whether a torch.func transform that differentiates (grad, vjp, jacrev, jvp) is active."""
    from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

    return any(interpreter.key() in (TransformType.Grad, TransformType.Jvp)
               for interpreter in retrieve_all_functorch_interpreters())


def _forward_mode(*tensors) -> bool:
    """Whether forward-mode AD sees the call: torch.func's jvp or jacfwd, or a dual tensor of
    torch.autograd.forward_ad among ``tensors`` (an eager call pays two attribute reads)."""
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters
        if any(interpreter.key() == TransformType.Jvp for interpreter in retrieve_all_functorch_interpreters()):
            return True
    return getattr(forward_ad, "_current_level", -1) >= 0 and any(
        tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)


def _eager(*tensors) -> bool:
    """Plain tensors in eager mode: no torch.compile, torch.jit.trace or dispatch mode
    (FakeTensorMode, ...), which need the custom op (as a graph node or its fake implementation).
    torch.func's transforms are not checked again: the caller sends them to _FuncAttention first."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and _get_current_dispatch_mode() is None
            and all(type(tensor) is torch.Tensor for tensor in tensors if tensor is not None))


def _dropout_seed(device) -> torch.Tensor:
    """The kernels' dropout seed: one int64 drawn from torch's generator for ``device`` (a device
    tensor, so CUDA graphs capture the draw and each replay gets a new one)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, key_padding_mask,
              window_size, backend) -> dict:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, seq_len, head_dim), got shape {tuple(tensor.shape)}")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
        if tensor.dtype != query.dtype or tensor.device != query.device:
            raise ValueError(f"{name} is {tensor.dtype} on {tensor.device} but query is {query.dtype} on "
                             f"{query.device}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, (bool, numbers.Integral)) or flag not in (0, 1):  # torch: "must be bool"
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    batch, heads, seqlen_q, head_dim = query.shape
    _, kv_heads, seqlen_k, _ = key.shape
    if head_dim == 0:
        raise ValueError(f"query's head dim (last dimension) must be at least 1, got shape {tuple(query.shape)}")
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[3] != head_dim:
        raise ValueError(f"head dims differ: query {head_dim}, key {key.shape[3]}")
    if value.shape[3] == 0 and head_dim:
        raise ValueError(f"value's head dim (last dimension) must be at least 1, got shape {tuple(value.shape)}")
    if value.shape[1:3] != key.shape[1:3]:
        raise ValueError(f"value heads/length {tuple(value.shape[1:3])} differ from key's {tuple(key.shape[1:3])}")
    if kv_heads != heads and not (enable_gqa and kv_heads > 0 and heads % kv_heads == 0):
        raise ValueError(f"query has {heads} heads and key {kv_heads}: pass enable_gqa=True with heads "
                         "a multiple of key heads" if not enable_gqa else
                         f"enable_gqa needs query heads ({heads}) to be a multiple of key heads ({kv_heads})")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
    # not math.isfinite: dynamo cannot trace it for a float it made symbolic (a compiled call whose
    # scale changed between calls); comparisons it can. torch's CPU kernel turns a NaN scale into numbers.
    if scale is not None and (scale != scale or abs(scale) == math.inf):
        raise ValueError(f"scale must be finite, got {scale}")

    from torch.nn.attention.bias import CausalBias, CausalVariant

    causal_offset = 0 if is_causal else None
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor, a CausalBias or None, got {type(attn_mask).__name__}")
    if isinstance(attn_mask, CausalBias):  # a torch.Tensor subclass: test it first
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (seqlen_q, seqlen_k):
            raise ValueError(f"attn_mask is a causal bias for ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
                             f"but the inputs are ({seqlen_q}, {seqlen_k})")
        lower_right = attn_mask.variant == CausalVariant.LOWER_RIGHT
        if is_causal and lower_right and seqlen_q != seqlen_k:
            raise ValueError("is_causal=True (top-left) and a causal_lower_right attn_mask disagree")
        causal_offset = seqlen_k - seqlen_q if lower_right else 0
        attn_mask = None
    if attn_mask is not None:
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        try:
            full = (batch, heads, seqlen_q, seqlen_k)
            if torch.broadcast_shapes(attn_mask.shape, full) != full:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(batch, heads, Lq, Lk) = {(batch, heads, seqlen_q, seqlen_k)}") from None
        if attn_mask.dim() < 4:  # a 4-D view: torch's SDPA fails on 1-D masks
            attn_mask = attn_mask[(None,) * (4 - attn_mask.dim())]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
        if key_padding_mask.shape != (batch, seqlen_k):
            raise ValueError(f"key_padding_mask must be (batch, Lk) = {(batch, seqlen_k)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")
    window = None
    if window_size is not None:
        try:
            pair = (window_size, 0) if isinstance(window_size, numbers.Integral) else tuple(window_size)
        except TypeError:  # not iterable (a float, say)
            pair = ()
        if len(pair) != 2 or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= 0
                                     for w in pair):
            raise ValueError(f"window_size must be an int >= 0 or a pair (left, right) of ints >= 0, "
                             f"got {window_size!r}")
        window = (int(pair[0]), int(pair[1]))
        if causal_offset is None and window[0] >= seqlen_q - 1:
            # No query's window starts after key 0: it is the causal mask j <= i + right (what
            # nn's compiled decoding passes for lower-right causal), on the kernels' causal path,
            # or no mask at all when every query sees the last key.
            causal_offset, window = (window[1] if window[1] < seqlen_k - 1 else None), None
    return {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "causal_offset": causal_offset,
            "window": window, "dropout_p": float(dropout_p), "enable_gqa": bool(enable_gqa),
            "value_head_dim": value.shape[3],
            "scale": 1.0 / math.sqrt(head_dim) if scale is None else float(scale)}


_GPU_UNSUPPORTED = {}  # device index -> _gpu_unsupported's answer


@torch.compiler.assume_constant_result  # under torch.compile: evaluated once, at trace time
def _gpu_unsupported(device_index: int) -> Optional[str]:
    """Why the Triton kernels cannot run on the GPU ``cuda:<device_index>``, or None. They need
    an NVIDIA GPU of sm_80 or newer: bfloat16 products, asynchronous copies, and configs
    (kernels/configs.py) sized for 99 KB or more of shared memory a block (a T4, sm_75, has
    64 KB). ROCm's GPUs (torch's "cuda" device there) are left to torch: the kernels and their
    configs have never been compiled or checked for them."""
    if device_index not in _GPU_UNSUPPORTED:
        major, minor = torch.cuda.get_device_capability(device_index)
        if torch.version.hip is not None:
            reason = f"the Triton kernels are built for NVIDIA GPUs; this is ROCm (HIP {torch.version.hip})"
        elif major < 8:
            reason = (f"the Triton kernels need a GPU of compute capability 8.0 (Ampere) or newer; "
                      f"cuda:{device_index} is sm_{major}{minor}")
        else:
            reason = None
        _GPU_UNSUPPORTED[device_index] = reason
    return _GPU_UNSUPPORTED[device_index]


def _triton_unsupported(query, spec) -> Optional[str]:
    """Why the Triton kernels cannot run this call, or None."""
    if query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported) for the Triton kernels"
    if query.device.type not in ("cpu", "cuda"):
        return f"tensors on {query.device.type}"
    if query.device.type == "cuda" and (reason := _gpu_unsupported(query.device.index)):
        return reason
    if query.device.type == "cpu" and query.dtype == torch.bfloat16:
        return "bfloat16 under Triton's interpreter multiplies raw bits (triton 3.6); use float16/float32 on CPU"
    if query.dtype == torch.float64:
        return "float64 is not in the Triton kernels (torch computes it)"
    head_dim = max(query.shape[-1], spec["value_head_dim"])  # the kernels' tiles and config follow the larger
    if head_dim > MAX_HEAD_DIM:
        return (f"head dim {query.shape[-1]} > {MAX_HEAD_DIM}" if query.shape[-1] > MAX_HEAD_DIM else
                f"value's head dim {spec['value_head_dim']} > {MAX_HEAD_DIM}")
    from fasttransformer.kernels.configs import MAX_FP32_HEAD_DIM
    if query.device.type == "cuda" and query.dtype == torch.float32 and head_dim > MAX_FP32_HEAD_DIM:
        return (f"float32 with head dim {head_dim} > {MAX_FP32_HEAD_DIM} on CUDA: the kernels' backward "
                "spills registers there (use bfloat16/float16, or torch computes it)")
    try:
        from fasttransformer.kernels.attention_forward import launch_sizes_unsupported  # imports triton
    except ImportError as error:  # torch computes the call
        if error.name == "triton":
            return "triton is not installed"
        return f"the Triton kernels cannot be imported: {error}"
    return launch_sizes_unsupported(*query.shape[:3], spec["dropout_p"] > 0)


def _torch_attention(query, key, value, spec):
    """torch's SDPA with every mask merged into one (dense) mask; rows with no visible key give
    zeros: they are given one harmless key for torch (whose softmax would be NaN) and zeroed after."""
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    if query.numel() == 0 or seqlen_k == 0:  # zeros, without torch's SDPA: torch 2.11's dies of SIGFPE on 0 heads,
        # and 2.13's gives an empty float mask no gradient. Filled with zeros, not multiplied by
        # 0 (inf * 0 is NaN), so that every input gets a zero gradient.
        everything = torch.ones((), dtype=torch.bool, device=query.device)
        out = query.new_zeros(*query.shape[:3], value.shape[3])
        for tensor in (query, key, value, spec["attn_mask"]):
            if tensor is not None and tensor.is_floating_point():
                out = out + tensor.masked_fill(everything, 0.0).sum().to(out.dtype)
        return out
    only_causal = spec["causal_offset"] == 0 and spec["window"] is None and spec["key_padding_mask"] is None
    if only_causal and spec["attn_mask"] is None:  # top-left: every query sees key 0, no empty row
        return F.scaled_dot_product_attention(query, key, value, dropout_p=spec["dropout_p"], is_causal=True,
                                              scale=spec["scale"], enable_gqa=spec["enable_gqa"])
    allowed = None
    if spec["causal_offset"] is not None or spec["window"] is not None:
        offset = spec["causal_offset"] or 0
        relative = (torch.arange(seqlen_k, device=query.device)[None, :]
                    - torch.arange(seqlen_q, device=query.device)[:, None] - offset)
        allowed = relative <= 0 if spec["causal_offset"] is not None else torch.ones_like(relative, dtype=torch.bool)
        if spec["window"] is not None:
            allowed = allowed & (relative >= -spec["window"][0]) & (relative <= spec["window"][1])
    if spec["key_padding_mask"] is not None:
        keep = ~spec["key_padding_mask"][:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    mask = spec["attn_mask"]
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
        mask = None
    if allowed is None and mask is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=spec["dropout_p"], scale=spec["scale"],
                                              enable_gqa=spec["enable_gqa"])
    # Masks keep their broadcast shapes: a (B, 1, 1, Lk) padding mask is never expanded.
    sees_nothing = None
    if allowed is not None:
        sees_nothing = ~allowed.any(-1, keepdim=True)
    if mask is not None:  # float: merge the boolean part in as -inf
        bias = mask.to(query.dtype)
        if allowed is not None:
            bias = torch.where(allowed, bias, float("-inf"))
        all_neg_inf = torch.isneginf(bias).all(-1, keepdim=True)
        sees_nothing = all_neg_inf if sees_nothing is None else sees_nothing | all_neg_inf
        merged = torch.where(sees_nothing, 0.0, bias)
    else:
        merged = allowed | sees_nothing
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=merged, dropout_p=spec["dropout_p"],
                                         scale=spec["scale"], enable_gqa=spec["enable_gqa"])
    return out.masked_fill(sees_nothing, 0.0)


# --- the launches and their autograd formula: the custom ops' and the eager path's ------------------

_BLOCK_LIST_STORE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("block_list_store", default=None)


@contextlib.contextmanager
def reusing_block_lists(store: dict):
    """Inside it, the Triton forward keeps the tile lists it builds for boolean masks in
    ``store`` and takes them back, without a launch, for a later call with the same mask
    tensors, unchanged since (same storage and view, no in-place write; not for inference
    tensors, which keep no version), and the same shapes and tiles
    (``kernels.block_lists.build_block_lists``). A static (cross-attention) KVCache holds one:
    the memory padding mask's lists are then built once per generation, not once per layer
    and step."""
    token = _BLOCK_LIST_STORE.set(store)
    try:
        yield
    finally:
        _BLOCK_LIST_STORE.reset(token)


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device, on its current stream: for tensors on another
    GPU (``cuda:1`` while ``cuda:0`` is current) that is the wrong device and a stream not ordered
    after the work that made them. Inside, the tensors' device is the current one, as torch's own
    ops (and the embedding extension's CUDAGuard) arrange."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                    scale: float, causal_offset: Optional[int],
                    window: Optional[List[int]] = None, dropout_p: float = 0.0,
                    seed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). ``seed`` (int64, one element) keys the dropout mask when ``dropout_p > 0``."""
    from fasttransformer.kernels.attention_forward import attention_forward
    window = tuple(window) if window else None
    with _on_device(query):
        if autotune.ENABLED is not False:  # FASTTRANSFORMER_AUTOTUNE=1 (off: one attribute read)
            masks = dict(attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal_offset=causal_offset,
                         window=window)
            config = autotune.forward_config(
                query, lambda config: attention_forward(query, key, value, **masks, scale=scale, dropout_p=dropout_p,
                                                        seed=seed, **_tiles(config)),
                key=key, value=value, **masks, dropout_p=dropout_p)
            return attention_forward(query, key, value, **masks, scale=scale, dropout_p=dropout_p, seed=seed,
                                     block_list_store=_BLOCK_LIST_STORE.get(), **_tiles(config))
        return attention_forward(query, key, value, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                 scale=scale, causal_offset=causal_offset, window=window, dropout_p=dropout_p,
                                 seed=seed, block_list_store=_BLOCK_LIST_STORE.get())


def _tiles(config) -> dict:
    """The forward launcher's arguments for a tuned ``config`` (None: none, the table's)."""
    if config is None:
        return {}
    return dict(block_m=config.block_m, block_n=config.block_n, num_warps=config.num_warps,
                num_stages=config.num_stages)


def _launch_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor],
                     key_padding_mask: Optional[torch.Tensor], scale: float, causal_offset: Optional[int],
                     window: Optional[List[int]] = None, bias_grad: bool = False, dropout_p: float = 0.0,
                     seed: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is the float attn_mask's gradient when ``bias_grad``, else an
    empty tensor (a custom op returns tensors)."""
    from fasttransformer.kernels.attention_backward import attention_backward
    grad_out, window = grad_out.contiguous(), tuple(window) if window else None
    with _on_device(query):
        if autotune.ENABLED is not False:  # FASTTRANSFORMER_AUTOTUNE=1 (off: one attribute read)
            def launch(dkdv_config, dq_config):
                return attention_backward(grad_out, query, key, value, out, lse, attn_mask=attn_mask,
                                          key_padding_mask=key_padding_mask, scale=scale, causal_offset=causal_offset,
                                          window=window, bias_grad=bias_grad, dropout_p=dropout_p, seed=seed,
                                          dkdv_config=dkdv_config, dq_config=dq_config)
            dq, dk, dv, dbias = launch(*autotune.backward_configs(
                query, launch, key=key, value=value, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                causal_offset=causal_offset, window=window, dropout_p=dropout_p,
                bias_grad=bias_grad and attn_mask is not None))
        else:
            dq, dk, dv, dbias = attention_backward(grad_out, query, key, value, out, lse, attn_mask=attn_mask,
                                                   key_padding_mask=key_padding_mask, scale=scale,
                                                   causal_offset=causal_offset, window=window, bias_grad=bias_grad,
                                                   dropout_p=dropout_p, seed=seed)
    return dq, dk, dv, dbias if dbias is not None else query.new_empty(0)


def _setup_context(ctx, inputs, output):
    # torch.library fills in the defaults: every input is here.
    query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, key_padding_mask, seed)
    ctx.scale, ctx.causal_offset, ctx.window, ctx.dropout_p = scale, causal_offset, window, dropout_p


def _gradients(ctx, grad_out, launch_backward):
    query, key, value, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
    bias_grad = attn_mask is not None and attn_mask.dtype != torch.bool and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = launch_backward(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask,
                                        ctx.scale, ctx.causal_offset, ctx.window, bias_grad, ctx.dropout_p, seed)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None, None


class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and autograd formula, as a plain autograd.Function (eager calls).
    forward takes ctx: a separate setup_context makes every apply() bind the arguments to the
    signature with inspect (~50 us)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _launch_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        grads = _gradients(ctx, grad_out, _launch_backward)
        if not torch.is_grad_enabled():
            return grads
        # create_graph=True: tie the gradients to what they came from, so that differentiating
        # them raises (as through the custom op) instead of taking them for constants.
        # (once_differentiable would not: its error node does not lead back to the inputs.)
        present = [index for index, grad in enumerate(grads) if grad is not None]
        sources = [tensor for tensor in (grad_out, *ctx.saved_tensors) if tensor is not None]
        tied = _NoSecondDerivative.apply(len(present), *(grads[index] for index in present), *sources)
        grads = list(grads)
        for index, grad in zip(present, tied):
            grads[index] = grad
        return tuple(grads)


class _NoSecondDerivative(torch.autograd.Function):
    """The first ``count`` tensors, copied and tied to the others: their derivative raises."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(tensor.clone() for tensor in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_SECOND_DERIVATIVE)


_NO_SECOND_DERIVATIVE = ("fasttransformer's attention kernels have no second derivative: differentiating their "
                         "gradients (create_graph=True) is not supported; backend='torch' leaves it to torch's SDPA")


# --- custom ops: torch.compile sees them as single nodes --------------------------------------------

_attention_forward_op = torch.library.custom_op("fasttransformer::attention_forward", mutates_args=())(_launch_forward)
_attention_backward_op = torch.library.custom_op("fasttransformer::attention_backward",
                                                 mutates_args=())(_launch_backward)


@_attention_forward_op.register_fake
def _(query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window=None, dropout_p=0.0, seed=None):
    from fasttransformer.kernels.attention_forward import output_like
    return output_like(query, value.shape[-1]), query.new_empty(query.shape[:3], dtype=torch.float32)


@_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, scale, causal_offset, window=None,
      bias_grad=False, dropout_p=0.0, seed=None):
    dbias = attn_mask.new_empty(attn_mask.shape) if bias_grad else query.new_empty(0)  # contiguous, as the launcher's
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dbias


_attention_forward_op.register_autograd(
    lambda ctx, grad_out, grad_lse: _gradients(ctx, grad_out, _attention_backward_op), setup_context=_setup_context)


def _launch_jvp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                tangent_query: Optional[torch.Tensor], tangent_key: Optional[torch.Tensor],
                tangent_value: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
                key_padding_mask: Optional[torch.Tensor], tangent_mask: Optional[torch.Tensor], scale: float,
                causal_offset: Optional[int], window: Optional[List[int]] = None, dropout_p: float = 0.0,
                seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The output's tangent (forward mode) for the inputs' tangents (None: zero); ``dropout_p`` and
    ``seed`` the forward's (the same seed regenerates its dropout mask)."""
    from fasttransformer.kernels.attention_jvp import attention_jvp
    window = tuple(window) if window else None

    def launch(config=None):
        return attention_jvp(query, key, value, out, lse, tangent_query, tangent_key, tangent_value,
                             attn_mask=attn_mask, key_padding_mask=key_padding_mask, tangent_mask=tangent_mask,
                             scale=scale, causal_offset=causal_offset, window=window, dropout_p=dropout_p,
                             seed=seed, config=config)

    with _on_device(query):
        if autotune.ENABLED is False:  # the table's config, unless FASTTRANSFORMER_AUTOTUNE=1
            return launch()
        return launch(autotune.jvp_config(query, launch, key=key, value=value, attn_mask=attn_mask,
                                          key_padding_mask=key_padding_mask, causal_offset=causal_offset,
                                          window=window, dropout_p=dropout_p, tangent_mask=tangent_mask is not None))


_attention_jvp_op = torch.library.custom_op("fasttransformer::attention_jvp", mutates_args=())(_launch_jvp)


@_attention_jvp_op.register_fake
def _(query, key, value, out, lse, tangent_query, tangent_key, tangent_value, attn_mask, key_padding_mask,
      tangent_mask, scale, causal_offset, window=None, dropout_p=0.0, seed=None):
    from fasttransformer.kernels.attention_forward import output_like
    return output_like(query, value.shape[-1])


def _no_derivative_of_the_tangent(ctx, grad):
    raise RuntimeError(_NO_TANGENT_DERIVATIVE)


_NO_TANGENT_DERIVATIVE = ("fasttransformer's attention kernels have no derivative of their forward-mode tangent "
                          "(a second derivative); backend='torch' leaves it to torch's SDPA")
_attention_jvp_op.register_autograd(_no_derivative_of_the_tangent, setup_context=lambda ctx, inputs, output: None)


# --- torch.func (grad, vjp, jacrev, vmap, jvp, jacfwd) ------------------------------------------------

class _FuncAttention(torch.autograd.Function):
    """The custom op and its autograd formula under torch.func's transforms. They need an
    autograd.Function with a setup_context staticmethod, and the one torch generates for
    ``register_autograd`` has none: through it, torch.func.grad raises "it must override the
    setup_context staticmethod" (pytorch/pytorch#168393, open in torch 2.15). vmap runs this
    Function's ops under their batching rules below."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window, dropout_p, seed):
        return torch.ops.fasttransformer.attention_forward(query, key, value, attn_mask, key_padding_mask, scale,
                                                           causal_offset, window, dropout_p, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        query, key, value, attn_mask, key_padding_mask = inputs[:5]
        ctx.save_for_forward(query, key, value, *output, attn_mask, key_padding_mask, inputs[9])

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _gradients(ctx, grad_out, _FuncAttentionBackward.apply)

    @staticmethod
    def jvp(ctx, tangent_query, tangent_key, tangent_value, tangent_mask, *_):
        """The output's tangent from the JVP kernel (kernels/attention_jvp.py), which recomputes
        the probabilities from the forward's logsumexp (and its dropout mask from its seed); the
        logsumexp has none (it is internal)."""
        query, key, value, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
        if attn_mask is None or attn_mask.dtype == torch.bool:
            tangent_mask = None
        tangent_out = _FuncAttentionJvp.apply(query, key, value, out, lse, tangent_query, tangent_key, tangent_value,
                                              attn_mask, key_padding_mask, tangent_mask, ctx.scale, ctx.causal_offset,
                                              ctx.window, ctx.dropout_p, seed)
        return tangent_out, None


class _FuncAttentionBackward(torch.autograd.Function):
    """The backward op under torch.func: its gradients are built with a graph (torch.func.grad
    differentiates with create_graph=True), and differentiating them raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return torch.ops.fasttransformer.attention_backward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_SECOND_DERIVATIVE)

    @staticmethod
    def jvp(ctx, *tangents):  # forward over reverse (torch.func.hessian, jvp of grad)
        raise RuntimeError(_NO_SECOND_DERIVATIVE)


class _FuncAttentionJvp(torch.autograd.Function):
    """The tangent op under torch.func: differentiating the tangent (reverse over forward mode,
    ``grad`` of ``jvp``) raises, with our message (through the op's own registered autograd,
    torch.func would meet pytorch/pytorch#168393 first)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return torch.ops.fasttransformer.attention_jvp(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_NO_TANGENT_DERIVATIVE)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_TANGENT_DERIVATIVE)


def _batched(tensor: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    """``tensor`` with vmap's dimension first; an unbatched one expanded to ``size`` (a view)."""
    return tensor.movedim(dim, 0) if dim is not None else tensor.expand(size, *tensor.shape)


def _folded(tensor: torch.Tensor, dim: Optional[int], size: int, batch: Optional[int] = None) -> torch.Tensor:
    """vmap's ``size`` examples of a ``(batch, ...)`` tensor as one ``(size * batch, ...)``: every
    example's sequences in one launch. ``batch`` expands a mask's size-1 batch dimension first."""
    tensor = _batched(tensor, dim, size)
    if batch is not None:
        tensor = tensor.expand(size, batch, *tensor.shape[2:])
    return tensor.reshape(size * tensor.shape[1], *tensor.shape[2:])


def _per_example(op, size: int, in_dims, args) -> tuple:
    """``op`` once per vmap example, outputs stacked: with dropout, so that each example keeps its
    own seed (randomness="different") or shares one (randomness="same"), as vmap promises; and
    where the folded batch would pass the kernels' grid or int32 limits."""
    outputs = [op(*(arg.select(dim, index) if dim is not None else arg for arg, dim in zip(args, in_dims)))
               for index in range(size)]
    return tuple(torch.stack(parts) for parts in zip(*outputs))


@torch.library.register_vmap("fasttransformer::attention_forward")
def _(info, in_dims, query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window=None,
      dropout_p=0.0, seed=None):
    """Batching rule: the examples' sequences folded into the batch, one launch (the fallback
    would launch once per example)."""
    op, size = torch.ops.fasttransformer.attention_forward, info.batch_size
    args = (query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window, dropout_p, seed)
    in_dims = (*in_dims, *(None,) * (len(args) - len(in_dims)))
    batch, heads, seqlen_q = _batched(query, in_dims[0], size).shape[1:4]
    from fasttransformer.kernels.attention_forward import launch_sizes_unsupported
    if dropout_p > 0 or launch_sizes_unsupported(size * batch, heads, seqlen_q, False):
        return _per_example(op, size, in_dims, args), (0, 0)
    query, key, value = (_folded(tensor, dim, size) for tensor, dim in zip((query, key, value), in_dims))
    if attn_mask is not None and (in_dims[3] is not None or attn_mask.shape[0] != 1):
        attn_mask = _folded(attn_mask, in_dims[3], size, batch)  # else it broadcasts over them all as it is
    if key_padding_mask is not None:
        key_padding_mask = _folded(key_padding_mask, in_dims[4], size)
    out, lse = op(query, key, value, attn_mask, key_padding_mask, scale, causal_offset, window, dropout_p, seed)
    return (out.unflatten(0, (size, batch)), lse.unflatten(0, (size, batch))), (0, 0)


@torch.library.register_vmap("fasttransformer::attention_jvp")
def _(info, in_dims, query, key, value, out, lse, tangent_query, tangent_key, tangent_value, attn_mask,
      key_padding_mask, tangent_mask, scale, causal_offset, window=None, dropout_p=0.0, seed=None):
    """Batching rule (jacfwd: one tangent per example, the primals shared): the examples'
    sequences folded into the batch, one launch. With dropout, a launch per example: the draws
    are keyed by the sequence's index in the launch, which folding would change."""
    op, size = torch.ops.fasttransformer.attention_jvp, info.batch_size
    args = (query, key, value, out, lse, tangent_query, tangent_key, tangent_value, attn_mask, key_padding_mask,
            tangent_mask, scale, causal_offset, window, dropout_p, seed)
    in_dims = (*in_dims, *(None,) * (len(args) - len(in_dims)))
    batch, heads, seqlen_q = _batched(query, in_dims[0], size).shape[1:4]
    from fasttransformer.kernels.attention_forward import launch_sizes_unsupported
    if dropout_p > 0 or launch_sizes_unsupported(size * batch, heads, seqlen_q, False):
        return _per_example(lambda *example: (op(*example),), size, in_dims, args)[0], 0
    folded = [_folded(tensor, dim, size) if tensor is not None else None for tensor, dim in zip(args[:8], in_dims)]
    for index in (8, 10):  # a mask, and its tangent: each example's own, or one for them all as it is
        if args[index] is not None and (in_dims[index] is not None or args[index].shape[0] != 1):
            folded.append(_folded(args[index], in_dims[index], size, batch))
        else:
            folded.append(args[index])
    attn_mask, tangent_mask = folded[8:]
    if key_padding_mask is not None:
        key_padding_mask = _folded(key_padding_mask, in_dims[9], size)
    tangent_out = op(*folded[:8], attn_mask, key_padding_mask, tangent_mask, scale, causal_offset, window,
                     dropout_p, seed)
    return tangent_out.unflatten(0, (size, batch)), 0


@torch.library.register_vmap("fasttransformer::attention_backward")
def _(info, in_dims, grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, scale, causal_offset,
      window=None, bias_grad=False, dropout_p=0.0, seed=None):
    op, size = torch.ops.fasttransformer.attention_backward, info.batch_size
    args = (grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, scale, causal_offset, window,
            bias_grad, dropout_p, seed)
    in_dims = (*in_dims, *(None,) * (len(args) - len(in_dims)))
    batch, heads, seqlen_q = _batched(query, in_dims[1], size).shape[1:4]
    from fasttransformer.kernels.attention_forward import launch_sizes_unsupported
    if dropout_p > 0 or launch_sizes_unsupported(size * batch, heads, seqlen_q, False):
        return _per_example(op, size, in_dims, args), (0, 0, 0, 0)
    grad_out, query, key, value, out, lse = (_folded(tensor, dim, size) for tensor, dim in zip(args[:6], in_dims))
    mask_batch = None
    if attn_mask is not None and (bias_grad or in_dims[6] is not None or attn_mask.shape[0] != 1):
        # bias_grad: each example has its own gradient, so its mask is its own too
        mask_batch = _batched(attn_mask, in_dims[6], size).shape[1]
        attn_mask = _folded(attn_mask, in_dims[6], size, batch)
    if key_padding_mask is not None:
        key_padding_mask = _folded(key_padding_mask, in_dims[7], size)
    dq, dk, dv, dbias = op(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, scale, causal_offset,
                           window, bias_grad, dropout_p, seed)
    dq, dk, dv = (grad.unflatten(0, (size, batch)) for grad in (dq, dk, dv))
    if not bias_grad:
        return (dq, dk, dv, dbias), (0, 0, 0, None)
    dbias = dbias.unflatten(0, (size, batch))
    if mask_batch == 1:  # the example's mask is one for all its sequences: their gradients summed
        dbias = dbias.sum(1, keepdim=True, dtype=torch.float32).to(dbias.dtype)
    return (dq, dk, dv, dbias), (0, 0, 0, 0)
