"""pytest-benchmark suite over fasttransformer.bench.embedding (python -m fasttransformer bench embedding
runs the sweep and writes JSON, Markdown and plots).

    pytest benchmarks/bench_embedding.py --benchmark-json=FILE
"""
import pytest
import torch

from fasttransformer.bench.embedding import DROPOUT, TOKENS, Case

# --- pytest-benchmark ----------------------------------------------------------------------------

BENCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", ["fused", "unfused"])
@pytest.mark.parametrize("dim", [512, 1024])
@pytest.mark.parametrize("device", BENCH_DEVICES)
@pytest.mark.parametrize("mode", ["forward", "step"])
def test_embedding(benchmark, device, dim, impl, mode):
    case = Case(device, torch.bfloat16 if device == "cuda" else torch.float32, dim)
    run = getattr(case, mode)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fn():
        run(impl, DROPOUT)
        synchronize()

    benchmark.extra_info.update(device=device, dim=dim, impl=impl, mode=mode, tokens=TOKENS)
    benchmark(fn)

