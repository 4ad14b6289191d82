"""pytest-benchmark suite over fasttransformer.bench.attention (python -m fasttransformer bench
attention runs the sweep and writes JSON, Markdown and plots).

    pytest benchmarks/bench_attention.py --benchmark-json=FILE [--benchmark-compare]

CUDA: the quick sweep's cases (bf16, D=128, L in {1k, 8k}, 16k tokens, 2048 hidden; decode: one
query per sequence against L keys, forward only; decode-gqa: the same with 4 query heads per
key head; verify-gqa: 4 queries per sequence, causal lower right, as decode-gqa's heads; verify-gqa7:
the same with 7 query heads per key head, as Qwen2's), the Triton
kernels against torch SDPA with each backend forced, FlexAttention (compiled) and the naive
implementation. CPU: a small float32 case, where backend="auto" hands the call to torch's SDPA, so
it times what fasttransformer's dispatch (validation, mask merging) adds to torch's own call.
A baseline that cannot run a case is skipped with its reason ("n/a: ...").
"""
import pytest
import torch

from fasttransformer.bench.attention import DECODE_MASKS, DEFAULT_IMPLEMENTATIONS, QUICK_MASKS, Case, _reason

BENCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASKS = QUICK_MASKS  # bench attention --quick's
SHAPES = {  # device: (dtype, tokens, hidden, head_dim, seqlens)
    "cuda": (torch.bfloat16, 16384, 2048, 128, (1024, 8192)),
    "cpu": (torch.float32, 2048, 256, 64, (256,)),
}


def _cases():
    for device in BENCH_DEVICES:
        for seqlen in SHAPES[device][-1]:
            for mask in MASKS:
                yield pytest.param((device, mask, seqlen), id=f"{device}-{mask}-L{seqlen}")


@pytest.fixture(scope="module", params=list(_cases()))
def case(request):
    device, mask, seqlen = request.param
    dtype, tokens, hidden, head_dim, _ = SHAPES[device]
    torch.manual_seed(0)
    return Case(mask, seqlen, head_dim, device, dtype, tokens, hidden, backend="triton" if device == "cuda" else "auto")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", DEFAULT_IMPLEMENTATIONS)
def test_attention(benchmark, case, impl, mode):
    if case.mask in DECODE_MASKS and mode != "fwd":
        pytest.skip("a decoding step has no backward")
    fn = case.implementations()[impl]
    synchronize = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def step():
        case.run(fn, mode)
        synchronize()

    try:
        step()  # warm-up (compiles Triton kernels and FlexAttention) and the "can it run" check
    except Exception as error:  # noqa: BLE001  (a baseline that cannot run the case is n/a)
        pytest.skip(f"n/a: {_reason(error)}")  # the sweep's own "n/a" wording
    benchmark.extra_info.update(device=case.device, mask=case.mask, seqlen=case.seqlen, head_dim=case.head_dim,
                                batch=case.batch, heads=case.heads, dtype=str(case.dtype), impl=impl, mode=mode,
                                visible_pairs=case.visible_pairs)
    benchmark(step)


# --- host time per call: what the CPU spends before any kernel runs (decoding is bound by it) -----

