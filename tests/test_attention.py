"""The Triton attention kernels against the float64 reference (issue 3).

On a machine without a GPU they run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), in float32 and float16: triton 3.6's interpreter multiplies bfloat16 dot
operands as raw bits, so bfloat16 is covered only on CUDA (make gpu-check)."""
import contextlib
import functools
import math
import os
import sys

import pytest
import torch

from accuracy import assert_within_torch_error, poisoned_allocations
from conftest import HAS_CUDA
from fasttransformer import reference

triton = pytest.importorskip("triton")
from fasttransformer.kernels.attention_backward import attention_backward  # noqa: E402
from fasttransformer.kernels.attention_forward import attention_forward  # noqa: E402
from fasttransformer.kernels.configs import Config  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (make gpu-check runs it)")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def causal_bool(seqlen_q, seqlen_k, offset):
    """True where query i may see key j under causal alignment `offset`."""
    return torch.arange(seqlen_k)[None, :] <= torch.arange(seqlen_q)[:, None] + offset


def window_bool(seqlen_q, seqlen_k, offset, left, right):
    relative = torch.arange(seqlen_k)[None, :] - (torch.arange(seqlen_q)[:, None] + offset)
    return (relative >= -left) & (relative <= right)


def make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks, dtype):
    """Inputs and the equivalent arguments for the kernel and for the reference (a dense bool
    mask merged from everything, plus the float bias)."""
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    kernel_args, allowed, bias = {}, torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool), None
    offset = seqlen_k - seqlen_q if "lower_right" in masks else 0
    if "causal" in masks or "lower_right" in masks:
        kernel_args["causal_offset"] = offset
        allowed &= causal_bool(seqlen_q, seqlen_k, offset)
    if "window" in masks:
        window = (5, 0) if ("causal" in masks or "lower_right" in masks) else (7, 3)
        kernel_args["window"] = window
        allowed &= window_bool(seqlen_q, seqlen_k, offset, *window)
    if "padding" in masks:
        padding = torch.rand(batch, seqlen_k) < 0.4
        padding[:, 0] = False  # every other sequence keeps a key
        if batch > 1:  # the first is all padding: its rows see nothing (with batch 1, the whole case would)
            padding[0] = True
        kernel_args["key_padding_mask"] = padding.to(DEVICE)
        allowed &= ~padding[:, None, None, :]
    if "bool" in masks:  # broadcast over heads, never expanded in memory
        mask = torch.rand(batch, 1, seqlen_q, seqlen_k) < 0.7
        kernel_args["attn_mask"] = mask.to(DEVICE)
        allowed &= mask
    if "float" in masks:  # (Lq, Lk), broadcast over batch and heads
        bias = torch.randn(seqlen_q, seqlen_k, dtype=dtype)
        bias[0, : seqlen_k // 2] = float("-inf")
        kernel_args["attn_mask"] = bias.to(DEVICE)
    return q, k, v, kernel_args, allowed, bias


SHAPES = [  # batch, heads, kv_heads, Lq, Lk, D
    pytest.param(2, 3, 3, 37, 63, 40, id="B2-H3-Lq37-Lk63-D40"),
    pytest.param(1, 4, 2, 128, 129, 64, id="B1-H4-Hk2-Lq128-Lk129-D64"),
    pytest.param(2, 2, 1, 1, 300, 16, id="B2-H2-Hk1-Lq1-Lk300-D16"),
    pytest.param(1, 2, 2, 200, 1, 128, id="B1-H2-Lq200-Lk1-D128"),
]
MASKS = ["none", "causal", "lower_right", "padding", "bool", "float", "window", "causal+window",
         "padding+bool+causal", "float+padding+lower_right", "window+padding"]


def reference_attention(q, k, v, allowed, bias, keep=None, dropout_p=0.0, scale=None):
    """``keep``: the dropout mask (bool (B, Hq, Lq, Lk), True = kept) and its ``dropout_p``."""
    attn_mask = allowed.to(q.device)
    if bias is not None:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask + bias.to(q.device, q.dtype)
    return reference.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True, dropout_p=dropout_p,
                                                  dropout_mask=None if keep is None else keep.to(q.device), scale=scale)


def reference_attention_scores(q, k, bias, scale=None):
    """S = Q K^T * scale (1 / sqrt(D) by default) (+ bias) in float64, with the key heads repeated for GQA."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = (q.double() @ k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return scores if bias is None else scores + bias.double().to(scores.device)


def assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads, live_keys=None, keep=None, dropout_p=0.0,
                             scale=None):
    """``out`` and ``grads = (dq, dk, dv)`` under the accuracy rule: against the float64
    reference, within 2x (3x for gradients) of plain PyTorch in the inputs' dtype.
    ``live_keys`` (B, Hk, Lk, 1) bool: dk/dv are compared only there, and must be 0 elsewhere.
    ``keep``/``dropout_p``: the dropout mask the kernels drew, applied by the reference too."""
    runs = []
    for cast in (torch.float64, q.dtype):
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        result = reference_attention(*leaves, allowed, bias, keep, dropout_p, scale)
        result.backward(grad_out.to(cast))
        runs.append((result, [leaf.grad for leaf in leaves]))
    (ref, ref_grads), (base, base_grads) = runs
    assert_within_torch_error(out, ref, base, 2.0, "output")
    # The floor's scale for gradients: the largest gradient, raised where the kernels' float32
    # scores dominate. The backward recomputes P = exp2(S - lse) with its products summed in
    # another order than the forward's (FlashAttention's design), so P is off by a few float32
    # ulps of S (base 2); where torch is exact by accident (a row with one visible key has
    # P = 1), that is the error left. It matters in float32 only: in float16 the input
    # dtype's own floor is far above it.
    scores = reference_attention_scores(q, k, bias, scale)
    finite = scores[torch.isfinite(scores)]
    largest_score = finite.abs().max().item() * math.log2(math.e) if finite.numel() else 0.0
    recompute = largest_score * torch.finfo(torch.float32).eps / torch.finfo(q.dtype).eps
    scale = max(grad.abs().max().item() for grad in ref_grads) * max(1.0, recompute)
    for name, grad, ref_grad, base_grad in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert grad.shape == ref_grad.shape and grad.dtype == q.dtype, name
        if live_keys is not None and name != "dq":
            assert (grad[~live_keys.expand_as(grad)] == 0).all(), f"{name} of a skipped key block"
            grad, ref_grad, base_grad = grad * live_keys, ref_grad * live_keys, base_grad * live_keys
        assert_within_torch_error(grad, ref_grad, base_grad, 3.0, name, magnitude=scale)


def assert_bias_grad_matches_reference(q, k, v, allowed, bias, grad_out, bias_grad):
    """A float mask's gradient ``bias_grad`` (``bias``'s shape) under the accuracy rule: within
    3x plain PyTorch's error in the inputs' dtype, against the float64 reference's."""
    ref_bias = bias.double().requires_grad_()
    reference_attention(*[t.detach().double() for t in (q, k, v)], allowed, ref_bias).backward(grad_out.double())
    base_bias = bias.clone().requires_grad_()
    reference_attention(q.detach(), k.detach(), v.detach(), allowed, base_bias).backward(grad_out)
    assert_within_torch_error(bias_grad, ref_bias.grad, base_bias.grad, 3.0, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen_q,seqlen_k,head_dim", SHAPES)
def test_forward_matches_reference(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks, dtype):
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)

    ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
    base = reference_attention(q, k, v, allowed, bias)  # plain PyTorch in the input dtype
    assert_within_torch_error(out, ref, base, 2.0, "attention output")

    # The logsumexp the backward will use: +inf exactly where a row sees no key.
    scores = (q.double() @ k.double().repeat_interleave(heads // kv_heads, 1).transpose(-2, -1)) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias.double().to(scores.device)
    scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    no_key = torch.isneginf(ref_lse)
    assert torch.equal(torch.isinf(lse), no_key.to(lse.device))
    assert (out[no_key.to(out.device)] == 0).all()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    if (~no_key).any():
        assert (lse[~no_key].double() - ref_lse[~no_key]).abs().max() < tolerance


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen_q,seqlen_k,head_dim", SHAPES)
def test_backward_matches_reference(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks, dtype):
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    grad_out = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)


def recompute_floor(q, k, bias, magnitude, scale=None):
    """``magnitude`` raised where the kernels' float32 scores dominate, for the kernels that
    recompute P = exp2(S - lse) (the backward's and the JVP's): see assert_matches_reference."""
    scores = reference_attention_scores(q, k, bias, scale)
    finite = scores[torch.isfinite(scores)]
    largest_score = finite.abs().max().item() * math.log2(math.e) if finite.numel() else 0.0
    return magnitude * max(1.0, largest_score * torch.finfo(torch.float32).eps / torch.finfo(q.dtype).eps)


def assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent_out, keep=None, dropout_p=0.0):
    """The output's tangent (forward mode) for the tangents of (q, k, v) and of ``bias`` (4th,
    when given) under the accuracy rule for derivatives: against the float64 reference's
    (torch.func.jvp), within 3x plain PyTorch's error in the inputs' dtype. ``keep``: the
    dropout mask of the forward, with its ``dropout_p``."""
    runs = []
    for cast in (torch.float64, q.dtype):
        def attend(q, k, v, bias=None):
            return reference_attention(q, k, v, allowed, bias, keep, dropout_p)
        primals = [t.detach().to(cast) for t in (q, k, v)] + ([bias.to(DEVICE, cast)] if len(tangents) == 4 else [])
        runs.append(torch.func.jvp(attend, tuple(primals), tuple(t.to(cast) for t in tangents))[1])
    ref, base = runs
    terms = tangent_terms(q, k, v, allowed, bias, tangents, keep, dropout_p)
    magnitude = recompute_floor(q, k, bias, max(ref.abs().max().item(), terms))
    assert_within_torch_error(tangent_out, ref, base, 3.0, "output tangent", magnitude=magnitude)


def random_tangents(q, k, v, bias):
    """(tangents of q, k, v and, with a float mask ``bias``, of the mask, 4th; the mask's or None)."""
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    tangent_mask = None if bias is None else torch.randn(bias.shape, device=DEVICE, dtype=q.dtype)
    return tangents + ([] if tangent_mask is None else [tangent_mask]), tangent_mask


def tangent_terms(q, k, v, allowed, bias, tangents, keep=None, dropout_p=0.0):
    """The size of the terms that cancel in an output's tangent, max_i sum_j |P_ij dS_ij| |v_j|
    (float64): the scale its error is judged at, as a gradient's is at the largest gradient's.
    Where P = 1 (one visible key) and only the query has a tangent, the tangent is exactly 0,
    and plain PyTorch gets 0 by accident (dS - rowsum(P dS) cancels to the bit); the kernel's
    (P * dS) V - rowsum(P * dS) O has the rounding of P * dS to the input dtype for the product.
    With dropout (``keep``), P's kept elements are scaled by 1 / (1 - dropout_p) there."""
    group = q.shape[1] // k.shape[1]
    keys, values = (t.double().repeat_interleave(group, 1).to(q.device) for t in (k, v))
    scores = reference_attention_scores(q, k, bias).masked_fill(~allowed.to(q.device), float("-inf"))
    probabilities = torch.softmax(scores, -1).nan_to_num(0.0)
    tangent_keys = tangents[1].double().repeat_interleave(group, 1)
    ds = (tangents[0].double() @ keys.transpose(-2, -1) + q.double() @ tangent_keys.transpose(-2, -1)) / math.sqrt(
        q.shape[-1])
    if len(tangents) == 4:
        ds = ds + tangents[3].double()
    if keep is not None:
        probabilities = probabilities * keep.to(probabilities.device) / (1 - dropout_p)
    return ((probabilities * ds).abs() @ values.abs()).max().item() if ds.numel() else 0.0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen_q,seqlen_k,head_dim", SHAPES)
def test_jvp_matches_reference(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks, dtype):
    """The JVP kernel (forward mode) from the forward's output and logsumexp, tangents for the
    query, key, value and a float mask, every mask kind; rows that see no key get a zero
    tangent."""
    from fasttransformer.kernels.attention_jvp import attention_jvp
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    tangents, tangent_mask = random_tangents(q, k, v, bias)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)
        tangent_out = attention_jvp(q, k, v, out, lse, *tangents[:3], tangent_mask=tangent_mask, **kernel_args)
    assert tangent_out.dtype == q.dtype and tangent_out.stride() == out.stride()
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent_out)
    no_key = ~allowed.any(-1)
    assert (tangent_out[no_key.to(tangent_out.device)] == 0).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
def test_jvp_with_dropout_matches_reference(masks, dtype):
    """Forward mode with dropout: the JVP kernel regenerates the forward's dropout mask from its
    seed, dO = (P dS Z) V + (P Z) dV - rowsum(P dS) O, against the float64 reference's tangent
    with that mask (GQA, Dv != D); rows that see no key get a zero tangent."""
    from fasttransformer.kernels.attention_jvp import attention_jvp
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dropout_p = 2, 4, 2, 37, 70, 40, 24, 0.3
    q, k, _, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim_v, device=DEVICE, dtype=dtype)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    tangents, tangent_mask = random_tangents(q, k, v, bias)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, dropout_p=dropout_p, seed=seed, **kernel_args)
        tangent_out = attention_jvp(q, k, v, out, lse, *tangents[:3], tangent_mask=tangent_mask, dropout_p=dropout_p,
                                    seed=seed, **kernel_args)
    keep = dropout_keep_mask(seed, (batch, heads, seqlen_q, seqlen_k), dropout_p)
    assert 0.6 < keep.float().mean().item() < 0.8
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent_out, keep,
                                     effective_dropout_p(dropout_p))
    assert (tangent_out[(~allowed.any(-1)).to(tangent_out.device)] == 0).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_with_one_visible_key_and_the_query_tangent_alone(dtype):
    """One visible key: P = 1, and the output (that key's value) does not move with the query,
    so the query's tangent gives a tangent of exactly 0; plain PyTorch gets 0 to the bit. The
    kernel's (P * dS) V - rowsum(P * dS) O cancels terms of size |dS| |v|: its result is within
    the rounding of P * dS to the input dtype, and the accuracy rule judges it at that scale
    (``tangent_terms``), found by a fuzzing probe."""
    from fasttransformer.kernels.attention_jvp import attention_jvp
    q, k, v, kernel_args, allowed, bias = make_case(1, 6, 2, 17, 1, 8, ["causal"], dtype)
    tangents = [torch.randn_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)
        tangent_out = attention_jvp(q, k, v, out, lse, tangents[0], **kernel_args)
    terms = tangent_terms(q, k, v, allowed, bias, tangents)
    assert terms > 0 and tangent_out.abs().max().item() <= 4 * torch.finfo(dtype).eps * terms
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent_out)


SPLIT_SHAPES = [  # batch, heads, kv_heads, Lq, Lk, D: decoding steps and a few query blocks
    pytest.param(2, 2, 1, 1, 300, 16, id="B2-H2-Hk1-Lq1-Lk300-D16"),
    pytest.param(1, 2, 2, 70, 200, 40, id="B1-H2-Lq70-Lk200-D40"),
]


@pytest.mark.parametrize("num_splits", [3, 7], ids=["3-splits", "7-splits"])  # 7 > the 5 key tiles: empty splits
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen_q,seqlen_k,head_dim", SPLIT_SHAPES)
def test_split_keys_forward_matches_reference(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks,
                                              num_splits):
    """Flash-decoding: each query block's key tiles shared out between num_splits programs,
    merged by attention_combine_kernel, for every mask kind (the lists' positions are split
    too). The output and the logsumexp (+inf exactly where a row sees no key) as unsplit."""
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), torch.float32)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, num_splits=num_splits, **kernel_args)
        unsplit_out, unsplit_lse = attention_forward(q, k, v, num_splits=1, **kernel_args)
    ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
    assert_within_torch_error(out, ref, reference_attention(q, k, v, allowed, bias), 2.0, "split output")
    assert torch.equal(torch.isinf(lse), torch.isinf(unsplit_lse)) and (out[torch.isinf(lse)] == 0).all()
    seen = torch.isfinite(unsplit_lse)
    assert (lse[seen] - unsplit_lse[seen]).abs().max() < 1e-5 if seen.any() else True


def test_split_keys_backward_and_dropout():
    """The merged logsumexp serves the backward, and dropout keeps the same elements split or
    not (its draws are keyed by the element's indices, not by the program)."""
    q, k, v, kernel_args, allowed, bias = make_case(2, 4, 2, 3, 250, 32, ["padding", "lower_right"], torch.float32)
    grad_out = torch.randn_like(q)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, num_splits=4, **kernel_args)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    dropped = [attention_forward(q, k, v, dropout_p=0.3, seed=seed, num_splits=splits, **kernel_args)
               for splits in (1, 4)]
    assert torch.allclose(dropped[0][0], dropped[1][0], atol=1e-5) and torch.allclose(dropped[0][1], dropped[1][1])
    assert not torch.allclose(dropped[0][0], out, atol=1e-3)  # dropout did drop
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
            attention_forward(q, k, v, num_splits=bad)


@pytest.mark.parametrize("seed", range(4))
def test_split_keys_random_cases_match_unsplit(seed):
    """Random shapes, GQA, mask combinations, dtypes, split counts and dropout: the split forward
    gives the unsplit result (up to summation order) and the same +inf rows, and its lse serves
    the backward as the unsplit one does."""
    import random

    rng = random.Random(seed)
    for case in range(5):
        kv_heads, group = rng.randint(1, 2), rng.randint(1, 3)
        batch, seqlen_q = rng.randint(1, 3), rng.choice([1, 2, 5, 17, 70])
        seqlen_k, head_dim = rng.randint(1, 420), rng.choice([8, 24, 40, 64])
        masks = [kind for kind in ("causal", "lower_right", "padding", "bool", "float", "window") if rng.random() < 0.3]
        if "lower_right" in masks and "causal" in masks:
            masks.remove("causal")
        if "float" in masks and "bool" in masks:
            masks.remove("bool")
        dtype, num_splits = rng.choice([torch.float32, torch.float16]), rng.randint(2, 9)
        torch.manual_seed(seed * 100 + case)
        q, k, v, kernel_args, _, _ = make_case(batch, kv_heads * group, kv_heads, seqlen_q, seqlen_k, head_dim, masks,
                                               dtype)
        if rng.random() < 0.3:
            kernel_args.update(dropout_p=0.2, seed=torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE))
        with poisoned_allocations(DEVICE):
            unsplit_out, unsplit_lse = attention_forward(q, k, v, num_splits=1, **kernel_args)
            out, lse = attention_forward(q, k, v, num_splits=num_splits, **kernel_args)
        what = (batch, kv_heads * group, kv_heads, seqlen_q, seqlen_k, head_dim, masks, dtype, num_splits)
        assert torch.equal(torch.isinf(lse), torch.isinf(unsplit_lse)), what
        seen = torch.isfinite(unsplit_lse)
        assert (lse[seen] - unsplit_lse[seen]).abs().max() < 1e-4 if seen.any() else True, what
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        assert (out.float() - unsplit_out.float()).abs().max() < tolerance, what
        if "dropout_p" not in kernel_args:
            grad_out = torch.randn_like(q)
            grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
            unsplit_grads = attention_backward(grad_out, q, k, v, unsplit_out, unsplit_lse, **kernel_args)[:3]
            for grad, unsplit_grad in zip(grads, unsplit_grads):
                scale = max(1.0, unsplit_grad.abs().max().item())  # seen: 1e-3 in float16, 5e-7 in float32
                assert (grad.float() - unsplit_grad.float()).abs().max() < 4 * tolerance * scale, what


GQA_DECODE_CASES = {  # kernel arguments of a decoding step; Lk = 150
    "none": {}, "padding": {"key_padding_mask": True}, "bool-per-head": {"attn_mask": (2, 6, 1, 150)},
    "float": {"attn_mask": (1, 150)}, "lower-right": {"causal_offset": 149}, "top-left": {"causal_offset": 0},
    "causal-mid": {"causal_offset": 70}, "window": {"causal_offset": 149, "window": (40, 0)},
    "window-not-causal": {"window": (3, 60)}, "padding+bool+causal": {"key_padding_mask": True,
                                                                     "attn_mask": (2, 1, 1, 150), "causal_offset": 90},
    "window+padding+bool": {"causal_offset": 149, "window": (40, 0), "key_padding_mask": True,
                            "attn_mask": (2, 6, 1, 150)},  # the masks sliced to the window's keys
}


@pytest.mark.parametrize("num_splits", [None, 3], ids=["unsplit", "split-3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", GQA_DECODE_CASES)
def test_gqa_decoding_step_packs_each_groups_query_heads(monkeypatch, case, dtype, num_splits):
    """One query per (batch, query head), 3 query heads per key head: one program per key head
    computes its 3 query heads as rows (read through a (B, Lq, Hq, D) layout's strides), with
    the causal / window bounds as a key range, split keys or not. The result: the reference's
    within the rule, and the unpacked launch's (up to the summation order, which the window's
    key range shifts)."""
    from fasttransformer.kernels import attention_forward as forward_module
    batch, heads, kv_heads, seqlen_k, head_dim = 2, 6, 2, 150, 32
    # (B, Lq, Hq, D) with its rows padded: the packed rows read through strides of their own
    q = torch.randn(batch, 1, heads, head_dim + 8, device=DEVICE, dtype=dtype)[..., :head_dim].transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype) for _ in range(2))
    kernel_args, allowed, bias = {}, torch.ones(batch, heads, 1, seqlen_k, dtype=torch.bool), None
    for name, value in GQA_DECODE_CASES[case].items():
        if name == "key_padding_mask":
            padding = torch.rand(batch, seqlen_k) < 0.4
            padding[0] = True  # sequence 0 sees no key: zeros, lse +inf
            kernel_args[name], allowed = padding.to(DEVICE), allowed & ~padding[:, None, None, :]
        elif name == "attn_mask" and len(value) == 4:
            mask = torch.rand(value) < 0.6  # each query head its own mask when value[1] = heads
            kernel_args[name], allowed = mask.to(DEVICE), allowed & mask
        elif name == "attn_mask":
            bias = torch.randn(value, dtype=dtype)
            bias[0, :40] = float("-inf")
            kernel_args[name] = bias.to(DEVICE)
        else:
            kernel_args[name] = value
    offset = kernel_args.get("causal_offset")
    if offset is not None:
        allowed &= causal_bool(1, seqlen_k, offset)
    if "window" in kernel_args:
        allowed &= window_bool(1, seqlen_k, offset or 0, *kernel_args["window"])
    rows = ("num_heads", "kv_group", "seqlen_q", "stride_qb", "stride_qh", "stride_qm", "stride_qd")
    launches = record_launches(monkeypatch, forward_module, "attention_forward_kernel", rows)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, num_splits=num_splits, **kernel_args)
        unpacked_out, unpacked_lse = attention_forward(q, k, v, pack_gqa=False, num_splits=num_splits, **kernel_args)
    (packed_grid, packed_rows), (unpacked_grid, unpacked_rows) = launches
    group = heads // kv_heads  # the query read as its view (B, Hk, group, D)
    assert packed_grid[1:] == (kv_heads, batch) and packed_rows == (kv_heads, 1, group,
                                                                    *q.view(batch, kv_heads, group, head_dim).stride())
    assert unpacked_grid[1:] == (heads, batch) and unpacked_rows == (heads, group, 1, *q.stride())
    assert out.shape == q.shape and lse.shape == (batch, heads, 1)
    ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
    assert_within_torch_error(out, ref, reference_attention(q, k, v, allowed, bias), 2.0, "packed output")
    no_key = ~allowed.any(-1).to(lse.device)
    assert torch.equal(torch.isinf(lse), no_key) and torch.equal(torch.isinf(unpacked_lse), no_key)
    assert (out[no_key] == 0).all()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    assert (out.float() - unpacked_out.float()).abs().max() <= tolerance
    assert (lse[~no_key] - unpacked_lse[~no_key]).abs().max() <= 1e-5 if (~no_key).any() else True


