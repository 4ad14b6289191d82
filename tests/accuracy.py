"""The accuracy rule every kernel test uses (the one FlashAttention's tests use).

A result is accepted when its max error against the float64 reference is at most ``factor``
times the error of the same computation done by plain PyTorch in the same dtype (2 for
outputs, 3 for gradients), plus a floor of a few units in the last place of the output scale.
"""
import contextlib

import torch


@contextlib.contextmanager
def poisoned_allocations(device="cpu"):
    """Every empty() inside is filled with NaN (torch does it under deterministic mode), the
    ones inside our ops included: an output element a kernel does not write stays NaN."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.isnan(torch.empty(8, device=device)).all(), "uninitialised memory is not poisoned"
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def max_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return (result.double() - reference.double()).abs().max().item() if result.numel() else 0.0


def assert_within_torch_error(result, reference, torch_result, factor=2.0, what="output", magnitude=None):
    """``magnitude``: the scale the floor is taken at (default: the largest reference value).
    Gradients pass the largest value of all the gradients of one backward: a gradient that is
    exactly zero in exact arithmetic (one visible key makes dS = P * (dP - delta) cancel) is
    judged at the scale of the computation that produced it, where plain PyTorch may happen to
    be exact in its order of operations."""
    assert result.shape == reference.shape, f"{what}: shape {tuple(result.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(result).all(), f"{what}: non-finite values"
    error = max_error(result, reference)
    torch_error = max_error(torch_result, reference)
    if magnitude is None:
        magnitude = reference.abs().max().item() if reference.numel() else 0.0
    floor = 4 * torch.finfo(result.dtype).eps * max(magnitude, 1.0)
    assert error <= factor * torch_error + floor, (
        f"{what}: max error {error:.3e} > {factor} x torch's {torch_error:.3e} + {floor:.1e}"
    )
