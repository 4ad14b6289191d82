"""Loads the native extension ``fasttransformer._C`` if it was built.

Importing fasttransformer never fails because ``_C`` is missing: the ops that need it raise
an error saying how to build it.
"""
import torch  # noqa: F401  (the extension links against libtorch)

try:
    from fasttransformer import _C
    _IMPORT_ERROR = None
except ImportError as error:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = error

BUILD_COMMAND = "pip install --no-build-isolation -e .  (or: python setup.py build_ext --inplace)"


def available() -> bool:
    return _C is not None


def require(what: str) -> None:
    """Raises a RuntimeError naming ``what`` when the extension is missing."""
    if _C is None:
        raise RuntimeError(
            f"{what} needs the compiled extension fasttransformer._C, which could not be "
            f"imported ({_IMPORT_ERROR}). Build it from the repository root with: {BUILD_COMMAND}"
        )


def build_info() -> dict:
    """What the extension was built with (for `python -m fasttransformer info`)."""
    if _C is None:
        return {"built": False, "error": str(_IMPORT_ERROR)}
    return {
        "built": True,
        "cpu_kernels": True,
        "cuda_kernels": bool(_C.WITH_CUDA),
        "openmp": bool(_C.WITH_OPENMP),
        "cuda_archs": _C.CUDA_ARCHS or None,
    }