def test_gqa_packing_applies_to_grouped_decoding_steps_only():
    """gqa_packing: a key range for one query per head with a group of 2 or more, no dropout;
    None for other calls, and for a query that its bounds leave without keys."""
    from fasttransformer.kernels.attention_forward import gqa_packing

    def pack(heads=4, kv_heads=2, seqlen_q=1, seqlen_k=100, causal_offset=None, window=None, dropout_p=0.0):
        return gqa_packing(heads, kv_heads, seqlen_q, seqlen_k, causal_offset, window, dropout_p)
    assert pack() == (0, 100) and pack(kv_heads=1) == (0, 100)
    assert pack(causal_offset=99) == (0, 100) and pack(causal_offset=0) == (0, 1)
    assert pack(causal_offset=150) == (0, 100)
    assert pack(causal_offset=99, window=(10, 0)) == (89, 100) and pack(window=(5, 20)) == (0, 21)
    assert pack(causal_offset=50, window=(10, 3)) == (40, 51)  # causal: no key past the offset
    for other in ({"kv_heads": 4}, {"seqlen_q": 2}, {"dropout_p": 0.1}, {"causal_offset": -1},
                  {"causal_offset": 99, "window": (0, 0), "seqlen_k": 99}, {"seqlen_k": 0}, {"kv_heads": 0}):
        assert pack(**other) is None, other
    assert pack(dropout_p=2 ** -18) == (0, 100)  # rounds to p = 0: the kernels apply no dropout


ROW_PACKING_SHAPES = {  # batch, Hq, Hk, Lq, Lk, D: Lq below the interpreter's block_m (64)
    "Lq5-g4": (2, 8, 2, 5, 150, 32),  # one block of 20 rows
    "Lq37-g8-mqa": (2, 8, 1, 37, 94, 16),  # 296 rows: 5 blocks of 8 queries (the lists' rows); lower right:
    # query 7, the first block's last, sees key 64, the second key tile's first
    "Lq5-g3": (2, 6, 2, 5, 150, 32),  # a group that is not a power of two: 4 rows a query, one spare: 20 rows
    "Lq9-g7": (1, 14, 2, 9, 66, 16),  # Qwen2's group, 8 rows a query: 2 blocks of 8 queries; lower right:
    # query 7 sees key 64 again
}


