"""Stop 35 probe: random forward-mode calls of the op on the Triton kernels (the JVP kernel, under
the interpreter) against torch's math backend in float64, under the accuracy rule for
derivatives (3x torch's math in the same dtype, plus the tests' floor at the scale of the terms
that cancel in the tangent, raised for the recomputed probabilities). Random shapes, GQA,
Dv != D, scale, every mask kind and their combinations, a float mask with or without a tangent,
tangents for a random subset of q, k, v.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/results/2026-12-07-cpu/fuzz_probe_jvp_stop35.py SEED N
"""
import math
import os
import random
import sys

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests"))
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from accuracy import assert_within_torch_error  # noqa: E402
from fasttransformer.ops import scaled_dot_product_attention  # noqa: E402


def case(rng):
    batch, kv_heads = rng.randint(1, 3), rng.randint(1, 3)
    heads = kv_heads * rng.choice([1, 2, 3])
    seqlen_q, seqlen_k = rng.choice([1, 5, 17, 40, 70]), rng.choice([1, 9, 33, 65, 100])
    head_dim = rng.choice([8, 16, 24, 40, 64])
    head_dim_v = head_dim if rng.random() < 0.7 else rng.choice([8, 16, 32, 48])
    dtype = rng.choice([torch.float32, torch.float16])
    q = torch.randn(batch, heads, seqlen_q, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim_v, dtype=dtype)
    kwargs = {"enable_gqa": heads != kv_heads}
    mask_kind = rng.choice(["none", "causal", "lower_right", "bool", "float", "float-tangent"])
    bias = None
    if mask_kind == "causal":
        kwargs["is_causal"] = True
    elif mask_kind == "lower_right":
        kwargs["attn_mask"] = causal_lower_right(seqlen_q, seqlen_k)
    elif mask_kind == "bool":
        kwargs["attn_mask"] = torch.rand(rng.choice([1, batch]), 1, seqlen_q, seqlen_k) < 0.7
    elif mask_kind.startswith("float"):
        bias = torch.randn(rng.choice([1, batch]), rng.choice([1, heads]), seqlen_q, seqlen_k, dtype=dtype)
    if rng.random() < 0.4:
        padding = torch.rand(batch, seqlen_k) < 0.3
        if rng.random() < 0.3:
            padding[0] = True
        kwargs["key_padding_mask"] = padding
    if rng.random() < 0.3:
        kwargs["window_size"] = rng.choice([3, (2, 5), (0, 0), 20])
    if rng.random() < 0.3:
        kwargs["scale"] = rng.choice([0.05, 0.3, 1.0])
    primals = [q, k, v] + ([bias] if bias is not None else [])
    with_tangent = [rng.random() < 0.8 for _ in primals]
    if mask_kind == "float":
        with_tangent[3] = False
    if not any(with_tangent):
        with_tangent[0] = True
    return primals, with_tangent, kwargs, mask_kind


def tangent(primals, with_tangent, kwargs, backend, cast, tangents):
    def attend(*differentiated):
        it = iter(differentiated)
        args = [next(it).to(cast) if flag else primal.to(cast) for primal, flag in zip(primals, with_tangent)]
        extra = {"attn_mask": args[3]} if len(args) == 4 else {}
        return scaled_dot_product_attention(*args[:3], **kwargs, **extra, backend=backend)
    chosen = [primal.to(cast) for primal, flag in zip(primals, with_tangent) if flag]
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(attend, tuple(chosen), tuple(t.to(cast) for t in tangents))[1]


def terms(primals, with_tangent, tangents, kwargs):
    """max_i sum_j |P_ij dS_ij| |v_j| in float64: the size of the terms that cancel in the tangent
    (tests/test_attention.py's tangent_terms). P is the op's (torch backend) with V = I."""
    q, k, v = (t.double() for t in primals[:3])
    given = iter(tangents)
    full = [next(given).double() if flag else torch.zeros_like(p, dtype=torch.float64)
            for p, flag in zip(primals, with_tangent)]
    eye = torch.eye(k.shape[2], dtype=torch.float64).expand(k.shape[0], k.shape[1], -1, -1)
    extra = {"attn_mask": primals[3].double()} if len(primals) == 4 else {}
    probabilities = scaled_dot_product_attention(q, k, eye, **kwargs, **extra, backend="torch")
    group = q.shape[1] // k.shape[1]
    keys, values, tangent_keys = (t.repeat_interleave(group, 1) for t in (k, v, full[1]))
    scale = kwargs.get("scale", 1 / math.sqrt(q.shape[-1]))
    ds = (full[0] @ keys.transpose(-2, -1) + q @ tangent_keys.transpose(-2, -1)) * scale
    if len(full) == 4:
        ds = ds + full[3]
    return ((probabilities * ds).abs() @ values.abs()).max().item() if ds.numel() else 0.0


def main(seed, count):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for index in range(count):
        primals, with_tangent, kwargs, mask_kind = case(rng)
        tangents = [torch.randn_like(p) for p, flag in zip(primals, with_tangent) if flag]
        got = tangent(primals, with_tangent, kwargs, "triton", primals[0].dtype, tangents)
        reference = tangent(primals, with_tangent, kwargs, "torch", torch.float64, tangents)
        base = tangent(primals, with_tangent, kwargs, "torch", primals[0].dtype, tangents)
        scores_bound = 12 * max(1.0, kwargs.get("scale", 1.0) * math.sqrt(primals[0].shape[-1]))
        size = max(reference.abs().max().item(), terms(primals, with_tangent, tangents, kwargs))
        magnitude = size * max(1.0, scores_bound * torch.finfo(torch.float32).eps / torch.finfo(primals[0].dtype).eps)
        try:
            assert_within_torch_error(got, reference, base, 3.0, "tangent", magnitude=magnitude)
        except AssertionError as error:
            print(f"FAIL {index}: {mask_kind} {[tuple(p.shape) for p in primals]} {with_tangent} {kwargs} {error}")
            raise
    print(f"seed {seed}: {count} random forward-mode calls within the rule")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
