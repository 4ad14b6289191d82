"""pytest-benchmark suite over fasttransformer.bench.model (python -m fasttransformer bench model
runs the sweep and writes JSON, Markdown and plots).

    pytest benchmarks/bench_model.py --benchmark-json=FILE
"""
import pytest
import torch

from fasttransformer.bench.model import CONFIGS, Case

# --- pytest-benchmark ----------------------------------------------------------------------------

BENCH_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=BENCH_DEVICES)
def case(request):
    torch.manual_seed(0)
    return Case(request.param, CONFIGS[request.param])


@pytest.mark.parametrize("impl", ["fasttransformer", "torch.nn"])
@pytest.mark.parametrize("subject", ["train_step", "generate"])
def test_model(benchmark, case, subject, impl):
    synchronize = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)

    def fn():
        getattr(case, subject)(impl)
        synchronize()

    benchmark.extra_info.update(device=case.device, subject=subject, impl=impl, **case.config)
    benchmark.pedantic(fn, warmup_rounds=1, rounds=5)