@pytest.mark.parametrize("dtype,num_splits", [(torch.float32, None), (torch.float32, 3), (torch.float16, None)],
                         ids=["fp32", "fp32-split-3", "fp16"])
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("shape", ROW_PACKING_SHAPES)
def test_gqa_few_queries_pack_each_groups_query_head_pairs_as_rows(monkeypatch, shape, masks, dtype, num_splits):
    """A GQA call with a few queries a head: one program per key head computes its group's
    (query, query head) pairs as rows (PACK_GQA), each with its own query's causal / window
    bounds and mask row, read and written through a (B, Lq, Hq, D) layout's strides, split keys
    or not. The result: the reference's within the rule, zeros and lse +inf where a query sees
    no key, and the unpacked launch's up to rounding; its gradients (from the packed forward's
    lse) the reference's too."""
    from fasttransformer.kernels import attention_forward as forward_module
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = ROW_PACKING_SHAPES[shape]
    _, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    # (B, Lq, Hq, D) with its rows padded: the packed rows read through strides of their own
    q = torch.randn(batch, seqlen_q, heads, head_dim + 8, device=DEVICE, dtype=dtype)[..., :head_dim].transpose(1, 2)
    launches = record_launches(monkeypatch, forward_module, "attention_forward_kernel",
                               ("num_heads", "kv_group", "group_shift", "PACK_GQA"))
    merges = record_launches(monkeypatch, forward_module, "attention_combine_kernel",
                             ("kv_group", "group_shift", "PACK_GQA"))
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, num_splits=num_splits, **kernel_args)
        unpacked_out, unpacked_lse = attention_forward(q, k, v, pack_gqa=False, num_splits=num_splits, **kernel_args)
    group = heads // kv_heads
    shift = (group - 1).bit_length()  # a query's rows: the group rounded up to a power of two
    (packed_grid, packed_args), (unpacked_grid, unpacked_args) = launches
    assert packed_grid == (-(-(seqlen_q << shift) // 64) * (num_splits or 1), kv_heads, batch)
    assert packed_args == (kv_heads, group, shift, True)
    assert unpacked_grid[1:] == (heads, batch) and unpacked_args == (heads, group, 0, False)
    assert [arguments for _, arguments in merges] == ([(group, shift, True), (group, 0, False)] if num_splits else [])
    assert out.shape == q.shape and out.stride() == torch.empty_like(q).stride()
    assert lse.shape == (batch, heads, seqlen_q)
    ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
    assert_within_torch_error(out, ref, reference_attention(q, k, v, allowed, bias), 2.0, "packed output")
    no_key = ~allowed.any(-1).to(lse.device)
    if bias is not None:
        no_key |= (bias == float("-inf")).all(-1).to(lse.device)
    assert torch.equal(torch.isinf(lse), no_key) and torch.equal(torch.isinf(unpacked_lse), no_key)
    assert (out[no_key] == 0).all()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    assert (out.float() - unpacked_out.float()).abs().max() <= tolerance
    assert (lse[~no_key] - unpacked_lse[~no_key]).abs().max() <= 1e-5 if (~no_key).any() else True
    if dtype == torch.float32 and num_splits is None:  # the backward reads the packed forward's lse
        grad_out = torch.randn_like(out)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
        assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)


def test_gqa_row_packing_takes_the_packed_entry_with_the_tables_block_m(monkeypatch):
    """configs.PACKED_OVERRIDES keep the block_m of the entry they replace (the launcher decides
    to pack from it), and a packed launch takes the packed entry's tiles, warps and stages, but
    what its caller asked for; an unpacked launch never asks for it."""
    from fasttransformer.kernels import attention_forward as forward_module, configs
    from fasttransformer.kernels.aot import _FakeDevice
    for (kind, arch, bucket, int64), config in configs.PACKED_OVERRIDES.items():
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        device = _FakeDevice(arch)
        assert configs.forward_config(device, dtype, bucket, True, int64=int64, packed=True) == config
        assert configs.packed_override(device, dtype, bucket, int64=int64) == config
        assert configs.forward_config(device, dtype, bucket, True, int64=int64).block_m == config.block_m
    assert configs.packed_override(_FakeDevice(90), torch.bfloat16, 128) is None
    asked = []

    def packed_override(*args):
        asked.append(args[-1])  # int64
        return Config(64, 32, 4, 1)
    monkeypatch.setattr(configs, "forward_config", lambda *args, **kwargs: Config(64, 64, 4, 1))
    monkeypatch.setattr(configs, "packed_override", packed_override)
    launches = record_launches(monkeypatch, forward_module, "attention_forward_kernel",
                               ("PACK_GQA", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    q, k, v, kernel_args, _, _ = make_case(1, 4, 1, 3, 70, 16, ["padding"], torch.float32)
    attention_forward(q, k, v, **kernel_args)
    attention_forward(q, k, v, num_warps=2, **kernel_args)
    attention_forward(q, k, v, pack_gqa=False, **kernel_args)
    assert asked == [False, False]
    assert [arguments for _, arguments in launches] == [(True, 64, 32, 4, 1), (True, 64, 32, 2, 1),
                                                        (False, 64, 64, 4, 1)]


def test_gqa_row_packing_applies_to_few_queries_of_groups_up_to_block_m():
    """gqa_row_packing: a query's rows (the group rounded up to a power of two) for 2 ..
    block_m - 1 queries a head, a group of 2 or more whose rows are at most block_m, masks the
    same for the heads of a group, no dropout, with tile lists a block of at least CLASS_ROWS
    queries, and no more programs than unpacked (spare rows can make more); 1 (unpacked)
    otherwise."""
    from fasttransformer.kernels.attention_forward import gqa_row_packing

    def pack(heads=32, kv_heads=8, seqlen_q=4, block_m=64, mask_head_stride=0, listed=False, dropout_p=0.0):
        return gqa_row_packing(heads, kv_heads, seqlen_q, block_m, mask_head_stride, listed, dropout_p)
    assert pack() == 4 and pack(kv_heads=1) == 32 and pack(seqlen_q=63) == 4 and pack(listed=True) == 4
    assert pack(heads=64, block_m=128, listed=True) == 8 and pack(heads=128, block_m=128, listed=True) == 16
    assert pack(heads=128, kv_heads=1, block_m=128) == 128 and pack(dropout_p=2 ** -18) == 4  # p rounds to 0
    # groups that are not powers of two: Qwen2's 7 (28 / 4 heads), 5 (40 / 8), 3, 6 (12 / 2), 65 (MQA)
    assert pack(heads=28, kv_heads=4) == 8 and pack(heads=40) == 8 and pack(heads=24, listed=True) == 4
    assert pack(heads=12, kv_heads=2, listed=True) == 8 and pack(heads=65, kv_heads=1, block_m=128) == 128
    assert pack(heads=9, kv_heads=1) == 16 and pack(heads=17, kv_heads=1, block_m=256, listed=True) == 32
    # programs: 3 blocks of 16 queries x 4 rows, as many as unpacked (3 heads); 4 with 63 queries
    assert pack(heads=24, seqlen_q=48) == 4 and pack(heads=24, seqlen_q=49) == 1
    assert pack(heads=40, seqlen_q=40) == 8 and pack(heads=40, seqlen_q=41) == 1  # 5 blocks of 8 queries x 8 rows
    for other in ({"seqlen_q": 1}, {"seqlen_q": 64}, {"kv_heads": 32}, {"kv_heads": 0}, {"mask_head_stride": 150},
                  {"dropout_p": 0.1}, {"heads": 128, "listed": True}, {"heads": 65, "kv_heads": 1},
                  {"heads": 256, "kv_heads": 1, "block_m": 128}, {"heads": 9, "kv_heads": 1, "listed": True},
                  {"heads": 7, "kv_heads": 7, "seqlen_q": 5}, {"heads": 24, "seqlen_q": 63}):
        assert pack(**other) == 1, other


def test_forward_splits_heuristic(monkeypatch):
    """One wave at most (SMs // programs), at least MIN_TILES_PER_SPLIT key tiles per split,
    and never off CUDA."""
    from fasttransformer.kernels import configs

    monkeypatch.setattr(configs, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert configs.forward_splits("cpu", 1, 1000) == 1
    assert configs.forward_splits(cuda, 16, 128) == 8      # decoding: B * Hq = 16 programs, Lk = 8k
    assert configs.forward_splits(cuda, 16, 12) == 3       # short keys: 4 tiles per split
    assert configs.forward_splits(cuda, 67, 1000) == 1     # 2 splits would be 134 programs: a second wave
    assert configs.forward_splits(cuda, 66, 1000) == 2
    assert configs.forward_splits(cuda, 1, 10 ** 6) == configs.MAX_SPLITS
    assert configs.forward_splits(cuda, 0, 100) == 1
    assert configs.forward_splits(cuda, 5, 3) == 1


def test_backward_is_deterministic_and_zero_for_rows_without_keys():
    q, k, v, kernel_args, allowed, _ = make_case(2, 4, 2, 70, 90, 32, ["padding", "causal"], torch.float32)
    grad_out = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, **kernel_args)
    first = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    again = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    no_key = ~allowed.any(-1)  # sequence 0 is all padding
    assert no_key[0].all() and (first[0][no_key.to(q.device)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("seqlen,head_dim", [(1, 16), (37, 40), (300, 128), (70, 256)])
def test_delta_prepass_is_the_row_sum_of_grad_out_times_out(seqlen, head_dim, dtype):
    """The backward's delta = rowsum(dO * O) in float32, read through (B, L, H, D) strides,
    against float64: within float32 summation error of the exact value."""
    from fasttransformer.kernels.attention_backward import attention_delta
    out = torch.randn(2, seqlen, 3, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    grad_out = torch.randn(2, 3, seqlen, head_dim, device=DEVICE, dtype=dtype)
    with poisoned_allocations(DEVICE):
        delta = attention_delta(grad_out, out)
    exact = (grad_out.double() * out.double()).sum(-1)
    assert delta.dtype == torch.float32 and delta.shape == exact.shape
    bound = 4 * head_dim * torch.finfo(torch.float32).eps * (grad_out.double() * out.double()).abs().sum(-1)
    assert ((delta.double() - exact).abs() <= bound).all()


def test_forward_custom_scale_and_strided_inputs():
    # Non-contiguous q/k/v (a (B, L, H, D) layout transposed) are read through their strides.
    q = torch.randn(2, 45, 3, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 50, 3, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(2, 50, 3, 32, device=DEVICE).transpose(1, 2)
    out, _ = attention_forward(q, k, v, scale=0.3)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [-0.6, 0.0, 0.45])
@pytest.mark.parametrize("masks", ["causal+window", "padding+lower_right", "bool", "float"])
def test_any_scale_sign_matches_reference(masks, scale):
    """The forward takes the row max on unscaled products when the scale is positive (and no
    float mask): a negative or zero scale (torch allows both) takes the scaled path, through the
    dense loops and the lists, forward and backward."""
    batch, heads, seqlen_q, seqlen_k, head_dim = 2, 2, 45, 70, 32
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), torch.float32)
    if masks == "causal+window":
        kernel_args["window"] = (30, 0)  # wider than the tiles: interior tiles too
        allowed = causal_bool(seqlen_q, seqlen_k, 0) & window_bool(seqlen_q, seqlen_k, 0, 30, 0)
        allowed = allowed.expand(batch, heads, seqlen_q, seqlen_k)
    grad_out = torch.randn_like(q)
    blocks = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, scale=scale, **kernel_args, **blocks)
        grads = attention_backward(grad_out, q, k, v, out, lse, scale=scale, **kernel_args, **blocks)[:3]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads, scale=scale)


# --- dropout: Philox draws, regenerated in the backward -------------------------------------------

from fasttransformer.kernels.attention_forward import dropout_keep_mask, effective_dropout_p  # noqa: E402
from philox import philox4x32  # noqa: E402


def test_dropout_mask_is_philox_of_the_element_index():
    """The kernels' dropout mask, materialised, against the tests' Philox-4x32-7 (philox.py): element
    (b, h, i, j) keeps iff its 16-bit draw is >= round(p * 2**16), the draw being half
    (j % 2) of word (0, 2, 1, 3)[j % 8 // 2] of the call with counters (j // 8, i, b*H + h, 0)
    and key (seed low, seed high) (the order dropout_keep documents)."""
    import numpy as np
    seed_value = 0x1234_5678_9ABC_DEF
    batch, heads, seqlen_q, seqlen_k, p = 2, 3, 37, 45, 0.3
    keep = dropout_keep_mask(torch.tensor([seed_value], dtype=torch.int64, device=DEVICE),
                             (batch, heads, seqlen_q, seqlen_k), p).cpu().numpy()
    head_row, rows, cols = np.meshgrid(np.arange(batch * heads), np.arange(seqlen_q), np.arange(seqlen_k),
                                       indexing="ij")
    counters = [index.astype(np.uint64) for index in (cols // 8, rows, head_row, np.zeros_like(cols))]
    words = philox4x32(counters, (seed_value & 0xFFFFFFFF, seed_value >> 32), rounds=7)
    word = np.choose(np.array([0, 2, 1, 3])[cols % 8 // 2], words)
    draw = (word >> (16 * (cols % 2)).astype(np.uint64)) & np.uint64(0xFFFF)
    expected = draw >= round(p * 2 ** 16)
    assert np.array_equal(keep.reshape(expected.shape), expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction_and_independence(p):
    """Kept fraction within 5 sigma of 1 - p, overall and per (batch, head); neighbours along
    rows and columns uncorrelated; another seed, another mask."""
    shape = (2, 3, 64, 257)
    seed = torch.tensor([987654321987], dtype=torch.int64, device=DEVICE)
    keep = dropout_keep_mask(seed, shape, p).cpu().double()
    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    per_head = keep.mean((-1, -2))
    assert (per_head - (1 - p)).abs().max() < 5 * math.sqrt(p * (1 - p) / (64 * 257))
    centred = keep - keep.mean()
    for neighbours in ((centred[..., 1:] * centred[..., :-1]), (centred[..., 1:, :] * centred[..., :-1, :]),
                       (centred[:, 1:] * centred[:, :-1]), (centred[1:] * centred[:-1])):
        correlation = neighbours.mean().item() / (p * (1 - p))
        assert abs(correlation) < 5 / math.sqrt(neighbours.numel()), correlation
    other = dropout_keep_mask(seed + 1, shape, p).cpu().double()
    assert 0.4 < (other != keep).double().mean().item() / (2 * p * (1 - p)) < 1.6


DROPOUT_CASES = [  # shape index into SHAPES, masks
    (0, "none"), (1, "padding+bool+causal"), (2, "float+padding+lower_right"), (3, "window"), (1, "float"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,masks", DROPOUT_CASES, ids=[f"{SHAPES[i].id}-{m}" for i, m in DROPOUT_CASES])
def test_dropout_forward_and_backward_match_the_reference_with_the_same_mask(shape, masks, dtype):
    """The forward and the backward (which regenerates the mask, transposed in the dK/dV
    kernel) against the float64 reference applying the mask the kernels drew."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = SHAPES[shape].values
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    grad_out = torch.randn_like(q)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args, dropout_p=0.3, seed=seed)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args, dropout_p=0.3, seed=seed)[:3]
    keep = dropout_keep_mask(seed, (batch, heads, seqlen_q, seqlen_k), 0.3)
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads, keep=keep,
                             dropout_p=effective_dropout_p(0.3))


VALUE_HEAD_DIM_CASES = [  # batch, heads, kv_heads, Lq, Lk, D, Dv, masks, num_splits, dropout_p
    pytest.param(2, 3, 3, 37, 63, 40, 24, "padding+bool+causal", None, 0.0, id="D40-Dv24-padding+bool+causal"),
    pytest.param(1, 4, 2, 70, 129, 16, 64, "float+padding+lower_right", 3, 0.0, id="D16-Dv64-float-split3"),
    pytest.param(2, 4, 2, 1, 200, 64, 16, "causal", None, 0.0, id="D64-Dv16-gqa-decode-packed"),
    pytest.param(2, 4, 1, 1, 300, 24, 40, "window+padding", 4, 0.0, id="D24-Dv40-gqa-decode-window-split4"),
    pytest.param(2, 2, 1, 45, 50, 40, 72, "window+padding", None, 0.3, id="D40-Dv72-dropout"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,kv_heads,seqlen_q,seqlen_k,head_dim,head_dim_v,masks,num_splits,dropout_p",
                         VALUE_HEAD_DIM_CASES)
def test_value_head_dim_differs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, masks, num_splits,
                                dropout_p, dtype):
    """A value head dim Dv unlike the query's and key's D (DeepSeek's MLA: D = 192, Dv = 128):
    Q K^T over D, P V and the output over Dv, each padded to its own tile; the forward (split
    keys and the GQA decoding step's packing too), the backward (dV and the delta pre-pass over
    Dv, dQ and dK over D, the float mask's gradient, dropout regenerated) against the float64
    reference, under the accuracy rule."""
    q, k, _, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    masks.split("+"), dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim_v, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(batch, heads, seqlen_q, head_dim_v, device=DEVICE, dtype=dtype)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE) if dropout_p else None
    bias_grad = bias is not None
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args, num_splits=num_splits, dropout_p=dropout_p, seed=seed)
        dq, dk, dv, dbias = attention_backward(grad_out, q, k, v, out, lse, **kernel_args, dropout_p=dropout_p,
                                               seed=seed, bias_grad=bias_grad)
    assert out.shape == (batch, heads, seqlen_q, head_dim_v) and dv.shape == v.shape and dk.shape == k.shape
    keep = dropout_keep_mask(seed, (batch, heads, seqlen_q, seqlen_k), dropout_p) if dropout_p else None
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, (dq, dk, dv), keep=keep,
                             dropout_p=effective_dropout_p(dropout_p))
    if bias_grad:
        runs = []
        for cast in (torch.float64, dtype):
            bias_leaf = bias.to(DEVICE, cast).requires_grad_()
            reference_attention(q.to(cast), k.to(cast), v.to(cast), allowed, bias_leaf).backward(grad_out.to(cast))
            runs.append(bias_leaf.grad)
        assert_within_torch_error(dbias, *runs, 3.0, "mask gradient", magnitude=runs[0].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_value_head_dim_padded_to_the_larger_tile(monkeypatch, dtype):
    """Where configs.PADDED_VALUE_HEAD_DIMS names a kernel (it spills with each head dim's own
    tile), the launchers give it the larger's tile for both, BLOCK_D = BLOCK_DV: the padded
    columns are masked off and the results are the same."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels
    from fasttransformer.kernels import configs

    def padded(kernel, device, dtype, head_dim, head_dim_v, dropout=False, int64=False):
        tile = configs.head_dim_bucket(max(head_dim, head_dim_v))
        return tile, tile

    monkeypatch.setattr(configs, "tile_head_dims", padded)
    tiles = ("BLOCK_D", "BLOCK_DV")
    launches = [record_launches(monkeypatch, forward_kernels, "attention_forward_kernel", tiles),
                record_launches(monkeypatch, backward_kernels, "attention_backward_dkdv_kernel", tiles),
                record_launches(monkeypatch, backward_kernels, "attention_backward_dq_kernel", tiles)]
    q, k, _, kernel_args, allowed, bias = make_case(2, 4, 2, 37, 50, 16, ["padding", "causal"], dtype)
    v = torch.randn(2, 2, 50, 40, device=DEVICE, dtype=dtype)
    grad_out = torch.randn(2, 4, 37, 40, device=DEVICE, dtype=dtype)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    assert [[blocks for _, blocks in kernel] for kernel in launches] == [[(64, 64)]] * 3
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)


def test_tile_head_dims_pad_only_the_listed_kernels(monkeypatch):
    """tile_head_dims: each head dim's own bucket, but the larger's for both where
    PADDED_VALUE_HEAD_DIMS lists the (kernel, dtype kind, arch, buckets, dropout, int64
    offsets); never off CUDA (the interpreter's tiles only change its speed)."""
    from types import SimpleNamespace

    from fasttransformer.kernels import configs
    monkeypatch.setattr(configs, "PADDED_VALUE_HEAD_DIMS", frozenset({("dkdv", "2-byte", 80, 64, 128, False, False)}))
    sm80 = SimpleNamespace(type="cuda", arch=80)
    assert configs.tile_head_dims("dkdv", sm80, torch.bfloat16, 64, 128) == (128, 128)
    assert configs.tile_head_dims("dkdv", sm80, torch.float16, 40, 100) == (128, 128)  # buckets (64, 128)
    assert configs.tile_head_dims("dq", sm80, torch.bfloat16, 64, 128) == (64, 128)
    assert configs.tile_head_dims("dkdv", sm80, torch.bfloat16, 64, 128, dropout=True) == (64, 128)
    assert configs.tile_head_dims("dkdv", sm80, torch.float32, 64, 128) == (64, 128)
    assert configs.tile_head_dims("dkdv", SimpleNamespace(type="cuda", arch=90), torch.bfloat16, 64, 128) == (64, 128)
    assert configs.tile_head_dims("dkdv", "cpu", torch.bfloat16, 64, 128) == (64, 128)
    assert configs.tile_head_dims("dkdv", sm80, torch.bfloat16, 100, 128) == (128, 128)  # one bucket: no pair
    # the config is the larger head dim's entry, whichever of the two it is
    assert configs.backward_configs(sm80, torch.bfloat16, 192, True, head_dim_v=128) == \
        configs.backward_configs(sm80, torch.bfloat16, 128, True, head_dim_v=256) == \
        configs.backward_configs(sm80, torch.bfloat16, 256, True)


def test_padded_value_head_dims_are_the_committed_surveys_spills():
    """configs.PADDED_VALUE_HEAD_DIMS is read from the committed survey (``python -m
    fasttransformer.kernels.aot --value-head-dims all``, every pair of head-dim buckets with its
    own tiles, under Triton 3.6.0 and 3.9.0): exactly the kernels of which a variant spills."""
    import json

    from fasttransformer.kernels import aot, configs
    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                           "2026-12-07-cpu")
    reports = []
    for version in ("3.6.0", "3.9.0"):
        with open(os.path.join(results, f"aot-value-head-dims-triton-{version}.json")) as f:
            record = json.load(f)
        assert {report["triton"] for report in record} == {version}
        assert {(report["head_dim"], report["head_dim_v"]) for report in record} == set(aot.ALL_VALUE_HEAD_DIMS)
        reports += record
    assert configs.PADDED_VALUE_HEAD_DIMS == aot.padded_value_head_dims(reports)


def test_dropout_needs_a_seed_tensor():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout needs seed"):
        attention_forward(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout needs seed"):
        attention_forward(q, q, q, dropout_p=0.1, seed=torch.tensor([1, 2], device=DEVICE))


# --- tile skipping: block_lists.py ------------------------------------------------------------------

from fasttransformer.kernels.block_lists import (EMPTY, FULL, PARTIAL, block_lists, build_block_lists,  # noqa: E402
                                                coarsen, tile_classes)


def brute_force_classes(allowed, block_m, block_n):
    """EMPTY/PARTIAL/FULL of every tile of a dense (B, H, Lq, Lk) bool, exactly: FULL when every
    query of the tile (before Lq) sees all of its block_n keys, so a ragged last key block (keys
    past Lk) is never FULL; EMPTY when no query sees any key."""
    batch, heads, seqlen_q, seqlen_k = allowed.shape
    num_m, num_n = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    classes = torch.empty(batch, heads, num_m, num_n, dtype=torch.uint8)
    for i in range(num_m):
        for j in range(num_n):
            tile = allowed[:, :, i * block_m:(i + 1) * block_m, j * block_n:(j + 1) * block_n]
            whole = tile.shape[-1] == block_n
            tile = tile.flatten(2)
            classes[:, :, i, j] = torch.where(tile.all(-1) & whole, FULL, torch.where(tile.any(-1), PARTIAL, EMPTY))
    return classes


def document_mask(seqlen_q, seqlen_k, boundaries):
    """Block-diagonal bool: query i sees key j when both fall in the same document."""
    doc_q = torch.bucketize(torch.arange(seqlen_q), torch.tensor(boundaries), right=True)
    doc_k = torch.bucketize(torch.arange(seqlen_k), torch.tensor(boundaries), right=True)
    return doc_q[:, None] == doc_k[None, :]


@pytest.mark.parametrize("case", ["document", "document+padding", "document+padding+causal", "padding-broadcast",
                                  "random+window", "head-mask+lower_right"])
def test_tile_classes_are_exact_or_conservative(case):
    """EMPTY means no query of the tile sees a key (after every mask); FULL means every query
    sees every key of the tile (after every mask, bounds included: the kernels mask nothing
    there), exactly. Without bounds EMPTY is exact too, ragged edge tiles included, also with
    both masks (a tile where each is partial but no element is kept by both is EMPTY); with
    bounds, a tile they and the masks leave partial may be called PARTIAL (conservative)."""
    batch, heads, seqlen_q, seqlen_k, block_m, block_n = 2, 3, 70, 90, 16, 8
    attn_mask, padding, causal_offset, window = None, None, None, None
    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    if "document" in case:
        attn_mask = document_mask(seqlen_q, seqlen_k, [16, 40, 41])
    if "padding" in case:
        padding = torch.zeros(batch, seqlen_k, dtype=torch.bool)
        padding[0, 50:] = True
        padding[1, 3:11] = True
        padding[1, 33] = True
        padding[1, 41:48] = True  # rows 48-63 see keys 41.. only: tile (3, 5) is empty, each mask partial there
    if case == "padding-broadcast":  # a (B, 1, 1, Lk) bool mask: one list per sequence
        attn_mask = torch.rand(batch, 1, 1, seqlen_k) < 0.9
        attn_mask[0, ..., :16] = True
        attn_mask[1, ..., 40:48] = False
        attn_mask[1, ..., 24:28] = False  # and padding[1, 28:32]: key block 3 of sequence 1 empty
        padding[1, 28:32] = True
    if "random" in case:
        attn_mask = torch.rand(batch, 1, seqlen_q, seqlen_k) < 0.5
    if "head-mask" in case:
        attn_mask = torch.rand(1, heads, seqlen_q, seqlen_k) < 0.999
        attn_mask[0, 1, :, 30:60] = False
    if "causal" in case:
        causal_offset = 0
    if "lower_right" in case:
        causal_offset = seqlen_k - seqlen_q
    if "window" in case:
        window = (9, 2)
    if attn_mask is not None:
        allowed &= attn_mask
    if padding is not None:
        allowed &= ~padding[:, None, None, :]
    bounds = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal_offset is not None:
        bounds &= causal_bool(seqlen_q, seqlen_k, causal_offset)
    if window is not None:
        bounds &= window_bool(seqlen_q, seqlen_k, causal_offset or 0, *window)
    exact = brute_force_classes(allowed & bounds, block_m, block_n)
    classes = tile_classes(attn_mask, padding, allowed.shape, block_m, block_n, causal_offset, window)
    classes = classes.expand(batch, heads, *classes.shape[2:])
    assert ((classes != EMPTY) | (exact == EMPTY)).all()
    assert torch.equal(classes == FULL, exact == FULL)
    bounds_empty = brute_force_classes(bounds.expand_as(allowed), block_m, block_n) == EMPTY
    assert (classes[bounds_empty] == EMPTY).all()
    assert (classes == EMPTY).any() or (classes == FULL).any()  # the case tests something
    if case in ("document", "document+padding", "padding-broadcast"):  # no bounds: exact
        assert torch.equal(classes, exact)
    # Tiles of sequence 1 that each mask alone calls PARTIAL and both together EMPTY
    both_empty = {"document+padding": (1, slice(None), 3, 5),
                  "padding-broadcast": (1, slice(None), slice(None), 3)}.get(case)
    if both_empty:
        assert classes[both_empty].eq(EMPTY).all()
        for alone in (tile_classes(attn_mask, None, allowed.shape, block_m, block_n),
                      tile_classes(None, padding, allowed.shape, block_m, block_n)):
            assert alone.expand_as(classes)[both_empty].eq(PARTIAL).all()
    # The lists: PARTIAL indices first, then FULL, each in column order; counts match.
    for by_key in (False, True):
        lists = block_lists(classes, batch, heads, by_key=by_key)
        source = classes.transpose(-2, -1) if by_key else classes
        for b, h, r in ((0, 0, 0), (1, heads - 1, source.shape[2] - 1), (1, 1, 2)):
            row = source[b, h, r]
            partial, full = lists.counts[b, h, r].tolist()
            expected = torch.cat([torch.nonzero(row == PARTIAL).flatten(), torch.nonzero(row == FULL).flatten()])
            assert (partial, full) == ((row == PARTIAL).sum().item(), (row == FULL).sum().item())
            assert torch.equal(lists.indices[b, h, r, : partial + full].long(), expected)
    # The launchers' Triton builder gives the same lists.
    built = build_block_lists(attn_mask, padding, allowed.shape, [(block_m, block_n, True), (block_m, block_n, False)],
                              causal_offset, window)
    for by_key, lists in zip((True, False), built):
        assert_same_lists(lists, block_lists(classes, batch, heads, by_key=by_key))


def assert_same_lists(lists, expected):
    """Equal counts, and equal indices up to each row's counts (the builder leaves the slots
    past them unwritten)."""
    assert lists.counts.shape == expected.counts.shape and lists.indices.shape == expected.indices.shape
    assert lists.counts.dtype == lists.indices.dtype == torch.int32
    assert torch.equal(lists.counts, expected.counts)
    used = torch.arange(lists.indices.shape[-1]) < expected.counts.sum(-1, keepdim=True)
    assert torch.equal(torch.where(used, lists.indices, -1), torch.where(used, expected.indices, -1))


BUILDER_CASES = {  # name: (B, H, Lq, Lk, attn_mask shape or None, padding, causal offset, window, tiles)
    "padding-only-decode": (3, 2, 1, 300, None, True, None, None, [(64, 64, False)]),
    "mask-2d+padding": (2, 3, 70, 130, "Lq,Lk", True, None, None, [(16, 16, False)]),
    "mask-transposed+causal": (1, 2, 97, 97, "Lk,Lq^T", False, 0, None, [(32, 64, True), (64, 32, False)]),
    "mask-heads+lower_right": (2, 3, 45, 200, "1,H,Lq,Lk", False, 155, None, [(16, 32, True), (64, 16, False)]),
    "mask-key-row+window": (2, 2, 150, 90, "B,1,1,Lk", True, None, (20, 7), [(32, 16, True), (16, 64, False)]),
    "mask-full+causal+window": (2, 2, 64, 64, "B,H,Lq,Lk", True, 3, (9, 0), [(16, 16, True), (32, 32, False)]),
    "expanded-query-column": (2, 1, 33, 66, "Lq,1", True, None, None, [(16, 16, False)]),
    "padding+coarsened-edges": (2, 2, 70, 130, None, True, None, None, [(32, 32, True), (16, 64, False)]),
    # Lk a multiple of the fine tiles, not of the coarse ones: the coarse edge holds keys past Lk
    "padding+aligned-fine-edge": (2, 2, 70, 96, None, True, None, None, [(32, 64, True), (16, 32, False),
                                                                          (16, 64, False)]),
    "no-keys": (2, 2, 17, 0, None, True, None, None, [(16, 16, True), (16, 16, False)]),
}


@pytest.mark.parametrize("name", list(BUILDER_CASES))
def test_block_list_builder_matches_the_torch_definition(name):
    """build_block_lists (two Triton kernels) against block_lists(coarsen(tile_classes(...))),
    the readable torch definition the brute-force test above checks: broadcast, transposed and
    expanded masks, padding alone, lists by key and by query at coarsened tiles, dense masks
    with EMPTY, PARTIAL and FULL tiles."""
    batch, heads, seqlen_q, seqlen_k, mask_shape, with_padding, causal_offset, window, tiles = BUILDER_CASES[name]
    sizes = {"B": batch, "H": heads, "Lq": seqlen_q, "Lk": seqlen_k, "1": 1}
    attn_mask = None
    if mask_shape:
        dims = [sizes[dim] for dim in mask_shape.rstrip("^T").split(",")]
        attn_mask = document_mask(max(dims[-2], 1), dims[-1], [5, 30, 31]).expand(*dims).clone()
        attn_mask &= torch.rand(dims) < 0.95  # documents with holes: some tiles PARTIAL, some FULL
        if mask_shape.endswith("^T"):
            attn_mask = attn_mask.t()
        if mask_shape == "Lq,1":
            attn_mask = attn_mask.expand(seqlen_q, seqlen_k)  # stride 0 along the keys
    padding = None
    if with_padding:
        padding = (torch.rand(seqlen_k, batch) < 0.2).t()  # read through its strides
        padding[0, seqlen_k // 3:] = True  # whole key blocks of padding
        padding[-1] = False  # none: FULL tiles, ragged and coarsened edges included
    shape = (batch, heads, seqlen_q, seqlen_k)
    built = build_block_lists(attn_mask, padding, shape, tiles, causal_offset, window)
    fine_m, fine_n = min(tile[0] for tile in tiles), min(tile[1] for tile in tiles)
    classes = tile_classes(attn_mask, padding, shape, fine_m, fine_n, causal_offset, window)
    seen = set()
    for (block_m, block_n, by_key), lists in zip(tiles, built):
        coarse = coarsen(classes, block_m // fine_m, block_n // fine_n)
        seen.update(coarse.unique().tolist())
        assert_same_lists(lists, block_lists(coarse, batch, heads, by_key=by_key))
    if seqlen_k:
        assert PARTIAL in seen and (FULL in seen or EMPTY in seen), seen  # the case tests something


def test_block_list_store_reuses_only_unchanged_masks(monkeypatch):
    """With a store, build_block_lists gives back the lists it built for the same mask tensors
    (a new view of the same values too), launching nothing, and builds new ones for another
    mask (equal values included: it is not compared), a mask written in place, another shape or
    tiles, and always for inference tensors (no version to vouch for them)."""
    import fasttransformer.kernels.block_lists as block_list_kernels

    builds = []
    build = block_list_kernels._build_block_lists
    monkeypatch.setattr(block_list_kernels, "_build_block_lists", lambda *args: builds.append(args) or build(*args))
    shape, tiles, store = (3, 2, 1, 70), [(16, 16, False)], {}
    padding = torch.rand(3, 70, device=DEVICE) < 0.4
    padding[:, 40:] = True  # EMPTY tiles: the lists differ from the no-padding ones

    def lists(key_padding_mask=padding, attn_mask=None, shape=shape, tiles=tiles):
        built = build_block_lists(attn_mask, key_padding_mask, shape, tiles, store=store)
        expected = block_lists(tile_classes(attn_mask, key_padding_mask, shape, *tiles[0][:2]), shape[0], shape[1])
        assert_same_lists(built[0], expected)
        return built

    first = lists()
    assert lists() is first and lists(padding[:, :]) is first and len(builds) == 1
    lists(padding.clone())
    assert len(builds) == 2
    again = lists()  # the clone's entry replaced padding's: built again, then kept
    assert lists() is again and len(builds) == 3
    padding[:, 40:] = False  # written in place: new lists, and they follow the new values
    lists()
    assert len(builds) == 4
    lists(shape=(3, 2, 2, 70)), lists(tiles=[(32, 16, False)])
    assert len(builds) == 6
    mask = torch.rand(1, 1, 1, 70, device=DEVICE) < 0.5
    assert lists(None, mask) is lists(None, mask) and len(builds) == 7
    with torch.inference_mode():
        frozen = torch.rand(3, 70, device=DEVICE) < 0.4
    lists(frozen), lists(frozen)
    assert len(builds) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("masks", ["document", "document+padding", "document+lower_right", "padding+window"])
def test_tile_skipping_forward_and_backward(masks, dtype):
    """Masks that leave EMPTY, FULL and PARTIAL tiles (16 x 16 tiles), through both kernels.
    The keys of every EMPTY tile hold NaN: a kernel that loaded one would return NaN (0 * NaN
    in the dot), so the test proves those tiles are skipped, not just masked."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = 2, 2, 1, 61, 80, 32
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    kernel_args = {}
    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    if "document" in masks:
        kernel_args["attn_mask"] = document_mask(seqlen_q, seqlen_k, [16, 32, 50, 61]).to(DEVICE)
        allowed &= kernel_args["attn_mask"].cpu()
    if "padding" in masks:
        padding = torch.zeros(batch, seqlen_k, dtype=torch.bool)
        padding[0, 48:] = True  # whole key blocks 3 and 4 of sequence 0
        padding[1, 20:23] = True
        kernel_args["key_padding_mask"] = padding.to(DEVICE)
        allowed &= ~padding[:, None, None, :]
    if "lower_right" in masks:  # the causal range reaches the poisoned keys: only the lists skip them
        kernel_args["causal_offset"] = seqlen_k - seqlen_q
        allowed &= causal_bool(seqlen_q, seqlen_k, seqlen_k - seqlen_q)
    if "window" in masks:
        kernel_args["window"] = (40, 20)
        allowed &= window_bool(seqlen_q, seqlen_k, 0, 40, 20)
    blocks = dict(block_m=16, block_n=16, num_warps=4, num_stages=1)
    exact = brute_force_classes(allowed, 16, 16)
    assert (exact == EMPTY).any() and (exact == FULL).any() and (exact == PARTIAL).any()  # FULL: no mask there
    # NaN in the keys/values of key blocks EMPTY for every query block of a sequence (keys 61+ are
    # a document without queries; padding empties whole blocks of sequence 0).
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for b in range(batch):
        for j in range(exact.shape[-1]):
            if (exact[b, :, :, j] == EMPTY).all():
                k_poisoned[b, :, j * 16:(j + 1) * 16] = float("nan")
                v_poisoned[b, :, j * 16:(j + 1) * 16] = float("nan")
    assert torch.isnan(k_poisoned).any()
    grad_out = torch.randn_like(q)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k_poisoned, v_poisoned, **kernel_args, **blocks)
        dq, dk, dv, _ = attention_backward(grad_out, q, k_poisoned, v_poisoned, out, lse, **kernel_args, **blocks)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    live_keys = ~torch.isnan(k_poisoned).any(-1, keepdim=True)  # an EMPTY key block's dk/dv: zero
    assert_matches_reference(q, k, v, allowed, None, grad_out, out, (dq, dk, dv), live_keys=live_keys)


INTERIOR_CASES = {  # name: (Lq, Lk, causal offset or None, window or None)
    # An off-by-one in a bound shows only where it crosses a tile edge: alignments, window edges
    # and lengths sit at -1 and -2 modulo the tiles (16 and 32) as well as elsewhere.
    "ragged-ends": (70, 95, None, None),
    "causal": (70, 70, 0, None),
    "causal-Lq>Lk": (83, 50, 0, None),
    "lower_right": (50, 80, 30, None),
    "lower_right-edge": (40, 71, 31, None),
    "lower_right-Lq>Lk": (95, 61, -34, None),
    "window": (77, 90, None, (37, 30)),
    "window-edges": (80, 80, None, (46, 31)),  # Lk: whole 16-key tiles, not 32
    "causal+window": (90, 90, 0, (40, 0)),
    "lower_right+window": (45, 100, 55, (33, 7)),
}


@pytest.mark.parametrize("extra", ["dense", "padding", "float"])
@pytest.mark.parametrize("name", list(INTERIOR_CASES))
def test_interior_tiles_are_exact_at_every_edge(name, extra):
    """Tiles inside every bound (and FULL tiles of the lists) are computed without element-wise
    masks: at 16 x 16 to 32 x 32 tiles, the causal diagonal, both window edges, negative and
    positive alignments and ragged sequence ends cross tiles at many offsets, through the dense
    path, the lists (key padding) and with a float mask holding -inf (the running max of a row
    that has seen only -inf stays safe in an interior tile)."""
    seqlen_q, seqlen_k, causal_offset, window = INTERIOR_CASES[name]
    batch, heads, head_dim, dtype = 2, 2, 24, torch.float32
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    kernel_args = {"causal_offset": causal_offset, "window": window}
    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    if causal_offset is not None:
        allowed &= causal_bool(seqlen_q, seqlen_k, causal_offset)
    if window is not None:
        allowed &= window_bool(seqlen_q, seqlen_k, causal_offset or 0, *window)
    bias = None
    if extra == "padding":
        padding = torch.zeros(batch, seqlen_k, dtype=torch.bool)
        padding[1, seqlen_k // 2:] = True
        padding[1, 3] = True
        kernel_args["key_padding_mask"] = padding.to(DEVICE)
        allowed &= ~padding[:, None, None, :]
    if extra == "float":
        bias = torch.randn(heads, 1, seqlen_k, dtype=dtype)
        bias[0, :, :40] = float("-inf")  # rows whose first tiles are all -inf, then interior ones
        kernel_args["attn_mask"] = bias.to(DEVICE)
    grad_out = torch.randn_like(q)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args, block_m=16, block_n=32, num_warps=4, num_stages=1)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args, dkdv_config=Config(16, 32, 4, 1),
                                   dq_config=Config(32, 16, 4, 1))[:3]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)


# --- ahead-of-time compilation for the GPUs CI does not have ----------------------------------------

AOT_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "aot-record.json")
AOT_SAMPLE = 64  # jobs recompiled against the record in each run: about 40 s on 2 cores


def _aot(*args, timeout):
    import json
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fasttransformer.kernels.aot", *args], capture_output=True,
                            text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _aot_reports_from_record():
    """The committed record's reports (``make aot-record``), if they were compiled from these
    sources under this Triton (aot.record_key()), after a random sample of their jobs, compiled
    again, gave the same reports; None if the key differs."""
    import json
    from fasttransformer.kernels import aot
    if not os.path.exists(AOT_RECORD):
        return None
    with open(AOT_RECORD) as f:
        record = json.load(f)
    if record["key"] != aot.record_key():
        return None
    seed = int.from_bytes(os.urandom(4), "little")
    recorded = {aot.report_identity(report): report for report in record["reports"]}
    compiled = _aot("--sample", str(AOT_SAMPLE), "--seed", str(seed), timeout=600)
    assert len(compiled) == AOT_SAMPLE
    for report in compiled:
        assert recorded.get(aot.report_identity(report)) == report, (
            f"{AOT_RECORD} is not what a compile gives (--sample {AOT_SAMPLE} --seed {seed}): compiled {report}, "
            f"recorded {recorded.get(aot.report_identity(report))}")
    return record["reports"]


@pytest.fixture(scope="module")
def aot_reports(tmp_path_factory):
    """The reports of every config of the table compiled for sm_80, sm_86 and sm_90, in a
    subprocess (the interpreter, on here, replaces triton.jit and cannot compile). The compile
    is deterministic: while the kernels' sources and Triton are those the committed record was
    made from (``make aot-record``; aot.record_key()), the reports are the record's, and
    AOT_SAMPLE of its jobs drawn at random are compiled again and must match (about 40 s
    instead of 13 min or more); otherwise every job is compiled. Under pytest-xdist the workers
    share one compile: the first to get here runs it, under a lock in the run's temporary
    folder, and the others read its result (when the two aot tests landed on two workers, both
    compiled, on the same 2 cores: the suite took 14 min 6 s instead of about 10; xdist's
    loadgroup, which would keep them on one worker, does not group under pytest 9.2,
    pytest-xdist#1386)."""
    import fcntl
    import json

    def reports():
        # With Triton's cache cold, the 1308 compiles took 13 min 8 s on a 2-core machine
        # (2026-12-07); in the suite they share the cores with the other worker. The limit is
        # there for a hang, not for a slow machine.
        return _aot_reports_from_record() or _aot(timeout=1800)

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return reports()
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above every worker's own
    record = shared / "aot-reports.json"
    with open(shared / "aot-reports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the compile fails
        if not record.exists():
            record.write_text(json.dumps(reports()))
    return json.loads(record.read_text())


@pytest.mark.aot
def test_aot_record_is_of_these_kernels():
    """The committed record of the AOT check (tests/data/aot-record.json) was made from the
    kernels' sources as they are, under CI's Triton: a change to fasttransformer/kernels comes
    with ``make aot-record`` (13 min on 2 cores), whose diff shows what the change did to each
    kernel's registers, spills and shared memory. Under another Triton or Python (make
    aot-tritons, make gpu-stack-test) the check compiles everything, and this test has nothing
    to say."""
    import json

    import triton
    from fasttransformer.kernels import aot
    with open(AOT_RECORD) as f:
        record = json.load(f)
    here = {"triton": triton.__version__, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    if here != {name: record[name] for name in here}:
        pytest.skip(f"the record is of triton {record['triton']} on Python {record['python']}, this is triton "
                    f"{here['triton']} on Python {here['python']}")
    assert record["key"] == aot.record_key(), (
        "fasttransformer/kernels changed since tests/data/aot-record.json was made: run `make aot-record` and "
        "commit it (until then the AOT check compiles every job, 13 min or more)")
    assert record["jobs"] == len(record["reports"]) == len(aot._jobs())


@pytest.mark.slow
@pytest.mark.aot
def test_kernels_compile_for_each_arch_with_its_matrix_instructions(aot_reports):
    """Every config of the table (configs.py), bf16 and float32, every arch, compiles within the
    arch's shared memory and runs its products on the tensor cores: wgmma on sm_90 (mma.sync on
    sm_80 and on sm_86, which stands for the 99 KB parts: sm_86, sm_89, sm_120). One exception, by
    design: on sm_90 a product with fewer than 64 rows cannot be a wgmma; the D = 256 dK/dV
    tile (BLOCK_N = 32, the largest without a spill) and float32's small tiles fall back to
    mma.sync, and their report must say so. The (D, Dv) pairs of aot.VALUE_HEAD_DIMS (a value
    head dim unlike the query's) are compiled in every variant too."""
    from fasttransformer.kernels import aot, configs
    kinds = {"attention_forward_kernel": "forward", "attention_backward_dkdv_kernel": "dkdv",
             "attention_backward_dq_kernel": "dq"}
    pairs = [report for report in aot_reports if report["head_dim_v"] != report["head_dim"]]
    assert {(report["kernel"], report["arch"], report["head_dim"], report["head_dim_v"], report["dtype"],
             report["options"].get("DROPOUT", False), report["options"].get("INT64_OFFSETS", False)) for report in pairs
            if report["kernel"] in kinds} == {(kernel, arch, *pair, dtype, dropout, int64) for kernel in kinds
                                             for arch in (80, 86, 90)
                  for pair in aot.VALUE_HEAD_DIMS for dtype in ("bf16", "fp32") if dtype == "bf16" or max(pair) <= 64
                  for dropout in (False, True) for int64 in (False, True)}
    everything, aot_reports = aot_reports, [report for report in aot_reports if report not in pairs]
    for kernel in ("attention_delta_kernel", "attention_combine_kernel"):  # with int64 offsets or not
        reports = [report for report in aot_reports if report["kernel"] == kernel]
        tables = (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
        assert {(report["arch"], report["head_dim"], report["dtype"], report["options"].get("INT64_OFFSETS", False))
                for report in reports} == {(arch, head_dim, dtype, int64) for dtype, table in tables
                                           for (arch, head_dim) in table for int64 in (False, True)}, kernel
    split = {(report["arch"], report["head_dim"], report["dtype"], report["options"].get("DROPOUT", False))
             for report in aot_reports if report["options"].get("SPLIT_KEYS")}
    assert split == {(arch, head_dim, dtype, dropout) for dropout in (False, True)
                     for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
                     for (arch, head_dim) in table}
    # GQA row packing (no dropout): every mask, 32- and 64-bit offsets, split keys; the merge's packed stores
    packed = {(report["kernel"], report["arch"], report["head_dim"], report["dtype"],
               report["options"].get("INT64_OFFSETS", False), report["options"].get("SPLIT_KEYS", False))
              for report in aot_reports if report["options"].get("PACK_GQA")}
    assert packed == {(kernel, arch, head_dim, dtype, int64, split)
                      for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
                      for (arch, head_dim) in table
                      for kernel, int64, split in (("attention_forward_kernel", False, False),
                                                   ("attention_forward_kernel", False, True),
                                                   ("attention_forward_kernel", True, False),
                                                   ("attention_combine_kernel", False, False),
                                                   ("attention_combine_kernel", True, False))}
    int64 = {(report["kernel"], report["arch"], report["head_dim"], report["dtype"],
              report["options"].get("DROPOUT", False), report["options"].get("MASK_KIND"))
             for report in aot_reports if report["kernel"] in kinds and report["options"].get("INT64_OFFSETS")}
    assert int64 == {(kernel, arch, head_dim, dtype, dropout, mask_kind) for dropout in (False, True)
                     for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
                     for (arch, head_dim) in table
                     for kernel, mask_kind in (("attention_forward_kernel", None), ("attention_forward_kernel", 2),
                                               ("attention_backward_dkdv_kernel", None),
                                               ("attention_backward_dq_kernel", None),
                                               ("attention_backward_dq_kernel", 2))}
    # the dQ kernel with the boolean mask (WORST_CASE) and with the float mask's gradient, in every variant
    dq = {(report["arch"], report["head_dim"], report["dtype"], report["options"].get("MASK_KIND"))
          for report in aot_reports if report["kernel"] == "attention_backward_dq_kernel"}
    assert dq == {(arch, head_dim, dtype, mask_kind) for mask_kind in (None, 2)
                  for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
                  for (arch, head_dim) in table}
    # the forward-mode (JVP) kernel: the bool mask and the float mask with its tangent, 32- and 64-bit
    # offsets, with dropout or not, every entry of the table and the (D, Dv) pairs
    jvp = {(report["arch"], report["head_dim"], report["head_dim_v"], report["dtype"],
            report["options"].get("MASK_TANGENT", False), report["options"].get("INT64_OFFSETS", False),
            report["options"].get("DROPOUT", False))
           for report in everything if report["kernel"] == "attention_jvp_kernel"}
    assert jvp == {(arch, *(pair if isinstance(pair, tuple) else (pair, pair)), dtype, tangent, int64, dropout)
                   for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32))
                   for (arch, head_dim) in table
                   for pair in (head_dim, *(pair for pair in aot.VALUE_HEAD_DIMS if dtype == "bf16" or max(pair) <= 64))
                   for tangent in (False, True) for int64 in (False, True) for dropout in (False, True)}
    aot_reports = [report for report in everything if report["kernel"] in kinds]  # delta, combine: no products
    assert {(kinds[report["kernel"]], report["arch"], report["head_dim"], report["dtype"]) for report in aot_reports
            if report not in pairs} == {
        (kind, arch, head_dim, dtype) for kind in kinds.values()
        for dtype, table in (("bf16", configs.FORWARD), ("fp32", configs.FORWARD_FP32)) for (arch, head_dim) in table}
    # the JVP kernel's products have BLOCK_M rows, as the dQ kernel's
    for report in aot_reports + [report for report in everything if report["kernel"] == "attention_jvp_kernel"]:
        assert report["shared_bytes"] <= {80: 163, 86: 99, 90: 227}[report["arch"]] * 1024, report
        if report["arch"] in (80, 86):
            assert report["matrix_instructions"] == ["mma.sync"], report
            continue
        # sm_90: the rows of the kernel's products are BLOCK_N (dK/dV works on S^T) or BLOCK_M.
        block_m, block_n, num_warps, _ = report["config"]
        rows = block_n if report["kernel"] == "attention_backward_dkdv_kernel" else block_m
        if rows >= 64:
            assert "wgmma.mma_async" in report["matrix_instructions"], report
        else:
            assert report["matrix_instructions"] == ["mma.sync"], report


@pytest.mark.parametrize("capability,shared_memory,arch", [
    ((8, 0), 166912, 80), ((8, 7), 166912, 80), ((8, 6), 101376, 86), ((8, 9), 101376, 86), ((9, 0), 232448, 90),
    ((10, 0), 232448, 90), ((12, 0), 101376, 86),
], ids=["A100", "Orin", "A10", "L4", "H100", "B200", "RTX5090"])
def test_config_table_arch_of_each_gpu(monkeypatch, capability, shared_memory, arch):
    """The tables' arch for a GPU: sm_90's entries (wgmma tiles) for Hopper and the datacenter
    Blackwells; the mma.sync entries of sm_80 where a block may take 163 KB of shared memory,
    and those of the 99 KB parts (SMEM_99KB) elsewhere, sm_120 included: sm_80's D = 256 dQ
    config needs 104448 bytes, past their 101376, and Triton refuses to launch it there."""
    from types import SimpleNamespace

    from fasttransformer.kernels import configs
    properties = SimpleNamespace(major=capability[0], minor=capability[1], shared_memory_per_block_optin=shared_memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: properties)
    configs._cuda_arch.cache_clear()
    try:
        device = torch.device("cuda", 0)
        assert configs._arch(device) == arch
        dq = configs.backward_configs(device, torch.bfloat16, 256, False)[1]
        assert dq == configs.BACKWARD_DQ[(arch, 256)]
    finally:
        configs._cuda_arch.cache_clear()


# triton version -> {(kernel, arch, head dim, value head dim, dtype, options): stack bytes} that the
# table keeps (configs.py). CI's Triton (requirements-dev.txt) has none. Under 3.9.0, one register of
# the list builder goes to the stack once per program, outside its loops (an STL and an LDL in the SASS).
KNOWN_SPILLS = {
    "3.9.0": {("block_lists_kernel", 90, 0, 0, "u8", (("FACTOR_C", 1), ("FACTOR_R", 8), ("KEYS_ON_ROWS", False),
                                                      ("TILES", 128))): 8},
}


@pytest.mark.slow
@pytest.mark.aot
def test_attention_configs_do_not_spill(aot_reports):
    """No register spills (stack bytes from cuobjdump) in any config of the table, with every
    mask on, without and with dropout (dropout's own entries), split keys or not, for both
    archs and dtypes, nor in the delta pre-pass and the split keys' merge. The compile mirrors
    the JIT's runtime specialisation (aot.py): without it, the report described kernels that
    never run, and spilled. Under a Triton other than CI's, the spills KNOWN_SPILLS lists for it
    (configs.py says why each is kept) are allowed up to their size, and must still be there."""
    import triton
    known = KNOWN_SPILLS.get(triton.__version__, {})

    def key(report):
        return (report["kernel"], report["arch"], report["head_dim"], report["head_dim_v"], report["dtype"],
                tuple(sorted(report["options"].items())))

    spilling = [report for report in aot_reports if report["stack_bytes"] > known.get(key(report), 0)]
    assert not spilling, spilling
    gone = set(known) - {key(report) for report in aot_reports if report["stack_bytes"]}
    assert not gone, f"no longer spill under triton {triton.__version__}: remove from KNOWN_SPILLS: {gone}"
    # The block-list builder's kernels (block_lists.py) are compiled too, for both archs.
    assert {(report["kernel"], report["arch"]) for report in aot_reports
            if report["kernel"] in ("tile_classes_kernel", "block_lists_kernel")} == {
        (kernel, arch) for kernel in ("tile_classes_kernel", "block_lists_kernel") for arch in (80, 86, 90)}


NEWEST_TRITON = os.path.join(sys.prefix, "triton-newest")  # make test installs it (Makefile: NEWEST_TRITON)


@pytest.mark.aot
@pytest.mark.skipif(not os.path.isdir(NEWEST_TRITON), reason=f"no {NEWEST_TRITON}: make test installs the Triton "
                                                             "that the newest torch pins there")
def test_kernels_compile_under_the_newest_triton():
    """Every kernel, in every variant of one config (sm_90, bf16, D = 128: each code path once),
    compiles under the Triton that the newest torch's CUDA wheel pins (the Makefile's
    NEWEST_TRITON, installed beside CI's), not only under CI's: Triton 3.9, torch 2.15's, removed
    the block pointers the kernels were written with, and every CUDA call of the op would have
    failed there while CI stayed green. Spills under it are ``make aot-tritons``' business."""
    import json
    import subprocess

    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "PYTHONPATH": os.pathsep.join([NEWEST_TRITON, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])}
    result = subprocess.run([sys.executable, "-m", "fasttransformer.kernels.aot", "--quick"], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout)
    installed = {name[len("triton-"):-len(".dist-info")] for name in os.listdir(NEWEST_TRITON)
                 if name.startswith("triton-") and name.endswith(".dist-info")}
    assert {report["triton"] for report in reports} == installed, (installed, {report["triton"] for report in reports})
    assert {report["kernel"] for report in reports} == {
        "attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel",
        "attention_jvp_kernel", "attention_delta_kernel", "attention_combine_kernel", "tile_classes_kernel",
        "block_lists_kernel"}
    assert all(report["registers"] for report in reports), reports


# --- the public op: fasttransformer.ops.scaled_dot_product_attention --------------------------------

import logging  # noqa: E402

from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402

from fasttransformer.ops import scaled_dot_product_attention  # noqa: E402

# name -> (public keyword arguments builder, dense "allowed" builder) for Lq=29, Lk=41
OP_CASES = {
    "none": {},
    "is_causal": {"is_causal": True},
    "lower_right": {"attn_mask": "lower_right"},
    "upper_left": {"attn_mask": "upper_left"},
    "padding+window_int": {"key_padding_mask": True, "window_size": 6},
    "window_pair+causal": {"window_size": (4, 0), "is_causal": True},
    "bool+is_causal+padding": {"attn_mask": "bool", "is_causal": True, "key_padding_mask": True},
    "float+padding": {"attn_mask": "float", "key_padding_mask": True},
}


def op_case(name, dtype, batch=2, heads=4, kv_heads=2, seqlen_q=29, seqlen_k=41, head_dim=24):
    spec = OP_CASES[name]
    q = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, device=DEVICE, dtype=dtype)
    kwargs, allowed, bias = {"enable_gqa": True}, torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool), None
    offset = 0
    if spec.get("attn_mask") == "lower_right":
        kwargs["attn_mask"], offset = causal_lower_right(seqlen_q, seqlen_k), seqlen_k - seqlen_q
        allowed &= causal_bool(seqlen_q, seqlen_k, offset)
    if spec.get("attn_mask") == "upper_left":
        kwargs["attn_mask"] = causal_upper_left(seqlen_q, seqlen_k)
        allowed &= causal_bool(seqlen_q, seqlen_k, 0)
    if spec.get("is_causal"):
        kwargs["is_causal"] = True
        allowed &= causal_bool(seqlen_q, seqlen_k, 0)
    if "window_size" in spec:
        kwargs["window_size"] = spec["window_size"]
        left, right = (spec["window_size"], 0) if isinstance(spec["window_size"], int) else spec["window_size"]
        allowed &= window_bool(seqlen_q, seqlen_k, offset, left, right)
    if spec.get("key_padding_mask"):
        padding = torch.rand(batch, seqlen_k) < 0.3
        padding[1] = True  # the second sequence is all padding
        kwargs["key_padding_mask"] = padding.to(DEVICE)
        allowed &= ~padding[:, None, None, :]
    if spec.get("attn_mask") == "bool":
        mask = torch.rand(seqlen_q, seqlen_k) < 0.8
        kwargs["attn_mask"] = mask.to(DEVICE)
        allowed &= mask
    if spec.get("attn_mask") == "float":
        bias = torch.randn(batch, 1, seqlen_q, seqlen_k, dtype=dtype)
        kwargs["attn_mask"] = bias.to(DEVICE)
    return q, k, v, kwargs, allowed, bias


def record_launches(monkeypatch, module, name, arguments=None):
    """Wraps the Triton kernel ``module.name``: every launch still runs, and its grid is appended
    to the returned list, or (grid, the values of the kernel's ``arguments``, by name)."""
    grids, kernel = [], getattr(module, name)

    class Recording:
        def __getitem__(self, grid):
            if arguments is None:
                grids.append(grid)
                return kernel[grid]

            def launch(*args, **kwargs):
                named = dict(zip(kernel.arg_names, args), **kwargs)
                grids.append((grid, tuple(named[argument] for argument in arguments)))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, name, Recording())
    return grids


@pytest.mark.parametrize("name", ["lower_right", "bool+is_causal+padding", "float+padding"])
def test_op_split_keys_when_the_heuristic_asks(monkeypatch, name):
    """Where configs.forward_splits splits (on CUDA, when too few programs fill the GPU), the
    public op launches the merge and its forward and backward still match the reference. Here
    the heuristic is made to answer 3 (off CUDA it answers 1)."""
    import fasttransformer.kernels.attention_forward as forward_kernels
    from fasttransformer.kernels import configs

    merges = record_launches(monkeypatch, forward_kernels, "attention_combine_kernel")
    monkeypatch.setattr(configs, "forward_splits", lambda device, programs, key_tiles: 3)
    q, k, v, kwargs, allowed, bias = op_case(name, torch.float32, seqlen_q=5, seqlen_k=230)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations(DEVICE):
        out = scaled_dot_product_attention(*leaves, **kwargs, backend="triton")
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert len(merges) == 1
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, [leaf.grad for leaf in leaves])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(OP_CASES))
def test_op_matches_reference_forward_and_backward(name, dtype, backend):
    q, k, v, kwargs, allowed, bias = op_case(name, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, **kwargs, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, allowed, bias)
    ref.backward(grad_out.double())
    base_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    base = reference_attention(*base_leaves, allowed, bias)
    base.backward(grad_out)
    assert_within_torch_error(out, ref, base, 2.0, "output")
    scale = max(leaf.grad.abs().max().item() for leaf in ref_leaves)
    for label, leaf, ref_leaf, base_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves, base_leaves):
        assert_within_torch_error(leaf.grad, ref_leaf.grad, base_leaf.grad, 3.0, label, magnitude=scale)


def test_op_auto_on_cpu_uses_torch_and_logs_why(caplog):
    q, k, v, kwargs, _, _ = op_case("padding+window_int", torch.float32)
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    kwargs["key_padding_mask"] = kwargs["key_padding_mask"].cpu()
    with caplog.at_level(logging.DEBUG, logger="fasttransformer"):
        auto = scaled_dot_product_attention(q, k, v, **kwargs)
    assert "torch backend (CPU tensors go to torch)" in caplog.text
    torch.testing.assert_close(auto, scaled_dot_product_attention(q, k, v, **kwargs, backend="torch"))


@pytest.mark.parametrize("capability,supported", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                                  ((9, 0), True), ((12, 0), True)],
                         ids=["V100", "T4", "A100", "A10", "H100", "RTX5090"])
def test_op_unsupported_gpus_go_to_torch_with_the_reason(monkeypatch, capability, supported):
    """The kernels' configs and products need sm_80 or newer (a T4 has 64 KB of shared memory a
    block; the configs take up to 96 KB): for CUDA tensors on an older GPU the support check
    gives the reason, so backend="auto" goes to torch and backend="triton" raises it (that path
    runs with CUDA tensors only), and `fasttransformer info` says it. Likewise on ROCm."""
    from fasttransformer.__main__ import attention_backends
    from fasttransformer.ops import attention
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(attention, "_GPU_UNSUPPORTED", {})
    reason = attention._gpu_unsupported(0)
    assert (reason is None) == supported
    if not supported:
        assert f"cuda:0 is sm_{capability[0]}{capability[1]}" in reason and "8.0 (Ampere)" in reason
    # the op's support check, for a stand-in of a CUDA query that the kernels otherwise take
    from types import SimpleNamespace
    query = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(2, 4, 100, 64))
    assert attention._triton_unsupported(query, {"value_head_dim": 64, "dropout_p": 0.0}) == reason
    backends = attention_backends({"gpu": {"name": "fake"}, "triton": "3.6.0"})
    assert backends["triton"] == (reason or "usable")
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # ROCm: torch's "cuda" device on AMD GPUs
    monkeypatch.setattr(attention, "_GPU_UNSUPPORTED", {})
    assert "built for NVIDIA GPUs; this is ROCm (HIP 6.4.0)" in attention._gpu_unsupported(0)


def test_op_dropout_is_reproducible_and_matches_the_reference_with_its_mask():
    """Through the public op and autograd: the same torch.manual_seed gives bitwise the same
    output and gradients, another seed another mask, and the result is the float64 reference
    with the mask the kernels drew (materialised from the seed the op takes from torch)."""
    from fasttransformer.ops.attention import _dropout_seed
    q, k, v, kwargs, allowed, bias = op_case("float+padding", torch.float32)
    grad_out = torch.randn_like(q)

    def run(seed, p=0.3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out = scaled_dot_product_attention(*leaves, **kwargs, dropout_p=p, backend="triton")
        out.backward(grad_out)
        return out, [leaf.grad for leaf in leaves]

    out, grads = run(3)
    again, again_grads = run(3)
    assert torch.equal(out, again) and all(torch.equal(a, b) for a, b in zip(grads, again_grads))
    assert not torch.equal(out, run(4)[0])
    torch.manual_seed(3)
    keep = dropout_keep_mask(_dropout_seed(q.device), allowed.shape, 0.3)
    assert 0.6 < keep.float().mean() < 0.8
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads, keep=keep,
                             dropout_p=effective_dropout_p(0.3))

    out, grads = run(5, p=1.0)  # everything dropped: zeros, zero gradients
    assert (out == 0).all() and all((grad == 0).all() for grad in grads)


def test_op_dropout_torch_backend_is_reproducible_under_a_seed():
    q, k, v, _, _, _ = op_case("none", torch.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(scaled_dot_product_attention(q, k, v, dropout_p=0.5, enable_gqa=True, backend="torch"))
    assert torch.equal(*runs)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_op_autocast_computes_in_the_autocast_dtype(backend):
    """Under torch.autocast the floating inputs, the float mask too, are cast to the autocast
    dtype, as torch's SDPA does, whichever backend runs (the Triton kernels returned float32
    here, torch bfloat16); float64 inputs are left alone; the gradients reach the float32 leaves."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter multiplies bfloat16 as raw bits
    device_type = torch.device(DEVICE).type
    q, k, v = (torch.randn(2, 4, length, 24, device=DEVICE, requires_grad=True) for length in (19, 33, 33))
    bias = torch.randn(19, 33, device=DEVICE, requires_grad=True)
    with torch.autocast(device_type, dtype=dtype):
        out = scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        doubles = [t.detach().double() for t in (q, k, v)]
        assert scaled_dot_product_attention(*doubles, backend="torch" if backend == "triton" else backend).dtype == \
            torch.float64
        causal = scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(19, 33), backend=backend)
    assert out.dtype == expected.dtype == causal.dtype == dtype
    cast = [t.detach().to(dtype) for t in (q, k, v, bias)]
    allowed = torch.ones(2, 4, 19, 33, dtype=torch.bool)
    reference_out = reference_attention(*[t.double() for t in cast[:3]], allowed, cast[3].double())
    assert_within_torch_error(out, reference_out, expected, 2.0, "output")
    lower_right = causal_bool(19, 33, 33 - 19).expand(2, 4, 19, 33)
    assert_within_torch_error(causal, reference_attention(*[t.double() for t in cast[:3]], lower_right, None),
                              reference_attention(*cast[:3], lower_right, None), 2.0, "causal output")
    out.float().sum().backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == torch.float32 and leaf.grad.abs().sum() > 0
               for leaf in (q, k, v, bias))


BIAS_SHAPES = {"Lk": lambda b, h, m, n: (n,), "Lq,Lk": lambda b, h, m, n: (m, n),
               "B,1,Lq,Lk": lambda b, h, m, n: (b, 1, m, n), "1,H,1,Lk": lambda b, h, m, n: (1, h, 1, n),
               "B,H,Lq,Lk": lambda b, h, m, n: (b, h, m, n)}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("extra", ["", "padding", "causal+window"])
@pytest.mark.parametrize("bias_shape", list(BIAS_SHAPES))
def test_op_float_mask_gradient(bias_shape, extra, dtype, backend):
    """The gradient of a float attn_mask (summed over its broadcast dimensions), against the
    float64 reference, with -inf entries and combined with the other masks."""
    batch, heads, seqlen_q, seqlen_k, head_dim = 2, 4, 37, 70, 32
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=DEVICE, dtype=dtype)
               for length in (seqlen_q, seqlen_k, seqlen_k))
    bias = torch.randn(BIAS_SHAPES[bias_shape](batch, heads, seqlen_q, seqlen_k), device=DEVICE, dtype=dtype)
    bias[..., 1::7] = float("-inf")  # every row keeps keys 0 and 2-7 visible
    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    kwargs = {}
    if "padding" in extra:
        padding = torch.rand(batch, seqlen_k) < 0.3
        padding[:, 0] = False
        kwargs["key_padding_mask"] = padding.to(DEVICE)
        allowed &= ~padding[:, None, None, :]
    if "causal" in extra:
        kwargs.update(is_causal=True, window_size=(20, 0))
        allowed &= causal_bool(seqlen_q, seqlen_k, 0) & window_bool(seqlen_q, seqlen_k, 0, 20, 0)
    grad_out = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE, dtype=dtype)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    with poisoned_allocations(DEVICE):
        out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], **kwargs, backend=backend)
        out.backward(grad_out)
    results = {}
    for label, cast in (("ref", torch.float64), ("base", dtype)):
        ref_leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v, bias)]
        reference_attention(*ref_leaves[:3], allowed, ref_leaves[3]).backward(grad_out.to(cast))
        results[label] = ref_leaves
    assert leaves[3].grad.shape == bias.shape and leaves[3].grad.dtype == dtype
    scale = max(leaf.grad.abs().max().item() for leaf in results["ref"])
    for index, name in enumerate(("dq", "dk", "dv", "dbias")):
        assert_within_torch_error(leaves[index].grad, results["ref"][index].grad, results["base"][index].grad,
                                  3.0, name, magnitude=scale)


@pytest.mark.parametrize("bias_shape", ["Lq,Lk", "B,1,Lq,Lk", "1,H,1,Lk"])
def test_float_mask_gradient_buffer_is_bounded(monkeypatch, bias_shape):
    """The float mask's gradient goes through a float32 (B', Hq, Lq, Lk) buffer of at most
    DBIAS_BUFFER_BYTES: with room for two sequences, B = 5 takes three launches of the dQ
    kernel (2 + 2 + 1 sequences), whose dq, dk, dv equal the one-launch ones bit for bit and
    whose mask gradient equals it up to float32 summation order. With dropout the buffer stays
    whole (its draws are keyed by the (batch, head) index within a launch)."""
    import fasttransformer.kernels.attention_backward as backward_kernels

    batch, heads, seqlen_q, seqlen_k, head_dim = 5, 3, 37, 45, 16
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=DEVICE) for length in (seqlen_q, seqlen_k, seqlen_k))
    bias = torch.randn(BIAS_SHAPES[bias_shape](batch, heads, seqlen_q, seqlen_k), device=DEVICE)
    padding = torch.rand(batch, seqlen_k, device=DEVICE) < 0.3
    grad_out = torch.randn(batch, heads, seqlen_q, head_dim, device=DEVICE)
    launches = record_launches(monkeypatch, backward_kernels, "attention_backward_dq_kernel")

    def gradients(dropout_p=0.0):
        torch.manual_seed(0)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3], dropout_p=dropout_p,
                                           key_padding_mask=padding, backend="triton")
        out.backward(grad_out)
        return [leaf.grad for leaf in leaves]

    whole = gradients()
    assert len(launches) == 1
    monkeypatch.setattr(backward_kernels, "DBIAS_BUFFER_BYTES", 2 * heads * seqlen_q * seqlen_k * 4)
    launches.clear()
    chunked = gradients()
    assert [grid[2] for grid in launches] == [2, 2, 1]  # (blocks, heads, sequences)
    for name, a, b in zip(("dq", "dk", "dv"), chunked, whole):
        assert torch.equal(a, b), name
    assert chunked[3].shape == bias.shape
    torch.testing.assert_close(chunked[3], whole[3], rtol=1e-5, atol=1e-6)
    launches.clear()
    gradients(dropout_p=0.3)
    assert len(launches) == 1


def test_op_float_mask_without_grad_gets_none():
    q, k, v, kwargs, _, _ = op_case("float+padding", torch.float32)
    bias = kwargs.pop("attn_mask")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    scaled_dot_product_attention(*leaves, attn_mask=bias, **kwargs, backend="triton").sum().backward()
    assert bias.grad is None and all(leaf.grad is not None for leaf in leaves)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_op_rows_without_keys_are_zero_with_zero_gradients(backend):
    q, k, v, kwargs, allowed, _ = op_case("bool+is_causal+padding", torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, **kwargs, backend=backend)
    out.sum().backward()
    no_key = ~allowed.any(-1)
    assert no_key[1].all() and (out[no_key.to(out.device)] == 0).all()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves)
    assert (q.grad[no_key.to(q.device)] == 0).all()


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(29, 41), (41, 29)])
def test_op_window_reaching_key_0_runs_as_the_causal_mask(monkeypatch, seqlen_q, seqlen_k):
    """Without is_causal, a window whose left reach covers key 0 for every query (left >= Lq - 1)
    is the causal mask j <= i + right (what nn passes for lower-right causal under torch.compile):
    the kernels get it as causal_offset = right, no window, or no mask at all once every query
    sees the last key; a shorter left reach stays a window. Same results as the dense mask."""
    import fasttransformer.kernels.attention_forward as forward_kernels

    launched = []
    launch = forward_kernels.attention_forward
    monkeypatch.setattr(forward_kernels, "attention_forward", lambda *args, **kwargs: launched.append(
        (kwargs["causal_offset"], kwargs["window"])) or launch(*args, **kwargs))
    q, k, v = (torch.randn(2, 3, length, 16, device=DEVICE) for length in (seqlen_q, seqlen_k, seqlen_k))
    cases = [((seqlen_q - 1, 0), (0, None)), ((max(seqlen_q, seqlen_k), 3), (3, None)),  # (window, launched)
             ((seqlen_q + 5, seqlen_k - 2), (seqlen_k - 2, None)), ((seqlen_q - 1, seqlen_k - 1), (None, None)),
             ((seqlen_q - 2, 3), (None, (seqlen_q - 2, 3)))]
    for window, expected in cases:
        launched.clear()
        out = scaled_dot_product_attention(q, k, v, window_size=window, backend="triton")
        assert launched == [expected], window
        dense = window_bool(seqlen_q, seqlen_k, 0, *window).to(DEVICE)
        torch.testing.assert_close(out, scaled_dot_product_attention(q, k, v, dense, backend="triton"),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scaled_dot_product_attention(q, k, v, window_size=window, backend="torch"),
                                   scaled_dot_product_attention(q, k, v, dense, backend="torch"), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter says it
def test_op_float_mask_at_float32_min_acts_as_minus_inf():
    """The documented limit of a float attn_mask: values at or below about -2.4e38 (such as
    torch.finfo(float32).min) overflow the kernels' base-2 scaling to -inf. A row with some
    larger value is unchanged (those keys' weights are 0 either way); a row of only such values
    gives zeros, where torch's math gives the mean of the values."""
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE) for n in (6, 9, 9))
    lowest = torch.finfo(torch.float32).min
    bias = torch.randn(2, 1, 6, 9, device=DEVICE).masked_fill(torch.rand(2, 1, 6, 9, device=DEVICE) < 0.5, lowest)
    bias[:, :, :, 0] = 0.5  # every row sees key 0
    bias[1, :, 2] = lowest  # but this one, which sees only float32's min
    out = scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="triton")
    expected = scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="torch")
    assert torch.allclose(expected[1, :, 2], v[1].mean(1), atol=1e-5)  # uniform weights
    assert (out[1, :, 2] == 0).all()
    others = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    others[1, 2] = False
    torch.testing.assert_close(out.transpose(1, 2)[others], expected.transpose(1, 2)[others], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["none", "lower_right", "window_pair+causal", "bool+is_causal+padding"])
def test_op_nan_inputs_give_nan_where_the_reference_does(name):
    """A NaN in the query or a key (a diverging run) gives NaN in exactly the output rows that
    the float64 reference gives NaN in (the rows that see it), a NaN value in at least the rows
    that see it: never a silent number, as torch's CPU flash kernel gives a NaN query's row
    (zeros, pytorch/pytorch#141128). An online softmax can lose it: a row max that skips NaN, a
    rescale or tile skip keyed on the max. Masks are bool here: a NaN key that a mask hides is
    dropped, as torch's masked_fill does. A NaN value also reaches other rows through a 0 * NaN
    product: the reference's matmul forms it for every row, the kernels for the rows of the
    tiles that load it."""
    for which in range(3):
        q, k, v, kwargs, allowed, bias = op_case(name, torch.float32)
        tensor = (q, k, v)[which]
        visible = allowed.nonzero()  # (b, query head, i, j): query i of that head sees key j
        b, head, i, j = visible[torch.randint(len(visible), ())].tolist()
        group = q.shape[1] // k.shape[1]
        tensor[b, head if which == 0 else head // group, i if which == 0 else j, 5] = float("nan")
        out = scaled_dot_product_attention(q, k, v, **kwargs, backend="triton")
        ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
        nan_rows, got = ref.isnan().any(-1), out.isnan().any(-1)
        assert nan_rows.any(), "the case tests too little"
        if which < 2:
            assert not nan_rows.all(), "the case tests too little"
            assert torch.equal(got, nan_rows), f"NaN in {'qk'[which]}: rows differ"
        else:  # the rows that see the value must be NaN; the others are where a product 0 * NaN
            # was formed: every row in the reference, the rows of the tiles that load it here
            heads = slice(head // group * group, (head // group + 1) * group)  # the value's key head's
            assert got[b, heads][allowed[b, heads, :, j].to(got.device)].all(), "NaN in v: a row that sees it"
            assert not (got & ~nan_rows).any(), "NaN in v: a row the reference has no NaN in"
        assert torch.isfinite(out[~got]).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shapes", [((0, 2, 5, 16), (0, 2, 7, 16)), ((2, 0, 5, 16), (2, 0, 7, 16)),
                                    ((2, 2, 0, 16), (2, 2, 7, 16)), ((2, 2, 5, 16), (2, 2, 0, 16))],
                         ids=["B0", "H0", "Lq0", "Lk0"])
def test_op_empty_dimensions(shapes, backend):
    """A zero-size batch, head count or length gives the empty (or, for Lk = 0: all-zero) output and
    zero gradients, with every mask kind, as torch's SDPA would (rows without keys are zeros).
    (torch 2.11's own SDPA dies of SIGFPE on 0 heads: the torch backend must not call it.)"""
    (batch, heads, seqlen_q, head_dim), (_, kv_heads, seqlen_k, _) = shapes
    leaves = [torch.randn(shape, device=DEVICE, requires_grad=True) for shape in (shapes[0], shapes[1], shapes[1])]
    masks = {"is_causal": True, "window_size": 3, "key_padding_mask": torch.zeros(batch, seqlen_k, dtype=torch.bool,
                                                                                   device=DEVICE),
             "attn_mask": torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=DEVICE)}
    float_mask = torch.randn(batch, 1, seqlen_q, seqlen_k, device=DEVICE, requires_grad=True)
    for kwargs in ({}, masks, {"attn_mask": float_mask}):
        out = scaled_dot_product_attention(*leaves, **kwargs, backend=backend)
        assert out.shape == (batch, heads, seqlen_q, head_dim) and (out == 0).all()
        out.sum().backward()
        assert all(leaf.grad.shape == leaf.shape and (leaf.grad == 0).all() for leaf in leaves)
    assert float_mask.grad.shape == float_mask.shape and (float_mask.grad == 0).all()


RANK_CASES = {  # rank: leading dims, heads, kv heads; the masks' shapes (the mask gradient summed back to them)
    2: ((), (), (), {"bool": (29, 41), "float": (29, 41)}),
    3: ((), (4,), (2,), {"bool": (1, 29, 41), "float": (41,)}),
    5: ((2, 3), (4,), (2,), {"bool": (3, 1, 29, 41), "float": (2, 1, 1, 1, 41)}),
}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("masks", ["bool+padding+causal", "float"])
@pytest.mark.parametrize("rank", list(RANK_CASES), ids=lambda rank: f"rank{rank}")
def test_op_other_ranks_as_torch(rank, masks, backend):
    """As torch's SDPA, inputs of rank 2 (Lq, D), 3 (Hq, Lq, D) and 5 (..., Hq, Lq, D) work
    (GQA on dim -3), masks broadcast against the whole shape, key_padding_mask (..., Lk):
    against the reference run on the same case written out in 4-D (dense masks), forward and
    backward, the float mask's gradient summed back to its broadcast shape."""
    lead, heads, kv_heads, mask_shapes = RANK_CASES[rank]
    q = torch.randn(*lead, *heads, 29, 24, device=DEVICE)
    k, v = (torch.randn(*lead, *kv_heads, 41, 24, device=DEVICE) for _ in range(2))
    full = (*q.shape[:-1], 41)
    batch = math.prod(lead)
    kwargs, allowed, bias = {}, torch.ones(full, dtype=torch.bool), None
    if masks == "float":
        kwargs["attn_mask"] = torch.randn(mask_shapes["float"], device=DEVICE).requires_grad_()
        bias = kwargs["attn_mask"].detach().cpu().expand(full)
    else:
        kwargs["attn_mask"] = torch.rand(mask_shapes["bool"]) < 0.7
        padding = torch.rand(*lead, 41) < 0.3
        padding[..., 0] = False
        kwargs["key_padding_mask"], kwargs["is_causal"] = padding.to(DEVICE), True
        allowed = allowed & kwargs["attn_mask"] & ~padding[..., None, None, :] & causal_bool(29, 41, 0)
        kwargs["attn_mask"] = kwargs["attn_mask"].to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, **kwargs, enable_gqa=True, backend=backend)
    assert out.shape == q.shape
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    def four_d(tensor):
        return tensor.reshape(batch, -1, *tensor.shape[-2:])

    q4, k4, v4 = (four_d(t) for t in (q, k, v))
    grads = [four_d(leaf.grad) for leaf in leaves]
    assert_matches_reference(q4, k4, v4, four_d(allowed), None if bias is None else four_d(bias), four_d(grad_out),
                             four_d(out), grads)
    if masks == "float":
        runs = []
        for cast in (torch.float64, torch.float32):
            bias_leaf = four_d(bias).to(cast).requires_grad_()
            leaves4 = [t.to(cast) for t in (q4, k4, v4)]
            reference_attention(*leaves4, four_d(allowed), bias_leaf).backward(four_d(grad_out).to(cast))
            runs.append(bias_leaf.grad.reshape(full).sum_to_size(mask_shapes["float"]))
        assert kwargs["attn_mask"].grad.shape == mask_shapes["float"]
        assert_within_torch_error(kwargs["attn_mask"].grad, *runs, 3.0, "mask gradient",
                                  magnitude=runs[0].abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "auto", "torch"])
