"""A faster Triton interpreter for the suite: the same kernels, the same bits, less waste.

Two things Triton's interpreter (3.6 to 3.9) does that change nothing, and that ``once_per_launch()``
skips (cProfile of a split-keys test, 2026-12-07: 75 s, of which 18 s and 21 s were these two;
benchmarks/results/2026-12-07-cpu/interpreter-profile-split-keys.txt):

* It swaps ``triton.language``'s builtins for numpy-backed ones when a launch starts
  (``GridExecutor.__call__``), and again at every call of a ``@triton.jit`` helper from inside
  the kernel (``InterpretedFunction.__call__``), though the launch's swap is still in place: for
  each call four ``inspect.getmembers`` walks and a new wrapper for every builtin. The kernels call
  their helpers in every tile of every program. Here a helper's call swaps nothing when the launch
  already swapped the modules it sees (``triton.language`` or its ``core``); one that sees another
  is swapped as before. The swap has no state of its own (each wrapper holds the one global
  interpreter builder).
* Every int32 ``+``, ``-`` and ``*`` builds an overflow check (both sides cast to int64, the
  operation again, two comparisons) and hands it to ``device_assert``, which drops it unless the
  builder's ``options.debug`` is set, and the interpreter's is always False
  (``InterpreterOptions``). Here the check is built only when ``debug`` is on, so nothing a run
  could see changes.

``tests/test_interpreter_speedup.py`` checks that the kernels give the same bits either way.
"""
import contextlib
import functools
import inspect
import threading

_state = threading.local()


@functools.lru_cache(maxsize=None)
def _languages(fn) -> frozenset:
    """The ``triton.language`` modules ``fn`` sees, as the interpreter finds them (``_patch_lang``;
    once per function: a kernel module's imports do not change)."""
    import triton.language as tl
    return frozenset(id(value) for value in fn.__globals__.values()
                     if inspect.ismodule(value) and value in (tl, tl.core))


_saved = {}  # Triton's own _patch_lang and overflow check, while once_per_launch() is on
counts = {"swapped": 0, "skipped": 0, "unasserted checks": 0}  # what once_per_launch() did and skipped


@contextlib.contextmanager
def once_per_launch():
    from triton.language.semantic import TritonSemantic
    from triton.runtime import interpreter

    patch_lang, call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    overflow_check = TritonSemantic.binary_op_sanitize_overflow_impl

    def overflow_check_if_asserted(self, lhs, rhs, binary_op):
        if self.builder.options.debug:  # else device_assert drops what it would build
            return overflow_check(self, lhs, rhs, binary_op)
        counts["unasserted checks"] += 1

    def patch_once(fn):
        swapped = getattr(_state, "swapped", None)
        languages = _languages(fn)
        if swapped is not None and languages and languages <= swapped:
            counts["skipped"] += 1
            return None  # a helper's call: its caller ignores the scope
        counts["swapped"] += 1
        scope = patch_lang(fn)
        if swapped is not None:
            swapped |= languages
        return scope

    def launch(self, *args, **kwargs):
        outer, _state.swapped = getattr(_state, "swapped", None), set()
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.swapped = outer

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_once, launch
    TritonSemantic.binary_op_sanitize_overflow_impl = overflow_check_if_asserted
    _saved.update(patch_lang=patch_lang, overflow_check=overflow_check)
    try:
        yield
    finally:
        interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_lang, call
        TritonSemantic.binary_op_sanitize_overflow_impl = overflow_check
        _saved.clear()


@contextlib.contextmanager
def as_triton_does():
    """Inside once_per_launch(): the interpreter's own swapping at every helper call, and its
    overflow checks built for nothing."""
    from triton.language.semantic import TritonSemantic
    from triton.runtime import interpreter

    patch_once, overflow_check_if_asserted = interpreter._patch_lang, TritonSemantic.binary_op_sanitize_overflow_impl
    interpreter._patch_lang = _saved["patch_lang"]
    TritonSemantic.binary_op_sanitize_overflow_impl = _saved["overflow_check"]
    try:
        yield
    finally:
        interpreter._patch_lang = patch_once
        TritonSemantic.binary_op_sanitize_overflow_impl = overflow_check_if_asserted
