"""Shared test setup: per-test seeds, the device list, and Triton's interpreter on CPU."""
import os
import zlib

import torch

# Triton kernels run under the interpreter when there is no GPU; it must be set before triton is
# imported, and torch imports triton lazily.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (make test: one worker process per core) each worker and the processes the
# tests start use one thread: workers of 2 threads each on 2 cores spin on each other's cores
# (a demo training test took 190 s instead of 41).
# An OMP_NUM_THREADS of the user's own is kept.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]


SANITIZE = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("FASTTRANSFORMER_SANITIZE", "1") != "0"


@pytest.fixture(autouse=True, scope="session")
def _interpreter_once_per_launch():
    # Triton's interpreter swaps the language's builtins again at every call of a jit helper, and
    # builds int32 overflow checks that it then drops: interpreter_speedup.py skips both, for the
    # same bits in half the time (FASTTRANSFORMER_FAST_INTERPRETER=0 runs Triton's own).
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FASTTRANSFORMER_FAST_INTERPRETER", "1") == "0":
        yield
        return
    from interpreter_speedup import once_per_launch
    with once_per_launch():
        yield


@pytest.fixture(autouse=True)
def _sanitized():
    # Under the interpreter every kernel access must fall inside a tensor argument's storage, and
    # no program of a launch may touch what another stores (interpreter_sanitizer.py): what a GPU
    # would fault on, or get wrong by timing, fails here.
    if not SANITIZE:
        yield
        return
    from interpreter_sanitizer import checked
    with checked():
        yield


@pytest.fixture(autouse=True)
def _seed(request):
    # A different, reproducible stream of random inputs for every test.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def pytest_report_header(config):
    gpu = torch.cuda.get_device_name() if HAS_CUDA else "none"
    return f"torch {torch.__version__}, GPU: {gpu}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"


def pytest_collection_modifyitems(config, items):
    """FASTTRANSFORMER_TEST_SHARD=i/n keeps every n-th test from the i-th (0-based): `make
    gpu-check` runs n shards at once, so n processes JIT-compile the kernels in parallel."""
    shard = os.environ.get("FASTTRANSFORMER_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"FASTTRANSFORMER_TEST_SHARD must be i/n with 0 <= i < n, got {shard!r}") from None
    kept = items[index::count]
    kept_ids = {id(item) for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    items[:] = kept