def test_op_value_head_dim_may_differ(backend):
    """As torch's SDPA: value (B, Hk, Lk, Dv) with Dv != D gives (B, Hq, Lq, Dv), in the kernels
    too. Their output has the query's layout: a query in (B, L, H, D) memory (an nn module's
    projection, transposed) gives an output in (B, L, H, Dv) memory."""
    q, k, v, kwargs, allowed, bias = make_case(2, 4, 2, 29, 41, 24, ["padding", "causal"], torch.float32)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    v = torch.randn(2, 2, 41, 40, device=DEVICE)
    kwargs = {"key_padding_mask": kwargs["key_padding_mask"], "is_causal": True}
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, **kwargs, enable_gqa=True, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert out.shape == (2, 4, 29, 40)
    if backend == "triton":
        assert out.transpose(1, 2).is_contiguous()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, allowed, bias)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad.float(), atol=1e-5, rtol=1e-5)
    empty = scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0], enable_gqa=True, backend=backend)
    assert empty.shape == (2, 4, 29, 40) and (empty == 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "B,L,H,D", "H,B,L,D", "batch-expanded", "heads-expanded", "sliced"])
def test_output_with_another_value_head_dim_is_laid_out_as_empty_like(layout):
    """With Dv != D the output takes the layout ``empty_like(query)`` would (what it is when Dv =
    D): the query's order in memory when the query is dense, contiguous when it is not (an
    expanded query's stride-0 dimensions once made the output's last dimension strided)."""
    from fasttransformer.kernels.attention_forward import output_like
    query = {"contiguous": lambda: torch.randn(2, 3, 5, 8),
             "B,L,H,D": lambda: torch.randn(2, 5, 3, 8).transpose(1, 2),
             "H,B,L,D": lambda: torch.randn(3, 2, 5, 8).transpose(0, 1),
             "batch-expanded": lambda: torch.randn(1, 3, 5, 8).expand(2, 3, 5, 8),
             "heads-expanded": lambda: torch.randn(2, 1, 5, 8).expand(2, 3, 5, 8),
             "sliced": lambda: torch.randn(2, 3, 5, 12)[..., 2:10]}[layout]()
    for head_dim_v in (8, 20):
        out, like = output_like(query, head_dim_v), torch.empty_like(query)
        assert out.shape == (2, 3, 5, head_dim_v) and out.stride(-1) == 1
        order = [sorted(range(4), key=lambda dim: -t.stride(dim)) for t in (out, like)]
        assert order[0] == order[1], (layout, out.stride(), like.stride())
        assert out.is_contiguous() == like.is_contiguous()


