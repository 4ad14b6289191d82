"""pytest-benchmark suite over fasttransformer.bench.attention (python -m fasttransformer bench
attention runs the sweep and writes JSON, Markdown and plots).

    pytest benchmarks/bench_attention.py --benchmark-json=FILE [--benchmark-compare]

CUDA: the quick sweep's cases (bf16, D=128, L in {1k, 8k}, 16k tokens, 2048 hidden), the Triton
kernels against torch SDPA with each backend forced, FlexAttention (compiled) and the naive
implementation. CPU: a small float32 case, where backend="auto" hands the call to torch's SDPA, so
it times what fasttransformer's dispatch (validation, mask merging) adds to torch's own call.
A baseline that cannot run a case is skipped with its reason ("n/a: ...").
"""
import pytest
import torch

from fasttransformer.bench.attention import IMPLEMENTATIONS, Case

BENCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASKS = ("none", "causal", "padding", "document")
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
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attention(benchmark, case, impl, mode):
    fn = case.implementations()[impl]
    synchronize = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def step():
        case.run(fn, mode)
        synchronize()

    try:
        step()  # warm-up (compiles Triton kernels and FlexAttention) and the "can it run" check
    except Exception as error:  # noqa: BLE001  (a baseline that cannot run the case is n/a)
        pytest.skip(f"n/a: {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}")
    benchmark.extra_info.update(device=case.device, mask=case.mask, seqlen=case.seqlen, head_dim=case.head_dim,
                                batch=case.batch, heads=case.heads, dtype=str(case.dtype), impl=impl, mode=mode,
                                visible_pairs=case.visible_pairs)
    benchmark(step)
