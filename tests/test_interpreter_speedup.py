"""The suite's faster interpreter (interpreter_speedup.py) runs the kernels to the same bits."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("FASTTRANSFORMER_FAST_INTERPRETER", "1") == "0",
    reason="the speedup is on under TRITON_INTERPRET=1, unless FASTTRANSFORMER_FAST_INTERPRETER=0")


def test_kernels_give_the_same_bits_as_under_tritons_own_interpreter():
    """Forward (split keys, dropout, float mask) and backward (with the mask's gradient): the
    same outputs as Triton's interpreter gives (the builtins swapped at every helper call, and
    int32 overflow checks built and dropped) under the session's once_per_launch(), which
    skipped both."""
    import interpreter_speedup

    from fasttransformer.kernels.attention_backward import attention_backward
    from fasttransformer.kernels.attention_forward import attention_forward

    q, k, v = (torch.randn(1, 2, length, 24) for length in (33, 70, 70))
    bias = torch.randn(1, 2, 33, 70)
    padding = torch.zeros(1, 70, dtype=torch.bool)
    padding[0, 50:] = True
    args = dict(attn_mask=bias, key_padding_mask=padding, causal_offset=37, dropout_p=0.25,
                seed=torch.tensor([1234], dtype=torch.int64))
    grad_out = torch.randn(1, 2, 33, 24)

    def run():
        out, lse = attention_forward(q, k, v, num_splits=3, block_m=16, block_n=16, **args)
        return (out, lse, *attention_backward(grad_out, q, k, v, out, lse, bias_grad=True, **args))

    before = dict(interpreter_speedup.counts)
    fast = run()
    skipped = interpreter_speedup.counts["skipped"] - before["skipped"]
    assert skipped > 0 and interpreter_speedup.counts["swapped"] > before["swapped"]
    assert interpreter_speedup.counts["unasserted checks"] > before["unasserted checks"]
    with interpreter_speedup.as_triton_does():
        before = dict(interpreter_speedup.counts)
        slow = run()
        assert interpreter_speedup.counts == before  # Triton's own code ran
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), fast, slow):
        assert torch.equal(a, b), name