@pytest.mark.parametrize("masks", [{}, {"attn_mask": "float"}, {"key_padding_mask": True, "is_causal": True}])
def test_op_meta_tensors_give_the_output_shape(masks):
    """Meta tensors (shape inference, models built on the meta device) get the output's shape
    and dtype, as torch's SDPA gives them (they go to torch; autocast has no meta device)."""
    q, k, v = (torch.randn(2, 4, length, 24, device="meta", dtype=torch.float16) for length in (29, 41, 41))
    kwargs = dict(masks)
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = torch.randn(29, 41, device="meta", dtype=torch.float16)
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = torch.zeros(2, 41, device="meta", dtype=torch.bool)
    out = scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == torch.float16
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this call: tensors on meta"):
        scaled_dot_product_attention(q, k, v, **kwargs, backend="triton")


@pytest.mark.parametrize("batch,heads", [(7000, 10), (65535, 1), (65536, 1), (131071, 1)],
                         ids=["B7000-H10", "B65535", "B65536", "B131071"])
def test_op_grids_stay_within_cuda_limits(monkeypatch, batch, heads):
    """CUDA caps a grid's y and z at 65535 (x at 2**31 - 1). The attention kernels' grids are
    (blocks, heads, batch): any number of (batch, head) pairs runs, and a batch above 65535
    (window attention's windows x images, vmap's examples x batch) takes one launch per 65535
    sequences. The list builder and the dropout mask fit at any size. The kernels are replaced
    by recorders (the interpreter has no limit to hit, and 70000 programs would take long); what
    the launches on slices compute is test_launches_in_chunks_of_the_batch_give_the_same_bits."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels
    import fasttransformer.kernels.block_lists as block_list_kernels

    assert forward_kernels.MAX_GRID_YZ == 65535
    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids.setdefault(self.name, []).append(tuple(grid))
            return lambda *args, **kwargs: None

    for module in (forward_kernels, backward_kernels, block_list_kernels):
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                monkeypatch.setattr(module, name, Recorder(name))
    seqlen_q, seqlen_k = 3, 5
    q, k, v = (torch.randn(batch, heads, length, 16, requires_grad=True) for length in (seqlen_q, seqlen_k, seqlen_k))
    mask = torch.rand(batch, heads, seqlen_q, seqlen_k) < 0.5
    padding = torch.rand(batch, seqlen_k) < 0.3
    forward_kernels.dropout_keep_mask(torch.zeros(1, dtype=torch.int64), (batch, heads, seqlen_q, seqlen_k), 0.1)
    block_list_kernels.build_block_lists(mask, padding, mask.shape, [(16, 16, False)])
    dropout_p = 0.1 if batch <= 65535 else 0.0  # dropout needs one launch (test_op_refuses_sizes_...)
    out = scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout_p, key_padding_mask=padding, backend="triton")
    out.backward(torch.randn_like(out))
    assert set(grids) == {"tile_classes_kernel", "block_lists_kernel", "dropout_mask_kernel",
                          "attention_forward_kernel", "attention_delta_kernel", "attention_backward_dkdv_kernel",
                          "attention_backward_dq_kernel"}
    for name, launches in grids.items():
        for grid in launches:
            assert len(grid) <= 3 and grid[0] < 2 ** 31 and all(size <= 65535 for size in grid[1:]), (name, grid)
    chunks = [min(65535, batch - start) for start in range(0, batch, 65535)]
    for name in ("attention_forward_kernel", "attention_delta_kernel", "attention_backward_dkdv_kernel",
                 "attention_backward_dq_kernel"):
        assert [grid[2] for grid in grids[name]] == chunks, name


@pytest.mark.parametrize("case", ["heads", "dropout", "rows"])
def test_op_refuses_sizes_the_launches_cannot_hold(case):
    """Query heads above 65535 (the grid's y axis), dropout with a batch above 65535 (its draws
    are keyed by the index within a launch, and such a batch takes several), and 2**31 rows (B *
    Hq * Lq: the logsumexp's int32 offsets) are refused before any launch, naming the sizes:
    backend="triton" raises the reason (the one that sends "auto" to torch on CUDA), and the
    custom op and the kernels' functions raise too (an exported graph holds the op for sizes it
    was not traced at). The inputs are expanded views."""
    batch, heads, seqlen_q, dropout_p, message = {
        "heads": (2, 70000, 3, 0.0, "heads 70000 > 65535"),
        "dropout": (65536, 1, 3, 0.1, "dropout with batch 65536 > 65535"),
        "rows": (2 ** 16, 2 ** 11, 2 ** 5, 0.0, r"batch \* heads \* Lq = 4294967296 >= 2\*\*31"),
    }[case]
    q, k, v = (torch.randn(1, 1, length, 16).expand(batch, heads, length, 16) for length in (seqlen_q, 5, 5))
    with pytest.raises(RuntimeError, match=message):
        scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, backend="triton")
    seed = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        torch.ops.fasttransformer.attention_forward(q, k, v, None, None, 0.25, None, None, dropout_p, seed)
    out = torch.randn(1, 1, seqlen_q, 16).expand(q.shape)
    with pytest.raises(ValueError, match=message):
        attention_backward(out, q, k, v, out, torch.zeros(1, 1, seqlen_q).expand(q.shape[:3]), dropout_p=dropout_p,
                           seed=seed)


MASK_PER_BATCH = {  # the per-sequence tensors of a launch, each sliced by the batch chunks
    "bool+padding": {"attn_mask": (5, 2, 37, 50), "key_padding_mask": True},
    "float-grad+causal": {"attn_mask": (5, 1, 37, 50), "causal_offset": 13},
    "float-shared-grad+window": {"attn_mask": (1, 2, 37, 50), "causal_offset": 13, "window": (9, 0)},
    "split-keys+padding": {"key_padding_mask": True, "num_splits": 3},
    "gqa-decode+padding": {"key_padding_mask": True, "seqlen_q": 1},
}


@pytest.mark.parametrize("case", list(MASK_PER_BATCH))
def test_launches_in_chunks_of_the_batch_give_the_same_bits(monkeypatch, case):
    """A batch above MAX_GRID_YZ (65535: CUDA's cap on the grid's z) takes one launch per chunk of
    sequences, each on slices of every per-sequence tensor (the inputs, outputs, logsumexp,
    delta, masks, tile lists, split partials, a float mask's gradient, the JVP kernel's tangents
    and its mask's). With the cap set to 2, a batch of 5 takes 3 launches of each kernel, and
    gives the one launch's bits."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels
    import fasttransformer.kernels.attention_jvp as jvp_kernels

    options = dict(MASK_PER_BATCH[case])
    seqlen_q, num_splits = options.pop("seqlen_q", 37), options.pop("num_splits", None)
    batch, heads, kv_heads, seqlen_k = 5, 2, 1 if seqlen_q == 1 else 2, 50  # heads <= the cap of 2 below
    q = torch.randn(batch, heads, seqlen_q, 16, device=DEVICE)
    k, v = (torch.randn(batch, kv_heads, seqlen_k, 16, device=DEVICE) for _ in range(2))
    grad_out = torch.randn_like(q)
    kwargs = {}
    for name, value in options.items():
        if name == "key_padding_mask":
            kwargs[name] = torch.rand(batch, seqlen_k, device=DEVICE) < 0.3
            kwargs[name][1] = True  # a sequence that sees no key
        elif name == "attn_mask":
            shape = value[:2] + (seqlen_q, seqlen_k)
            kwargs[name] = (torch.rand(shape, device=DEVICE) < 0.7 if case.startswith("bool")
                            else torch.randn(shape, device=DEVICE))
        else:
            kwargs[name] = value
    bias_grad = "grad" in case
    if kv_heads != heads:  # the kernels' functions take K and V of the key heads (GQA)
        assert "attn_mask" not in kwargs

    tangents = [torch.randn_like(t) for t in (q, k, v)]
    float_mask = kwargs.get("attn_mask") is not None and kwargs["attn_mask"].dtype != torch.bool
    tangent_mask = torch.randn_like(kwargs["attn_mask"]) if float_mask else None

    def run():
        with poisoned_allocations(DEVICE):
            out, lse = attention_forward(q, k, v, num_splits=num_splits, **kwargs)
            grads = attention_backward(grad_out, q, k, v, out, lse, bias_grad=bias_grad, **kwargs)
            tangent = jvp_kernels.attention_jvp(q, k, v, out, lse, *tangents, tangent_mask=tangent_mask, **kwargs)
        return out, lse, *grads, tangent

    whole = run()
    launches = [record_launches(monkeypatch, module, name) for module, name in (
        (forward_kernels, "attention_forward_kernel"), (backward_kernels, "attention_delta_kernel"),
        (backward_kernels, "attention_backward_dkdv_kernel"), (backward_kernels, "attention_backward_dq_kernel"),
        (jvp_kernels, "attention_jvp_kernel"))]
    if num_splits:
        launches.append(record_launches(monkeypatch, forward_kernels, "attention_combine_kernel"))
    monkeypatch.setattr(forward_kernels, "MAX_GRID_YZ", 2)
    chunked = run()
    for recorded in launches:
        assert [grid[2] for grid in recorded] == [2, 2, 1]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias", "tangent"), chunked, whole):
        if name == "dbias" and not bias_grad:
            assert a is None and b is None
        elif name == "dbias" and kwargs["attn_mask"].shape[0] == 1:  # summed over the chunks: float32 order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert a.shape == b.shape and torch.equal(a, b), name


SEQUENCE_STRIDE = 2 ** 30 + 2 ** 20  # elements: fits in int32 (Triton passes it as one), and 2x it does not


class FarApart:
    """Places (3, ...) tensors with their sequences SEQUENCE_STRIDE elements apart, so that
    sequence 2 starts past 2**31 elements, in one buffer per dtype (only the pages written are
    resident). Sequence 0 starts 2**31 elements in: where an offset computed in int32 wraps,
    it lands inside the buffer, on poison (NaN, or the negated bool mask), and the test fails
    instead of the process."""

    def __init__(self, device):
        self.device, self.buffers, self.used = device, {}, {}

    def __call__(self, values):
        dtype = values.dtype
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(2 ** 31 + 2 * SEQUENCE_STRIDE + 2 ** 20, dtype=dtype, device=self.device)
            self.used[dtype] = 0
        start = 2 ** 31 + self.used[dtype]
        self.used[dtype] += values[0].numel()
        strides = (SEQUENCE_STRIDE, *values[0].contiguous().stride())
        placed = self.buffers[dtype].as_strided(values.shape, strides, start)
        placed.copy_(values)
        wrapped = start + 2 * SEQUENCE_STRIDE - 2 ** 32
        poison = ~values[2] if dtype == torch.bool else torch.full_like(values[2], float("nan"))
        self.buffers[dtype].as_strided(values.shape[1:], strides[1:], wrapped).copy_(poison)
        return placed


def test_int64_offsets_only_past_int32():
    """The int64-offset kernels run only for a tensor in a storage of 2**31 elements or more (the
    usual kernels have fewer registers); the storage, not the view, decides."""
    from fasttransformer.kernels.attention_forward import int64_offsets

    q, k = torch.randn(4, 8, 33, 64), torch.randn(4, 2, 700, 64).transpose(1, 2)
    assert not int64_offsets(q, k, None, torch.ones(4, 1, 1, 700, dtype=torch.bool).expand(4, 8, 33, 700))
    assert not int64_offsets(torch.empty(2 ** 31 - 1, dtype=torch.bool))  # only written pages are resident: none
    large = torch.empty(2 ** 31, dtype=torch.uint8)
    assert int64_offsets(q, large.view(torch.bool)[:10])
    assert int64_offsets(large.view(torch.float16)[:10]) is False  # 2**30 float16 elements
    assert int64_offsets(None, torch.empty(2 ** 31, dtype=torch.float16)[:4].view(1, 1, 2, 2))


@pytest.mark.parametrize("masks", ["causal+bool+padding", "float"])
def test_op_offsets_past_int32(masks, monkeypatch):
    """Inputs of more than 2**31 elements (a KV cache of B = 64, Hk = 8, Lk = 32k, D = 128) whose
    strides fit in int32: the kernels' batch and head offsets (batch * stride_kb) are then
    computed in int64 (INT64_OFFSETS). In int32 they wrapped, read out of bounds, and gave NaN
    here (a segfault when the buffer started at sequence 0). q, k, v and every mask are read in
    place through their strides (the backward copies q, k and v, whose gradients it
    allocates, but not the masks)."""
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, dtype = 3, 3, 1, 5, 40, 16, torch.float16
    place = FarApart(DEVICE)
    q, k, v = (place(torch.randn(batch, h, length, head_dim, dtype=dtype, device=DEVICE))
               for h, length in ((heads, seqlen_q), (kv_heads, seqlen_k), (kv_heads, seqlen_k)))
    kwargs, allowed, bias = {"enable_gqa": True}, torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool), None
    if "causal" in masks:
        kwargs["is_causal"] = True
        allowed &= causal_bool(seqlen_q, seqlen_k, 0)
    if "bool" in masks:
        mask = torch.rand(batch, 1, seqlen_q, seqlen_k) < 0.7
        kwargs["attn_mask"] = place(mask.to(DEVICE))
        allowed &= mask
    if "padding" in masks:
        padding = torch.rand(batch, seqlen_k) < 0.3
        padding[:, 0] = False
        kwargs["key_padding_mask"] = place(padding.to(DEVICE))
        allowed &= ~padding[:, None, None, :]
    if "float" in masks:
        bias = torch.randn(batch, heads, seqlen_q, seqlen_k, dtype=dtype, device=DEVICE)
        kwargs["attn_mask"] = place(bias).requires_grad_()
    leaves = [t.requires_grad_() for t in (q, k, v)]
    from fasttransformer.kernels import attention_forward as forward_module, configs
    # 3 query heads per key head (4 rows a query, one spare), 5 queries each: packed as rows
    # (gqa_row_packing), but not with the per-head bias
    launches = record_launches(monkeypatch, forward_module, "attention_forward_kernel", ("PACK_GQA", "INT64_OFFSETS"))
    lookups = []  # the launchers ask for the int64 variants' configs (configs.INT64_OVERRIDES)
    for name in ("forward_config", "backward_configs"):
        monkeypatch.setattr(configs, name, functools.partial(
            lambda lookup, *args, **kw: lookups.append(kw.get("int64")) or lookup(*args, **kw), getattr(configs, name)))
    with poisoned_allocations(DEVICE):
        out = scaled_dot_product_attention(*leaves, **kwargs, backend="triton")
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
    assert lookups == [True, True] and [arguments for _, arguments in launches] == [(masks != "float", True)]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, [leaf.grad for leaf in leaves])
    if bias is not None:
        assert_bias_grad_matches_reference(q, k, v, allowed, bias, grad_out, kwargs["attn_mask"].grad)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_op_eager_calls_skip_the_custom_op(monkeypatch, grad):
    """Eager calls take an autograd.Function around the same launchers (the custom op's dispatch is
    host time a decoding step cannot spare); torch.compile and dispatch modes take the custom op.
    Both give the same bits, forward and gradients (a float mask's too), with dropout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fasttransformer.ops import attention as attention_op

    q, k, v, kwargs, _, _ = op_case("float+padding", torch.float32)
    assert attention_op._eager(q, k, v, kwargs["attn_mask"]) and attention_op._eager(q, k, v, None)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert not attention_op._eager(q, k, v, None)

    def run(dropout_p):
        leaves = [tensor.detach().clone().requires_grad_(grad) for tensor in (q, k, v, kwargs["attn_mask"])]
        torch.manual_seed(7)
        out = scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3],
                                           key_padding_mask=kwargs["key_padding_mask"], enable_gqa=True,
                                           dropout_p=dropout_p, backend="triton")
        if grad:
            out.backward(torch.ones_like(out))
        return [out.detach()] + [leaf.grad for leaf in leaves if grad]

    for dropout_p in (0.0, 0.3):
        eager = run(dropout_p)
        monkeypatch.setattr(attention_op, "_eager", lambda *tensors: False)
        through_op = run(dropout_p)
        monkeypatch.undo()
        assert len(eager) == (5 if grad else 1)
        assert all(torch.equal(a, b) for a, b in zip(eager, through_op))
    with FakeTensorMode() as mode:  # the fake implementation: shapes only, no launch
        fake = scaled_dot_product_attention(*(mode.from_tensor(t) for t in (q, k, v)), enable_gqa=True,
                                            backend="triton")
    assert fake.shape == q.shape


@pytest.mark.parametrize("through_op", [False, True], ids=["eager", "custom-op"])
def test_op_second_derivative_raises(monkeypatch, through_op):
    """The kernels' backward is not differentiable: a second derivative through it raises on
    both paths, never a silent zero."""
    from fasttransformer.ops import attention as attention_op

    if through_op:
        monkeypatch.setattr(attention_op, "_eager", lambda *tensors: False)
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = scaled_dot_product_attention(q, k, v, backend="triton")
    (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    second = grad_q.pow(2).sum() + q.sum()  # q is reached another way too: a dropped term would pass silently
    with pytest.raises(RuntimeError, match="no second derivative|no autograd formula"):
        torch.autograd.grad(second, q, retain_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative|no autograd formula"):
        second.backward()


@pytest.mark.parametrize("name", ["none", "bool+is_causal+padding", "float+padding", "window_pair+causal"])
def test_op_torch_func_grad_and_vjp_give_autograds_bits(name):
    """torch.func.vjp and grad through the kernels give autograd's bits, a float mask's gradient
    too. (torch's autograd.Function for a custom op lacks the setup_context torch.func needs,
    pytorch/pytorch#168393: through it, torch.func.grad raised; the op brings its own.)"""
    q, k, v, kwargs, _, _ = op_case(name, torch.float32)
    attn_mask = kwargs.pop("attn_mask", None)
    inputs = (q, k, v, attn_mask) if attn_mask is not None and attn_mask.is_floating_point() else (q, k, v)

    def attend(*tensors):
        mask = tensors[3] if len(tensors) == 4 else attn_mask
        return scaled_dot_product_attention(*tensors[:3], attn_mask=mask, **kwargs, backend="triton")

    grad_out = torch.randn(q.shape, device=DEVICE)
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    expected = attend(*leaves)
    expected.backward(grad_out)
    out, pullback = torch.func.vjp(attend, *inputs)
    argnums = tuple(range(len(inputs)))
    for grads in (pullback(grad_out), torch.func.grad(lambda *t: (attend(*t) * grad_out).sum(), argnums)(*inputs)):
        assert len(grads) == len(leaves)
        assert all(torch.equal(grad, leaf.grad) for grad, leaf in zip(grads, leaves))
    assert torch.equal(out, expected)


def per_example(args, in_dims, index):
    return [arg.select(dim, index) if dim is not None else arg for arg, dim in zip(args, in_dims)]


VMAP_CASES = {  # masks, and vmap's in_dims of (query, key, value, attn_mask, key_padding_mask)
    "qkv-Dv40": ({"value_head_dim": 40}, (0, 0, 0, None, None)),  # the value's head dim unlike the query's
    "query-only-dim-2+causal": ({"is_causal": True}, (2, None, None, None, None)),
    "bool-and-padding-batched": ({"attn_mask": "bool", "key_padding_mask": True}, (0, 0, 0, 0, 1)),
    "float-per-sequence+padding+window": ({"attn_mask": "float", "key_padding_mask": True, "window_size": 9},
                                          (0, 0, 0, None, None)),
    "float-shared-batched-k": ({"attn_mask": "float-shared"}, (None, 1, None, None, None)),
}


@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_op_vmap_and_per_example_gradients_launch_once(monkeypatch, name):
    """torch.func.vmap, and vmap(grad) for per-example gradients (a float mask's too), fold the
    examples into the batch: one launch each way (torch's fallback would launch per example)
    and, within float32 rounding, the results of a loop over the examples."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels

    masks, in_dims = VMAP_CASES[name]
    examples, batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim = 3, 2, 2, 1, 21, 37, 24
    head_dim_v = masks.get("value_head_dim", head_dim)
    shapes = [(batch, heads, seqlen_q, head_dim), (batch, kv_heads, seqlen_k, head_dim),
              (batch, kv_heads, seqlen_k, head_dim_v), None, (batch, seqlen_k)]
    if masks.get("attn_mask") == "bool":
        shapes[3] = (seqlen_q, seqlen_k)
    elif masks.get("attn_mask") == "float":
        shapes[3] = (batch, 1, seqlen_q, seqlen_k)
    elif masks.get("attn_mask") == "float-shared":
        shapes[3] = (seqlen_q, seqlen_k)
    args = []
    for index, (shape, dim) in enumerate(zip(shapes, in_dims)):
        if shape is None or (index == 4 and not masks.get("key_padding_mask")):
            args.append(None)
            continue
        if dim is not None:
            shape = (*shape[:dim], examples, *shape[dim:])
        if index == 4:
            args.append((torch.rand(shape) < 0.3).to(DEVICE))
        elif index == 3 and masks["attn_mask"] == "bool":
            args.append((torch.rand(shape) < 0.8).to(DEVICE))
        else:
            args.append(torch.randn(shape, device=DEVICE))
    float_mask = args[3] is not None and args[3].is_floating_point()
    kwargs = {key: value for key, value in masks.items() if key in ("is_causal", "window_size")}

    def attend(q, k, v, attn_mask, key_padding_mask):
        return scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask=key_padding_mask, enable_gqa=True,
                                            **kwargs, backend="triton")

    grad_out = torch.randn(examples, batch, heads, seqlen_q, head_dim_v, device=DEVICE)
    argnums = (0, 1, 2, 3) if float_mask else (0, 1, 2)

    def gradients(q, k, v, attn_mask, key_padding_mask, grad_out):
        loss = lambda *t: (attend(*t) * grad_out).sum()  # noqa: E731
        return torch.func.grad(loss, argnums)(q, k, v, attn_mask, key_padding_mask)

    forwards = record_launches(monkeypatch, forward_kernels, "attention_forward_kernel")
    backwards = record_launches(monkeypatch, backward_kernels, "attention_backward_dkdv_kernel")
    out = torch.func.vmap(attend, in_dims)(*args)
    grads = torch.func.vmap(gradients, (*in_dims, 0))(*args, grad_out)
    assert (len(forwards), len(backwards)) == (2, 1)  # vmap's forward, vmap(grad)'s forward and backward
    expected = torch.stack([attend(*per_example(args, in_dims, index)) for index in range(examples)])
    torch.testing.assert_close(out, expected)
    for index in range(examples):
        expected_grads = gradients(*per_example(args, in_dims, index), grad_out[index])
        for label, grad, expected_grad in zip(("dq", "dk", "dv", "dbias"), grads, expected_grads):
            torch.testing.assert_close(grad[index], expected_grad, msg=lambda text: f"{label}, example {index}: {text}")


def test_op_vmap_past_the_grid_limit_folds_into_chunked_launches(monkeypatch):
    """Where the examples' folded batch passes CUDA's grid limit (65535 sequences, set to 5 here),
    vmap still folds them into one call of the op, which launches each kernel once per chunk
    of sequences; the gradients equal the per-example ones bit for bit."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels

    monkeypatch.setattr(forward_kernels, "MAX_GRID_YZ", 5)  # 3 examples x batch 2 = 6 > 5: launches of 5 and 1
    q, k, v = (torch.randn(3, 2, 2, length, 16, device=DEVICE) for length in (9, 12, 12))
    forwards = record_launches(monkeypatch, forward_kernels, "attention_forward_kernel")
    backwards = record_launches(monkeypatch, backward_kernels, "attention_backward_dkdv_kernel")
    loss = lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton").sum()  # noqa: E731
    grads = torch.func.vmap(torch.func.grad(loss, (0, 1, 2)))(q, k, v)
    assert [grid[2] for grid in forwards] == [5, 1] and [grid[2] for grid in backwards] == [5, 1]
    for index in range(3):
        expected = torch.func.grad(loss, (0, 1, 2))(q[index], k[index], v[index])
        assert all(torch.equal(grad[index], want) for grad, want in zip(grads, expected))


def test_op_vmap_dropout_follows_vmaps_randomness():
    """Under vmap the dropout seed is drawn as vmap's randomness says: "error" (its default)
    raises, "same" gives every example the eager call's mask, "different" draws one per example,
    and each example's backward regenerates its own (out = A v and dv = A^T dout for the same
    dropped A, so <dv, v> = <dout, out>)."""
    q, k, v = (torch.randn(1, 2, length, 16, device=DEVICE) for length in (37, 50, 50))
    stacked = [tensor.expand(3, *tensor.shape) for tensor in (q, k, v)]
    grad_out = torch.randn(3, *q.shape, device=DEVICE)

    def attend(q, k, v):
        return scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="triton")

    def out_and_dv(q, k, v, grad_out):
        out, pullback = torch.func.vjp(attend, q, k, v)
        return out, pullback(grad_out)[2]

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(attend)(*stacked)
    torch.manual_seed(11)
    same = torch.func.vmap(attend, randomness="same")(*stacked)
    torch.manual_seed(11)
    eager = attend(q, k, v)
    assert all(torch.equal(example, eager) for example in same)
    different, dv = torch.func.vmap(out_and_dv, randomness="different")(*stacked, grad_out)
    assert not torch.equal(different[0], different[1]) and not torch.equal(different[1], different[2])
    for index in range(3):
        inner = (dv[index] * v).sum().item()
        torch.testing.assert_close(inner, (grad_out[index] * different[index]).sum().item(), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's CPU SDPA under vmap
def test_op_torch_func_jacrev_matches_the_reference():
    """jacrev (vmap over the backward, with q, k, v unbatched): the Jacobian against the float64
    reference's, within 3x torch's own float32 error."""
    q, k, v = (torch.randn(1, 1, length, 16, device=DEVICE) for length in (3, 7, 7))
    mask = (torch.rand(3, 7) < 0.7).to(DEVICE)
    jacobians = {}
    for label, backend, cast in (("triton", "triton", torch.float32), ("torch", "torch", torch.float32),
                                 ("reference", None, torch.float64)):
        def attend(q, k, v):
            if backend is None:
                return reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
            return scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, backend=backend)
        jacobians[label] = torch.func.jacrev(attend, (0, 1, 2))(*(tensor.to(cast) for tensor in (q, k, v)))
    for index, label in enumerate(("dout/dq", "dout/dk", "dout/dv")):
        assert_within_torch_error(jacobians["triton"][index], jacobians["reference"][index],
                                  jacobians["torch"][index], 3.0, label)


