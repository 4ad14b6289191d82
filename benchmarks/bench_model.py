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



# --- host time of a decoding step's KV-cache append (decoding is bound by host time and launches) --

@pytest.mark.parametrize("call", ["update", "update_stacked"])
def test_kv_cache_update_host_time(benchmark, call):
    """A ``KVCache`` append of one new position, (B, H, D) = (8, 8, 64), on the CPU, of the k and v
    of one projection's output as a self-attention layer makes them: ``update(k, v)`` (two copies
    into the cache) or ``update_stacked(kv)`` (one copy; what MultiheadAttention calls)."""
    from fasttransformer.nn import KVCache

    torch.manual_seed(0)
    batch, heads, head_dim = 8, 8, 64
    # (B, 1, 3E) -> (B, 3H, 1, D), as MultiheadAttention._project
    qkv = torch.randn(batch, 1, 3 * heads * head_dim).unflatten(-1, (-1, head_dim)).transpose(1, 2)
    args = (qkv[:, heads:2 * heads], qkv[:, 2 * heads:]) if call == "update" else (qkv[:, heads:],)
    cache = KVCache(capacity=4096)
    update = getattr(cache, call)

    def append():
        if cache.length == cache.capacity:  # start over rather than fill up (the rounds are many)
            cache.length = 0
        update(*args)

    append()
    benchmark.extra_info.update(device="cpu", subject="kv_cache_update", call=call, batch=batch, heads=heads,
                                head_dim=head_dim)
    benchmark(append)