HOST_CASES = {  # name: (query (B, H, Lq, D), key/value length, masks, with a backward)
    "decode": ((8, 8, 1, 64), 300, {}, False),
    "decode-key-padding": ((8, 8, 1, 64), 300, {"key_padding_mask": True}, False),
    # a cross-attention step under a static KVCache: the padding mask's lists built once, then reused
    "decode-key-padding-reused": ((8, 8, 1, 64), 300, {"key_padding_mask": True, "reuse": True}, False),
    "decode-causal-lower-right": ((8, 8, 1, 64), 300, {"lower_right": True}, False),
    "decode-split-keys": ((1, 8, 1, 64), 4096, {"num_splits": 8}, False),  # configs.forward_splits made to say 8
    # GQA, 4 query heads per key head: each key head's query heads packed into one program's rows
    # (attention_forward.gqa_packing), and the same step unpacked, one program per query head
    "decode-gqa": ((8, 8, 1, 64), 300, {"kv_heads": 2}, False),
    "decode-gqa-unpacked": ((8, 8, 1, 64), 300, {"kv_heads": 2, "unpacked": True}, False),
    # a speculative decoding step's 4 drafts, GQA: (draft, query head) pairs packed as rows (gqa_row_packing)
    "verify-gqa": ((8, 8, 4, 64), 300, {"kv_heads": 2, "lower_right": True}, False),
    "verify-gqa-unpacked": ((8, 8, 4, 64), 300, {"kv_heads": 2, "lower_right": True, "unpacked": True}, False),
    "verify-gqa7": ((8, 14, 4, 64), 300, {"kv_heads": 2, "lower_right": True}, False),  # Qwen2's group: 8 rows a draft
    "train-step": ((2, 2, 16, 16), 16, {"is_causal": True}, True),
    "train-step-key-padding": ((2, 2, 16, 16), 16, {"key_padding_mask": True}, True),
}


class _NoKernel:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("name", HOST_CASES)
def test_attention_host_time(benchmark, monkeypatch, name):
    """The op with its Triton kernels replaced by no-ops (on CPU tensors: the interpreter is never
    entered): validation, dispatch, the launchers' Python, the allocations and autograd. Triton's
    own launcher (argument binding, cache lookup) is not in it: those kernels are replaced."""
    from torch.nn.attention.bias import causal_lower_right

    import fasttransformer.kernels.attention_backward as backward_kernels
    import fasttransformer.kernels.attention_forward as forward_kernels
    import fasttransformer.kernels.block_lists as block_list_kernels
    from fasttransformer.ops import scaled_dot_product_attention
    from fasttransformer.ops.attention import reusing_block_lists

    from fasttransformer.kernels import configs

    for module, kernel in ((forward_kernels, "attention_forward_kernel"), (forward_kernels, "attention_combine_kernel"),
                           (backward_kernels, "attention_delta_kernel"),
                           (backward_kernels, "attention_backward_dkdv_kernel"),
                           (backward_kernels, "attention_backward_dq_kernel"),
                           (block_list_kernels, "tile_classes_kernel"), (block_list_kernels, "block_lists_kernel")):
        monkeypatch.setattr(module, kernel, _NoKernel())
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend="triton" accepts CPU tensors (no kernel runs)
    shape, seqlen_k, masks, backward = HOST_CASES[name]
    monkeypatch.setattr(configs, "forward_splits", lambda device, programs, key_tiles: masks.get("num_splits", 1))
    if masks.get("unpacked"):
        monkeypatch.setattr(forward_kernels, "gqa_packing", lambda *args: None)
        monkeypatch.setattr(forward_kernels, "gqa_row_packing", lambda *args: 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    query = torch.randn(shape, device=device, requires_grad=backward)
    kv_heads = masks.get("kv_heads", shape[1])
    key, value = (torch.randn(shape[0], kv_heads, seqlen_k, shape[3], device=device, requires_grad=backward)
                  for _ in range(2))
    kwargs = {"is_causal": masks.get("is_causal", False), "enable_gqa": kv_heads != shape[1]}
    if masks.get("key_padding_mask"):
        kwargs["key_padding_mask"] = torch.rand(shape[0], seqlen_k, device=device) < 0.2
    if masks.get("lower_right"):
        kwargs["attn_mask"] = causal_lower_right(shape[2], seqlen_k)
    grad = torch.randn(shape, device=device)

    store = {}

    def call():
        if masks.get("reuse"):
            with reusing_block_lists(store):
                out = scaled_dot_product_attention(query, key, value, backend="triton", **kwargs)
        else:
            out = scaled_dot_product_attention(query, key, value, backend="triton", **kwargs)
        if backward:
            query.grad = key.grad = value.grad = None
            out.backward(grad)

    call()
    benchmark.extra_info.update(device=device, case=name, shape=list(shape), seqlen_k=seqlen_k, backward=backward)
    benchmark(call)