def test_op_torch_compile_over_torch_func(monkeypatch):
    """torch.compile over vmap runs the kernels (the custom op's batching rule: one launch). Over
    grad the custom op's autograd hits pytorch/pytorch#168393 inside the compiled region:
    backend="triton" says so, and "auto" gives torch's SDPA there (its gradients, close to the
    kernels' that torch.func.grad gets outside torch.compile)."""
    import fasttransformer.kernels.attention_forward as forward_kernels

    q, k, v = (torch.randn(2, 2, length, 16, device=DEVICE) for length in (9, 14, 14))
    stacked = [tensor.expand(3, *tensor.shape) + torch.randn(3, *tensor.shape, device=DEVICE) for tensor in (q, k, v)]
    launches = record_launches(monkeypatch, forward_kernels, "attention_forward_kernel")
    attend = torch.func.vmap(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton"))
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)(*stacked)
    assert len(launches) == 1
    torch.testing.assert_close(compiled, attend(*stacked))

    def loss(backend):
        return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend).pow(2).sum()

    torch._dynamo.reset()
    with pytest.raises(Exception, match="backend='triton' cannot run this call: torch.compile over torch.func"):
        torch.compile(torch.func.grad(loss("triton")), backend="aot_eager", fullgraph=True)(q, k, v)
    compiled = torch.compile(torch.func.grad(loss("auto"), (0, 1, 2)), backend="aot_eager", fullgraph=True)(q, k, v)
    eager = torch.func.grad(loss("auto"), (0, 1, 2))(q, k, v)  # the kernels on CUDA, torch on the CPU
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
def test_op_torch_func_second_derivatives_raise():
    """The kernels have first derivatives only, reverse (the backward kernels) and forward (the
    JVP kernel): every composition of two raises."""
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(3))
    loss = lambda q: scaled_dot_product_attention(q, k, v, backend="triton").pow(2).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.grad(lambda q: torch.func.grad(loss)(q).pow(2).sum())(q)
    with pytest.raises(RuntimeError, match="no second derivative"):  # forward over reverse: hessian
        torch.func.jvp(torch.func.grad(loss), (q,), (torch.randn_like(q),))
    with pytest.raises(RuntimeError, match="no derivative of their forward-mode tangent"):  # reverse over forward
        torch.func.grad(lambda q: torch.func.jvp(loss, (q,), (torch.randn_like(q),))[1])(q)
    tangent = torch.func.jvp(loss, (q.clone().requires_grad_(),), (torch.randn_like(q),))[1]
    with pytest.raises(RuntimeError, match="no derivative of their forward-mode tangent"):
        tangent.backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("name", ["padding+window_int", "float+padding"])
def test_op_forward_mode_with_dropout_runs_the_jvp_kernel(monkeypatch, name):
    """Forward mode with dropout (torch.func.jvp, forward_ad's dual tensors) through the op: the
    forward and the JVP kernel take one seed, so the tangent is the derivative of the output
    returned (its dropout mask regenerated), under the accuracy rule; no torch SDPA. jacfwd
    launches once per tangent (the draws are keyed by a sequence's index in the launch, which
    folding would move) and agrees with jacrev."""
    import torch.autograd.forward_ad as forward_ad
    from fasttransformer.kernels import attention_jvp as jvp_module
    from fasttransformer.ops import attention as ops_module

    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(ops_module, "_dropout_seed", lambda device: seed)  # the draw, known to the test
    monkeypatch.setattr(ops_module, "_torch_attention", lambda *args: pytest.fail("torch's SDPA was called"))
    launches = record_launches(monkeypatch, jvp_module, "attention_jvp_kernel")
    dropout_p = 0.25
    q, k, v, kwargs, allowed, bias = op_case(name, torch.float32, seqlen_q=21, seqlen_k=33, head_dim=16)
    primals = [q, k, v] + ([kwargs.pop("attn_mask")] if bias is not None else [])
    tangents = [torch.randn_like(tensor) for tensor in primals]

    def attend(q, k, v, bias=None):
        return scaled_dot_product_attention(q, k, v, **kwargs, **({"attn_mask": bias} if bias is not None else {}),
                                            dropout_p=dropout_p, backend="triton")

    with poisoned_allocations(DEVICE):
        out, tangent = torch.func.jvp(attend, tuple(primals), tuple(tangents))
    assert len(launches) == 1
    keep = dropout_keep_mask(seed, allowed.shape, dropout_p)
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent, keep, dropout_p)
    assert_within_torch_error(out, reference_attention(q.double(), k.double(), v.double(), allowed, bias, keep,
                                                       dropout_p), reference_attention(q, k, v, allowed, bias, keep,
                                                                                       dropout_p))
    with forward_ad.dual_level():
        dual = attend(*(forward_ad.make_dual(primal, t) for primal, t in zip(primals, tangents)))
        assert torch.equal(forward_ad.unpack_dual(dual).primal, out)
        assert torch.equal(forward_ad.unpack_dual(dual).tangent, tangent)

    small = [tensor[:1, :2, :3].detach() for tensor in (q, k, v)]
    def attend_small(q):
        return scaled_dot_product_attention(q, *small[1:], dropout_p=dropout_p, enable_gqa=True, backend="triton")
    launches.clear()
    forward = torch.func.jacfwd(attend_small)(small[0])
    assert len(launches) == small[0].numel()  # one per tangent of the basis
    torch.testing.assert_close(forward, torch.func.jacrev(attend_small)(small[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["none", "lower_right", "padding+window_int", "bool+is_causal+padding",
                                  "float+padding"])
def test_op_forward_mode_runs_the_jvp_kernel(monkeypatch, name, dtype):
    """torch.func.jvp and torch.autograd.forward_ad's dual tensors through the op run the JVP
    kernel (one launch, no torch SDPA), within the accuracy rule of the float64 reference's
    tangent (a float mask's tangent too); the primal output keeps its reverse-mode gradient
    (sCM-style training: the loss takes the output, the tangent is detached); jacfwd (the
    JVP op's batching rule: one launch for every tangent) is jacrev."""
    import torch.autograd.forward_ad as forward_ad
    from fasttransformer.kernels import attention_jvp as jvp_module
    from fasttransformer.ops import attention as ops_module

    launches = record_launches(monkeypatch, jvp_module, "attention_jvp_kernel")
    monkeypatch.setattr(ops_module, "_torch_attention", lambda *args: pytest.fail("torch's SDPA was called"))
    q, k, v, kwargs, allowed, bias = op_case(name, dtype, seqlen_q=21, seqlen_k=33, head_dim=16)
    primals = [q, k, v] + ([kwargs.pop("attn_mask")] if bias is not None else [])
    tangents = [torch.randn_like(tensor) for tensor in primals]

    def attend(q, k, v, bias=None):
        return scaled_dot_product_attention(q, k, v, **kwargs, **({"attn_mask": bias} if bias is not None else {}),
                                            backend="triton")

    with poisoned_allocations(DEVICE):
        out, tangent = torch.func.jvp(attend, tuple(primals), tuple(tangents))
    assert len(launches) == 1
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent)
    assert torch.equal(out, attend(*primals))
    if "padding" in name:  # the second sequence is all padding: zeros, and so are their tangents
        assert (out[1] == 0).all() and (tangent[1] == 0).all()
    with forward_ad.dual_level():
        dual = attend(*(forward_ad.make_dual(primal, t) for primal, t in zip(primals, tangents)))
        assert torch.equal(forward_ad.unpack_dual(dual).tangent, tangent)
    leaves = [tensor.detach().requires_grad_() for tensor in primals]
    out, tangent = torch.func.jvp(attend, tuple(leaves), tuple(tangents))
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    plain = [tensor.detach().requires_grad_() for tensor in primals]
    want = torch.autograd.grad(attend(*plain), plain, grad_out)
    for leaf, grad in zip(leaves, want):
        assert torch.equal(leaf.grad, grad)
    if name == "bool+is_causal+padding" and dtype == torch.float32:
        small = [tensor[:1, :, :3].detach() for tensor in (q, k, v)]
        small_kwargs = {"attn_mask": kwargs["attn_mask"][:3, :3], "is_causal": True, "enable_gqa": True}
        def attend_small(q, k, v):
            return scaled_dot_product_attention(q, k, v, **small_kwargs, backend="triton")
        launches.clear()
        forward = torch.func.jacfwd(attend_small, (0, 1, 2))(*small)
        assert len(launches) == 1  # folded: every tangent of the basis in one launch
        for got, want in zip(forward, torch.func.jacrev(attend_small, (0, 1, 2))(*small)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("backend", ["auto", "torch"])  # jacrev on the CPU: torch's flash backward under vmap
@pytest.mark.parametrize("name", ["none", "lower_right", "padding+window_int", "bool+is_causal+padding",
                                  "float+padding"])
def test_op_forward_mode_derivatives_match_the_reference(name, backend):
    """torch.func.jvp (tangents for q, k, v and a float mask) gives the float64 reference's
    output and tangent, fully masked rows included (zeros, zero tangent), through torch's math
    SDPA: torch's other kernels, the CPU's flash among them, have no forward-mode derivative.
    torch.autograd.forward_ad's dual tensors give the same, and jacfwd is jacrev."""
    import torch.autograd.forward_ad as forward_ad

    q, k, v, kwargs, allowed, bias = op_case(name, torch.float64, batch=2, heads=4, kv_heads=2, seqlen_q=9,
                                             seqlen_k=13, head_dim=8)
    primals = [q, k, v] + ([kwargs.pop("attn_mask")] if bias is not None else [])
    tangents = [torch.randn_like(tensor) for tensor in primals]

    def attend(q, k, v, bias=None):
        return scaled_dot_product_attention(q, k, v, **kwargs, **({"attn_mask": bias} if bias is not None else {}),
                                            backend=backend)

    def attend_reference(q, k, v, bias=None):
        return reference_attention(q, k, v, allowed, bias)

    out, tangent = torch.func.jvp(attend, tuple(primals), tuple(tangents))
    want_out, want_tangent = torch.func.jvp(attend_reference, tuple(primals), tuple(tangents))
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, want_tangent, rtol=1e-10, atol=1e-12)
    assert tangent.abs().sum() > 0
    if "padding" in name:  # the second sequence is all padding: zeros, and so are their tangents
        assert (out[1] == 0).all() and (tangent[1] == 0).all()
    with forward_ad.dual_level():
        dual = attend(*(forward_ad.make_dual(primal, t) for primal, t in zip(primals, tangents)))
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, want_tangent, rtol=1e-10, atol=1e-12)
    if name == "bool+is_causal+padding":
        small = [tensor[:1, :, :3] for tensor in (q, k, v)]
        small_kwargs = {"attn_mask": kwargs["attn_mask"][:3, :3], "is_causal": True, "enable_gqa": True}
        def attend_small(q, k, v):
            return scaled_dot_product_attention(q, k, v, **small_kwargs, backend=backend)
        forward, reverse = (jacobian(attend_small, (0, 1, 2))(*small)
                            for jacobian in (torch.func.jacfwd, torch.func.jacrev))
        for got, want in zip(forward, reverse):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the validation's shape checks, traced as constants
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")  # a FutureWarning in torch 2.15
def test_op_jit_trace_records_the_custom_op():
    """torch.jit.trace records the custom op (the eager path's kernel launches would leave the
    graph without attention), and the trace computes the attention of new inputs."""
    q, k, v, kwargs, _, _ = op_case("bool+is_causal+padding", torch.float32)

    def attend(q, k, v):
        return scaled_dot_product_attention(q, k, v, **kwargs, backend="triton") * 2

    traced = torch.jit.trace(attend, (q, k, v), check_trace=False)
    assert "fasttransformer::attention_forward" in str(traced.graph)
    fresh = [torch.randn_like(tensor) for tensor in (q, k, v)]
    assert torch.equal(traced(*fresh), attend(*fresh))


def test_op_opcheck():
    q, k, v, kwargs, _, _ = op_case("bool+is_causal+padding", torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.fasttransformer.attention_forward.default,
                          (q, k, v, kwargs["attn_mask"], kwargs["key_padding_mask"], 0.2, 0, [3, 1]))
    seed = torch.tensor([1234567], dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(torch.ops.fasttransformer.attention_forward.default,
                          (q, k, v, kwargs["attn_mask"], kwargs["key_padding_mask"], 0.2, 0, [3, 1], 0.25, seed))
    # The backward with a transposed float mask: its gradient's strides are the fake's too (a
    # compiled graph trusts the fake's; empty_like kept the mask's transposed strides).
    bias = torch.randn(q.shape[2], k.shape[2], device=DEVICE).t().contiguous().t()
    grad_out, out, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(q.shape[:3], device=DEVICE)
    torch.library.opcheck(torch.ops.fasttransformer.attention_backward.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out, lse, bias, None, 0.2, None, None, True))
    # A value head dim unlike the query's, the query in (B, L, H, D) memory: the output keeps its
    # layout, in the kernels and in the fake.
    q_t = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    v_wide = torch.randn(*v.shape[:3], 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fasttransformer.attention_forward.default,
                          (q_t, k, v_wide, None, kwargs["key_padding_mask"], 0.2, 0))


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

MASK_LAYOUTS = {  # attn_mask layouts, as shapes over the names, plus two views
    "Lk": ("Lk",), "Lq,Lk": ("Lq", "Lk"), "H,Lq,Lk": ("H", "Lq", "Lk"), "B,1,Lq,Lk": ("B", 1, "Lq", "Lk"),
    "B,H,Lq,Lk": ("B", "H", "Lq", "Lk"), "B,1,1,Lk": ("B", 1, 1, "Lk"), "1,H,1,Lk": (1, "H", 1, "Lk"),
    "Lq,1": ("Lq", 1), "expanded": ("Lq", "Lk"), "transposed": ("Lk", "Lq"),
}


@st.composite
def op_calls(draw):
    """One call of the public op: shapes, layout, dtype and every mask option at random."""
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return {
        "batch": draw(st.integers(1, 3)), "kv_heads": kv_heads, "heads": kv_heads * group,
        "seqlen_q": draw(st.sampled_from([1, 2, 16, 33, 65, 100])),
        "seqlen_k": draw(st.sampled_from([1, 7, 31, 64, 65, 150])),
        "head_dim": draw(st.sampled_from([3, 16, 40, 64, 72, 128])),
        "value_head_dim": draw(st.sampled_from([None, None, 8, 72])),  # None: the query's
        "dtype": draw(st.sampled_from([torch.float32, torch.float16])),
        "layout": draw(st.sampled_from(["contiguous", "B,L,H,D", "sliced"])),
        "causal": draw(st.sampled_from([None, "is_causal", "lower_right", "upper_left"])),
        "mask": draw(st.sampled_from([None, "bool", "float", "float-grad"])),
        "mask_layout": draw(st.sampled_from(list(MASK_LAYOUTS))),
        "padding": draw(st.booleans()),
        "window": draw(st.sampled_from([None, 0, 3, 17, (2, 5), (40, 1)])),
        "scale": draw(st.sampled_from([None, 0.3, 1.7])),
        "splits": draw(st.sampled_from([None, None, 2, 5])),  # the forward's split keys, forced (None: as chosen)
        "seed": draw(st.integers(0, 2 ** 31 - 1)),
    }


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")  # torch's; the op gives zeros
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=op_calls())
def test_op_random_combinations_match_the_reference(call):
    """Random combinations of shapes, layouts (strided inputs, broadcast, expanded and transposed
    masks), GQA, every mask option, scale, dtype and split keys (forced), through the public op
    (backend="triton"), forward and backward (a float mask's gradient too), against the float64
    reference given one dense mask built here from the documented semantics. This hunts combination bugs (a mask
    misread, a stride ignored): errors of the size of the output, far above the floor used here,
    the rounding of the float32 scores (|S| eps, which grows with the logits: scale 1.7 makes
    them large) times the output or gradient scale. The ulp-level rule on curated cases is
    test_forward/backward_matches_reference's."""
    generator = torch.Generator().manual_seed(call["seed"])
    batch, heads, kv_heads = call["batch"], call["heads"], call["kv_heads"]
    seqlen_q, seqlen_k, head_dim, dtype = call["seqlen_q"], call["seqlen_k"], call["head_dim"], call["dtype"]
    head_dim_v = call["value_head_dim"] or head_dim

    def tensor(heads_, length, dim=head_dim):
        if call["layout"] == "B,L,H,D":
            return torch.randn(batch, length, heads_, dim, generator=generator).to(dtype).transpose(1, 2)
        if call["layout"] == "sliced":
            return torch.randn(batch, heads_, length, dim + 5, generator=generator).to(dtype)[..., 2:2 + dim]
        return torch.randn(batch, heads_, length, dim, generator=generator).to(dtype)

    q, k, v = tensor(heads, seqlen_q), tensor(kv_heads, seqlen_k), tensor(kv_heads, seqlen_k, head_dim_v)
    allowed = torch.ones(batch, heads, seqlen_q, seqlen_k, dtype=torch.bool)
    kwargs, attn_mask, bias, offset = {"enable_gqa": heads != kv_heads, "scale": call["scale"]}, None, None, 0
    if call["causal"] == "is_causal":
        kwargs["is_causal"] = True
        allowed &= causal_bool(seqlen_q, seqlen_k, 0)
    elif call["causal"] is not None:
        offset = seqlen_k - seqlen_q if call["causal"] == "lower_right" else 0
        attn_mask = (causal_lower_right if offset else causal_upper_left)(seqlen_q, seqlen_k)
        allowed &= causal_bool(seqlen_q, seqlen_k, offset)
    if call["mask"] is not None and attn_mask is None:
        sizes = {"B": batch, "H": heads, "Lq": seqlen_q, "Lk": seqlen_k}
        shape = [sizes.get(dim, dim) for dim in MASK_LAYOUTS[call["mask_layout"]]]
        if call["mask"] == "bool":
            attn_mask = torch.rand(shape, generator=generator) < 0.7
        else:
            attn_mask = torch.randn(shape, generator=generator).to(dtype)
            attn_mask[torch.rand(shape, generator=generator) < 0.2] = float("-inf")
        if call["mask_layout"] == "expanded":
            attn_mask = attn_mask.expand(batch, heads, seqlen_q, seqlen_k)
        if call["mask_layout"] == "transposed":
            attn_mask = attn_mask.t()
        if call["mask"] == "bool":
            allowed &= attn_mask
        else:
            bias = attn_mask
            attn_mask = attn_mask.detach().requires_grad_(call["mask"] == "float-grad")
    if call["padding"]:
        kwargs["key_padding_mask"] = torch.rand(batch, seqlen_k, generator=generator) < 0.4
        if call["layout"] == "B,L,H,D":  # a transposed view: read through its strides
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"].t().contiguous().t()
        allowed &= ~kwargs["key_padding_mask"][:, None, None, :]
    if call["window"] is not None:
        kwargs["window_size"] = call["window"]
        left, right = (call["window"], 0) if isinstance(call["window"], int) else call["window"]
        allowed &= window_bool(seqlen_q, seqlen_k, offset, left, right)
    leaves = [tensor_.detach().requires_grad_() for tensor_ in (q, k, v)]
    grad_out = torch.randn(batch, heads, seqlen_q, head_dim_v, generator=generator).to(dtype)
    from unittest import mock

    from fasttransformer.kernels import configs
    splits = mock.patch.object(configs, "forward_splits", lambda *args: call["splits"]) if call["splits"] else None
    with poisoned_allocations(DEVICE), splits or contextlib.nullcontext():
        out = scaled_dot_product_attention(*leaves, attn_mask, **kwargs, backend="triton")
        out.backward(grad_out)

    scale = call["scale"] if call["scale"] is not None else 1 / math.sqrt(head_dim)
    runs = []
    for cast in (torch.float64, dtype):
        inputs = [tensor_.detach().to(cast).requires_grad_() for tensor_ in (q, k, v)]
        dense = torch.zeros(allowed.shape, dtype=cast).masked_fill(~allowed, float("-inf"))
        bias_leaf = None if bias is None else bias.detach().to(cast).requires_grad_()
        result = reference.scaled_dot_product_attention(
            *inputs, attn_mask=dense if bias_leaf is None else dense + bias_leaf, scale=scale, enable_gqa=True)
        result.backward(grad_out.to(cast))
        runs.append((result, [tensor_.grad for tensor_ in inputs], bias_leaf))
    (ref, ref_grads, ref_bias), (base, base_grads, base_bias) = runs
    scores = reference_attention_scores(q, k, bias) * (scale * math.sqrt(head_dim))
    visible = scores.masked_fill(~allowed, float("nan"))
    visible = visible[~torch.isnan(visible) & torch.isfinite(visible)]
    largest = visible.abs().max().item() * math.log2(math.e) if visible.numel() else 0.0
    rounding = max(1.0, largest * torch.finfo(torch.float32).eps / torch.finfo(dtype).eps)
    assert_within_torch_error(out, ref, base, 2.0, "output", magnitude=ref.abs().max().item() * rounding)
    grad_scale = max(grad.abs().max().item() for grad in ref_grads)
    if bias is not None and attn_mask.requires_grad:
        assert attn_mask.grad is not None and attn_mask.grad.shape == bias.shape and attn_mask.grad.dtype == dtype
        grad_scale = max(grad_scale, ref_bias.grad.abs().max().item())
        assert_within_torch_error(attn_mask.grad, ref_bias.grad, base_bias.grad, 3.0, "mask gradient",
                                  magnitude=4 * grad_scale * rounding)
    for name, leaf, ref_grad, base_grad in zip(("dq", "dk", "dv"), leaves, ref_grads, base_grads):
        assert_within_torch_error(leaf.grad, ref_grad, base_grad, 3.0, name, magnitude=4 * grad_scale * rounding)


@pytest.mark.parametrize("change,error,pattern", [
    ({"query": torch.randn(2, 4, 29)}, ValueError, "key is 4-D but query is 3-D: query, key and value must"),
    ({"value": torch.randn(2, 41, 24)}, ValueError, "value is 3-D but query is 4-D"),
    ({"query": torch.randn(24), "key": torch.randn(24), "value": torch.randn(24)}, ValueError, "at least 2-D"),
    ({"query": torch.randn(3, 2, 4, 29, 24), "key": torch.randn(1, 2, 2, 41, 24),
      "value": torch.randn(1, 2, 2, 41, 24)}, ValueError, r"key's leading dims \(1, 2\) differ from query's \(3, 2\)"),
    ({"query": torch.randn(3, 2, 4, 29, 24), "key": torch.randn(3, 2, 2, 41, 24), "value": torch.randn(3, 2, 2, 41, 24),
      "attn_mask": torch.ones(2, 3, 1, 1, 41, dtype=torch.bool)}, ValueError,
     r"attn_mask of shape \(2, 3, 1, 1, 41\) does not broadcast to \(..., heads, Lq, Lk\) = \(3, 2, 4, 29, 41\)"),
    ({"query": torch.randn(3, 2, 4, 29, 24), "key": torch.randn(3, 2, 2, 41, 24), "value": torch.randn(3, 2, 2, 41, 24),
      "key_padding_mask": torch.zeros(6, 41, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must be \(..., Lk\) = \(3, 2, 41\) for 5-D inputs"),
    ({"value": torch.randn(2, 2, 41, 264), "backend": "triton"}, RuntimeError, "value's head dim 264 > 256"),
    ({"value": torch.randn(2, 2, 41, 0)}, ValueError, "value's head dim .* must be at least 1"),
    ({"query": torch.randn(1, 1, 1, 24).expand(32768, 32768, 2, 24),  # 2**31 rows, in 24 numbers
      "key": torch.randn(1, 1, 1, 24).expand(32768, 1, 3, 24),
      "value": torch.randn(1, 1, 1, 24).expand(32768, 1, 3, 24),
      "backend": "triton"}, RuntimeError,
     r"batch \* heads \* Lq = 2147483648 >= 2\*\*31: the kernels index their float32 row statistics"),
    ({"query": torch.randn(2, 4, 29, 24).int()}, TypeError, "query must be float16, bfloat16, float32 or float64"),
    ({"key": torch.randn(2, 2, 41, 24, dtype=torch.float64)}, ValueError, "key is torch.float64 on cpu but query"),
    ({"query": torch.randn(2, 4, 29, 24).double(), "key": torch.randn(2, 2, 41, 24).double(),
      "value": torch.randn(2, 2, 41, 24).double(), "backend": "triton"}, RuntimeError,
     "float64 is not in the Triton kernels"),
    ({"key": torch.randn(2, 2, 41, 16)}, ValueError, "head dims differ: query 24, key 16"),
    ({"query": torch.randn(2, 4, 29, 0), "key": torch.randn(2, 2, 41, 0), "value": torch.randn(2, 2, 41, 0)},
     ValueError, "query's head dim .* must be at least 1"),
    ({"enable_gqa": False}, ValueError, "pass enable_gqa=True"),
    ({"key": torch.randn(2, 3, 41, 24), "value": torch.randn(2, 3, 41, 24)}, ValueError, "multiple of key heads"),
    ({"attn_mask": torch.ones(5, 41, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ({"attn_mask": torch.ones(29, 41, dtype=torch.int32)}, TypeError, "attn_mask must be bool or floating"),
    ({"attn_mask": causal_lower_right(3, 4)}, ValueError, "causal bias for"),
    ({"key_padding_mask": torch.zeros(2, 41)}, TypeError, "key_padding_mask must be a bool tensor"),
    ({"key_padding_mask": torch.zeros(2, 40, dtype=torch.bool)}, ValueError, r"key_padding_mask must be \(batch, Lk\)"),
    ({"window_size": -1}, ValueError, "window_size must be"),
    ({"window_size": (1, 2, 3)}, ValueError, "window_size must be"),
    ({"window_size": 2.0}, ValueError, "window_size must be"),
    ({"is_causal": "yes"}, TypeError, "is_causal must be a bool"),
    ({"enable_gqa": None}, TypeError, "enable_gqa must be a bool"),
    ({"dropout_p": 2.0}, ValueError, "dropout_p must be"),
    ({"scale": float("nan")}, ValueError, "scale must be finite, got nan"),  # torch's CPU kernel gives numbers
    ({"scale": -math.inf}, ValueError, "scale must be finite, got -inf"),
    ({"backend": "cudnn"}, ValueError, "backend must be one of"),
])
def test_op_bad_arguments_name_the_argument(change, error, pattern):
    args = {"query": torch.randn(2, 4, 29, 24), "key": torch.randn(2, 2, 41, 24), "value": torch.randn(2, 2, 41, 24),
            "enable_gqa": True}
    args.update(change)
    with pytest.raises(error, match=pattern):
        scaled_dot_product_attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_calls_with_a_scale_that_changes(backend):
    """torch.compile makes a float argument that changed between calls symbolic: the checks of
    `scale` must trace then (math.isfinite does not), and a NaN still raises, naming it."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, s: scaled_dot_product_attention(q, k, v, scale=s, backend=backend),
                             fullgraph=True, backend="aot_eager")
    query, key, value = torch.randn(2, 3, 37, 16), torch.randn(2, 3, 63, 16), torch.randn(2, 3, 63, 16)
    for scale in (0.3, 0.55, -0.8):
        expected = reference.scaled_dot_product_attention(query.double(), key.double(), value.double(), scale=scale)
        torch_result = reference.scaled_dot_product_attention(query, key, value, scale=scale)
        assert_within_torch_error(compiled(query, key, value, scale), expected, torch_result, what=f"scale {scale}")
    with pytest.raises(Exception, match="scale must be finite, got nan"):
        compiled(query, key, value, float("nan"))


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic-dynamic"])
@pytest.mark.parametrize("name", ["bool+is_causal+padding", "float+padding", "padding+window_int"])
def test_compiled_calls_with_lengths_that_change(name, dynamic):
    """torch.compile with symbolic sizes (dynamic=True, or torch's default, which recompiles once
    with symbolic sizes when a length changes): the op's checks, the masks' handling and the fake
    implementation trace without specialising on a batch or length (their guards are bounds,
    such as the int32 index limit), so one graph serves them all: training on variable-length
    batches compiles no more often than that. Forward and gradients, a float mask's too.
    (dynamo may trace a call twice, restarting once it knows the default scale is a float; that
    is one graph, not a recompile.)"""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def attend(q, k, v, kwargs):
        return scaled_dot_product_attention(q, k, v, **kwargs, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    # No two sizes of the first call alike (heads 4, kv heads 2, D 24): torch would guard on
    # their equality (duck sizing) and compile again at the next call.
    for batch, seqlen_q, seqlen_k in ((3, 29, 41), (5, 37, 19), (2, 11, 70)):
        q, k, v, kwargs, allowed, bias = op_case(name, torch.float32, batch=batch, seqlen_q=seqlen_q,
                                                 seqlen_k=seqlen_k)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if bias is not None:
            kwargs["attn_mask"] = kwargs["attn_mask"].clone().requires_grad_()
        with poisoned_allocations(DEVICE):
            out = compiled(*leaves, kwargs)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        assert_matches_reference(q, k, v, allowed, bias, grad_out, out, [leaf.grad for leaf in leaves])
        if bias is not None:
            assert_bias_grad_matches_reference(q, k, v, allowed, bias, grad_out, kwargs["attn_mask"].grad)
    graphs = len(_debug_get_cache_entry_list(attend))  # dynamo's compiled variants of `attend`
    assert graphs == (1 if dynamic else 2), f"{graphs} compiled graphs for three shapes"


# --- on CUDA only (make gpu-check): real sizes, bfloat16, reruns, graphs, compile -------------------

LARGE_CASES = {  # name: (batch, heads, kv_heads, Lq, Lk, D, masks)
    "8k-D128-none": (1, 2, 2, 8192, 8192, 128, ["none"]),
    "8k-D128-causal": (1, 2, 2, 8192, 8192, 128, ["causal"]),
    "4k-D64-padding+causal-gqa": (2, 4, 2, 4096, 4096, 64, ["padding", "causal"]),
    "4k-D64-document": (1, 2, 1, 4096, 4096, 64, ["document"]),
    "decode-Lq1-8k-D128-lower_right": (4, 8, 2, 1, 8192, 128, ["lower_right"]),  # split keys (forward_splits)
    "decode-Lq1-16k-D64-padding": (1, 16, 4, 1, 16384, 64, ["padding", "lower_right"]),  # split lists
    "2k-D256-window+float": (1, 2, 2, 2048, 2048, 256, ["window", "float"]),
    "3000x5000-D96-bool+padding": (1, 2, 2, 3000, 5000, 96, ["bool", "padding"]),
}


@pytest.mark.parametrize("name", list(LARGE_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.cuda
@needs_cuda
def test_cuda_large_cases_forward_and_backward(name, dtype):
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks = LARGE_CASES[name]
    if "document" in masks:
        q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                        [], dtype)
        mask = document_mask(seqlen_q, seqlen_k, [700, 1900, 2000, 3500])
        kernel_args["attn_mask"] = mask.to(DEVICE)
        allowed = allowed & mask
    else:
        q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                        masks, dtype)
    grad_out = torch.randn_like(q)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's jvp setup (a FutureWarning in 2.15)
@pytest.mark.parametrize("name", ["4k-D64-padding+causal-gqa", "4k-D64-document", "decode-Lq1-8k-D128-lower_right",
                                  "2k-D256-window+float", "3000x5000-D96-bool+padding",
                                  "4k-D64-padding+causal-gqa+dropout", "2k-D256-window+float+dropout"])
@pytest.mark.cuda
@needs_cuda
def test_cuda_large_cases_jvp(name):
    """The JVP kernel (forward mode) in bfloat16 at real sizes, with its configs
    (configs.jvp_config: JVP_OVERRIDES where the dQ kernel's spilled), a float mask's tangent
    included, under the accuracy rule for derivatives; "+dropout": with the forward's dropout
    mask (p = 0.2)."""
    from fasttransformer.kernels.attention_jvp import attention_jvp
    dropout_p = 0.2 if name.endswith("+dropout") else 0.0
    batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, masks = LARGE_CASES[name.removesuffix("+dropout")]
    q, k, v, kernel_args, allowed, bias = make_case(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim,
                                                    [mask for mask in masks if mask != "document"], torch.bfloat16)
    if "document" in masks:
        mask = document_mask(seqlen_q, seqlen_k, [700, 1900, 2000, 3500])
        kernel_args["attn_mask"] = mask.to(DEVICE)
        allowed = allowed & mask
    tangents, tangent_mask = random_tangents(q, k, v, bias)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, dropout_p=dropout_p, seed=seed, **kernel_args)
        tangent_out = attention_jvp(q, k, v, out, lse, *tangents[:3], tangent_mask=tangent_mask, dropout_p=dropout_p,
                                    seed=seed, **kernel_args)
    keep = dropout_keep_mask(seed, (batch, heads, seqlen_q, seqlen_k), dropout_p) if dropout_p else None
    assert_tangent_matches_reference(q, k, v, allowed, bias, tangents, tangent_out, keep,
                                     effective_dropout_p(dropout_p))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("masks", ["causal+padding", "bool", "float", "decode+padding"])
def test_cuda_100_reruns_are_bitwise_equal(masks):
    """Also a GQA decoding step (2 programs packed, one per key head: split keys), whose merge
    adds the splits in a fixed order."""
    shape = (1, 8, 2, 1, 8192, 64) if "decode" in masks else (2, 4, 2, 1000, 1500, 64)
    q, k, v, kernel_args, _, _ = make_case(*shape, masks.split("+"), torch.bfloat16)
    grad_out = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, **kernel_args)
    first = (out, *attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3])
    for _ in range(100):
        out, lse = attention_forward(q, k, v, **kernel_args)
        again = (out, *attention_backward(grad_out, q, k, v, out, lse, **kernel_args)[:3])
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.cuda
@needs_cuda
def test_cuda_batch_past_65535_runs_in_the_kernels(monkeypatch):
    """CUDA caps a grid's z (the kernels' batch axis) at 65535: a batch of 65537 (window
    attention's windows x images reach it) takes two launches of each kernel, on slices, where
    "auto" sent it to torch before. Forward and backward through the op, with key padding and
    lower-right causal, within the accuracy rule."""
    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels

    forwards = record_launches(monkeypatch, forward_kernels, "attention_forward_kernel")
    backwards = record_launches(monkeypatch, backward_kernels, "attention_backward_dq_kernel")
    batch, seqlen_q, seqlen_k = 65537, 5, 24
    q, k, v, kernel_args, allowed, bias = make_case(batch, 2, 2, seqlen_q, seqlen_k, 16, ["padding", "lower_right"],
                                                    torch.bfloat16)
    grad_out = torch.randn_like(q)
    leaves = [tensor.clone().requires_grad_() for tensor in (q, k, v)]
    with poisoned_allocations(DEVICE):
        out = scaled_dot_product_attention(*leaves, attn_mask=causal_lower_right(seqlen_q, seqlen_k),
                                           key_padding_mask=kernel_args["key_padding_mask"])
        out.backward(grad_out)
    assert [grid[2] for grid in forwards] == [65535, 2] and [grid[2] for grid in backwards] == [65535, 2]
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, [leaf.grad for leaf in leaves])


@pytest.mark.cuda
@needs_cuda
def test_cuda_decode_split_keys_and_gqa_packing_match_and_capture_in_a_graph(monkeypatch):
    """A GQA decoding step (4 query heads per key head) that the heuristic splits: packed, 2
    programs (B x Hk) before the split, and unpacked, 8 (B x Hq); both give the unsplit result
    up to rounding, and the packed one captures in a CUDA graph (the partials come from torch's
    caching allocator; the SM count is read once, before capture)."""
    import fasttransformer.kernels.attention_forward as forward_kernels

    merges = record_launches(monkeypatch, forward_kernels, "attention_combine_kernel")
    q, k, v, kernel_args, allowed, bias = make_case(1, 8, 2, 1, 8192, 128, ["lower_right", "padding"], torch.bfloat16)
    with torch.no_grad():
        out, lse = attention_forward(q, k, v, **kernel_args)
        unpacked_out, unpacked_lse = attention_forward(q, k, v, pack_gqa=False, **kernel_args)
        # the heuristic split both: one merge each, grids (blocks, Hk or Hq, B)
        assert len(merges) == 2 and merges[0][1:] == (2, 1) and merges[1][1:] == (8, 1)
        unsplit_out, unsplit_lse = attention_forward(q, k, v, num_splits=1, pack_gqa=False, **kernel_args)
        for name, (other_out, other_lse) in {"packed": (out, lse), "unpacked": (unpacked_out, unpacked_lse)}.items():
            assert (other_out.float() - unsplit_out.float()).abs().max() < 1e-2, name
            assert torch.allclose(other_lse, unsplit_lse, atol=1e-4), name
        ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
        assert_within_torch_error(out, ref, reference_attention(q, k, v, allowed, bias), 2.0, "decode output")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_out, captured_lse = attention_forward(q, k, v, **kernel_args)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured_out, out) and torch.equal(captured_lse, lse)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("masks", [["lower_right", "padding"], ["lower_right", "bool"]], ids=["padding", "bool"])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (28, 4)], ids=["llama-32-8", "qwen2-28-4"])
def test_cuda_gqa_row_packing_matches_unpacked_and_captures_in_a_graph(monkeypatch, heads, kv_heads, masks):
    """A speculative decoding step at a real size (Llama's 32 query heads over 8 key heads, or
    Qwen2's 28 over 4: a group of 7 in 8 rows a query; 4 drafts, Lk = 8192, D = 128, bf16,
    causal lower right with key padding or a boolean mask): packed as (draft, head) rows, one
    program per key head and sequence before the heuristic's split, and unpacked, one per query
    head; both the reference's within the rule and each other's up to rounding; the packed one
    captures in a CUDA graph."""
    import fasttransformer.kernels.attention_forward as forward_kernels

    launches = record_launches(monkeypatch, forward_kernels, "attention_forward_kernel", ("PACK_GQA",))
    q, k, v, kernel_args, allowed, bias = make_case(2, heads, kv_heads, 4, 8192, 128, masks, torch.bfloat16)
    with torch.no_grad():
        out, lse = attention_forward(q, k, v, **kernel_args)
        unpacked_out, unpacked_lse = attention_forward(q, k, v, pack_gqa=False, **kernel_args)
        assert [(grid[1:], arguments) for grid, arguments in launches] == [((kv_heads, 2), (True,)),
                                                                           ((heads, 2), (False,))]
        ref = reference_attention(q.double(), k.double(), v.double(), allowed, bias)
        assert_within_torch_error(out, ref, reference_attention(q, k, v, allowed, bias), 2.0, "packed output")
        seen = torch.isfinite(unpacked_lse)
        assert torch.equal(torch.isinf(lse), ~seen) and torch.allclose(lse[seen], unpacked_lse[seen], atol=1e-4)
        assert (out.float() - unpacked_out.float()).abs().max() < 1e-2
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_out, captured_lse = attention_forward(q, k, v, **kernel_args)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured_out, out) and torch.equal(captured_lse, lse)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_capture_and_compile_match_eager():
    q, k, v, kwargs, _, _ = op_case("bool+is_causal+padding", torch.bfloat16, seqlen_q=300, seqlen_k=500, head_dim=64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = scaled_dot_product_attention(*leaves, **kwargs, backend="triton")
        out.backward(grad_out)
        return out.detach().clone(), [leaf.grad.clone() for leaf in leaves]

    eager_out, eager_grads = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture (compiles the kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for leaf in leaves:
        leaf.grad = None
    with torch.cuda.graph(graph):
        captured_out = scaled_dot_product_attention(*leaves, **kwargs, backend="triton")
        captured_out.backward(grad_out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_out, eager_out)
    assert all(torch.equal(leaf.grad, grad) for leaf, grad in zip(leaves, eager_grads))

    compiled = torch.compile(lambda a, b, c: scaled_dot_product_attention(a, b, c, **kwargs, backend="triton"),
                             fullgraph=True)
    for leaf in leaves:
        leaf.grad = None
    out = compiled(*leaves)
    out.backward(grad_out)
    assert torch.equal(out, eager_out)
    assert all(torch.equal(leaf.grad, grad) for leaf, grad in zip(leaves, eager_grads))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cuda_dropout_large_cases(head_dim, dtype):
    """Dropout with dropout's configs (configs.DROPOUT_OVERRIDES), forward and backward, against
    the float64 reference applying the mask the kernels drew."""
    seqlen = 2048 if head_dim < 256 else 1024
    q, k, v, kernel_args, allowed, bias = make_case(2, 4, 2, seqlen, seqlen, head_dim, ["padding", "causal"], dtype)
    grad_out = torch.randn_like(q)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=DEVICE)
    with poisoned_allocations(DEVICE):
        out, lse = attention_forward(q, k, v, **kernel_args, dropout_p=0.1, seed=seed)
        grads = attention_backward(grad_out, q, k, v, out, lse, **kernel_args, dropout_p=0.1, seed=seed)[:3]
    keep = dropout_keep_mask(seed, allowed.shape, 0.1)
    assert_matches_reference(q, k, v, allowed, bias, grad_out, out, grads, keep=keep,
                             dropout_p=effective_dropout_p(0.1))


@pytest.mark.cuda
@needs_cuda
def test_cuda_dropout_graph_replays_draw_fresh_masks_and_compile_runs():
    q, k, v, kwargs, _, _ = op_case("bool+is_causal+padding", torch.bfloat16, seqlen_q=300, seqlen_k=500, head_dim=64)
    call = lambda: scaled_dot_product_attention(q, k, v, **kwargs, dropout_p=0.2, backend="triton")  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    graph.replay()
    first = captured.clone()
    graph.replay()
    assert not torch.equal(first, captured)  # the seed is drawn inside the graph

    compiled = torch.compile(lambda a, b, c: scaled_dot_product_attention(a, b, c, **kwargs, dropout_p=0.2,
                                                                          backend="triton"), fullgraph=True)
    out = compiled(q, k, v)
    assert torch.isfinite(out).all() and not torch.equal(out, compiled(q, k, v))


@pytest.mark.cuda
@needs_cuda
def test_cuda_float32_beyond_d64_goes_to_torch(caplog):
    q, k, v = (torch.randn(1, 2, 100, 128, device="cuda") for _ in range(3))
    with pytest.raises(RuntimeError, match="float32 with head dim 128 > 64"):
        scaled_dot_product_attention(q, k, v, backend="triton")
    with caplog.at_level(logging.DEBUG, logger="fasttransformer"):
        out = scaled_dot_product_attention(q, k, v)
    assert "float32 with head dim 128" in caplog.text
    torch.testing.assert_close(out, scaled_dot_product_attention(q, k, v, backend="torch"))
    small = [t[..., :64].contiguous() for t in (q, k, v)]  # D = 64 runs the kernels (tf32x3)
    out = scaled_dot_product_attention(*small, backend="triton")
    ref = reference.scaled_dot_product_attention(*(t.double() for t in small))
    base = reference.scaled_dot_product_attention(*small)
    assert_within_torch_error(out, ref, base, 2.0, "float32 output")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensors_on_another_device_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 (Triton launches
    on the current device and stream), giving what the same call gives with cuda:1 current,
    forward and backward, and the current device is left as it was."""
    q, k, v, kwargs, _, _ = op_case("bool+is_causal+padding", torch.bfloat16, seqlen_q=300, seqlen_k=500, head_dim=64)
    kwargs = {name: value.to("cuda:1") if torch.is_tensor(value) else value for name, value in kwargs.items()}
    leaves = [t.to("cuda:1").requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn(q.shape, dtype=q.dtype, device="cuda:1")

    def call():
        out = scaled_dot_product_attention(*leaves, **kwargs, backend="triton")
        return (out, *torch.autograd.grad(out, leaves, grad_out))

    with torch.cuda.device(1):
        expected = call()
    torch.cuda.set_device(0)
    got = call()
    assert torch.cuda.current_device() == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
