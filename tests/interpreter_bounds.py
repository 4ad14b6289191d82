"""A bounds checker for Triton's interpreter: the masked-in lanes of every load, store and atomic a
kernel makes must lie inside the storage of one of the launch's tensor arguments, all of them in
the same one.

On a GPU an access past an allocation is an illegal-address fault, or, inside the caching
allocator's slack, a silent read of another tensor; the interpreter reads and writes host memory
unchecked, so without this such a bug passes on the CPU whenever the value read is masked away
later. Only lanes whose mask is true are checked, as a GPU only touches those.

`checked()` patches the interpreter for the duration of a `with`; conftest turns it on for every
test under TRITON_INTERPRET=1 (FASTTRANSFORMER_BOUNDS_CHECK=0 turns it off)."""
import contextlib
import threading

import numpy as np


class OutOfBoundsAccess(AssertionError):
    pass


_state = threading.local()


def _ranges_of(args):
    """[(start, end, name)] of the storages behind the launch's tensor arguments."""
    ranges = []

    def visit(value, name):
        if isinstance(value, tuple):
            for index, item in enumerate(value):
                visit(item, f"{name}[{index}]")
        elif hasattr(value, "untyped_storage"):
            storage = value.untyped_storage()
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name))
        elif hasattr(value, "base") and hasattr(value.base, "untyped_storage"):  # a TensorDescriptor
            visit(value.base, name)

    for name, value in args:
        visit(value, name)
    return ranges


def _check(kind, ptrs, mask, dtype_tt):
    launch = getattr(_state, "launch", None)
    if launch is None:
        return
    addresses = np.asarray(ptrs.data)
    lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape) if mask is not None else None
    addresses = addresses[lanes] if lanes is not None else addresses.reshape(-1)
    if addresses.size == 0:
        return
    width = max(1, dtype_tt.primitive_bitwidth // 8)
    low, high = int(addresses.min()), int(addresses.max()) + width
    if any(start <= low and high <= end for start, end, _ in launch["ranges"]):
        return  # the usual case: one tensor holds all of them
    owner = np.full(addresses.shape, -1)
    for index, (start, end, _) in enumerate(launch["ranges"]):
        owner[(addresses >= start) & (addresses + width <= end)] = index
    where = f"{launch['kernel']} at program {launch['program']}: a masked-in {kind}"
    if (owner >= 0).all():
        # Every lane is inside some tensor, but not all inside one: one access's lanes come from
        # one base pointer, so the access ran off its tensor into another's storage.
        names = sorted({launch["ranges"][index][2] for index in owner.tolist()})
        raise OutOfBoundsAccess(f"{where} spans the storages of {', '.join(names)}")
    bad = int(addresses[owner < 0][0])
    start, end, name = min(launch["ranges"], key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
    raise OutOfBoundsAccess(
        f"{where} of {int((owner < 0).sum())} lane(s) outside every tensor argument "
        f"(first: {bad - start} bytes from the start of {name}'s storage of {end - start} bytes)")


@contextlib.contextmanager
def checked():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    executor = interpreter.GridExecutor
    saved = {name: getattr(builder, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
              "set_grid_idx")}
    saved_call = executor.__call__

    def masked_load(ptrs, mask, other, *rest):
        _check("load", ptrs, mask, ptrs.get_element_ty())
        return saved["create_masked_load"](ptrs, mask, other, *rest)

    def masked_store(ptrs, value, mask, *rest):
        _check("store", ptrs, mask, ptrs.get_element_ty())
        return saved["create_masked_store"](ptrs, value, mask, *rest)

    def atomic_rmw(op, ptr, val, mask, *rest):
        _check("atomic", ptr, mask, ptr.get_element_ty())
        return saved["create_atomic_rmw"](op, ptr, val, mask, *rest)

    def atomic_cas(ptr, cmp, val, *rest):
        _check("atomic", ptr, None, ptr.get_element_ty())
        return saved["create_atomic_cas"](ptr, cmp, val, *rest)

    def set_grid_idx(x, y, z):
        launch = getattr(_state, "launch", None)
        if launch is not None:
            launch["program"] = (x, y, z)
        return saved["set_grid_idx"](x, y, z)

    def call(self, *args, **kwargs):
        # The interpreter runs on host copies of the arguments (the same storages for CPU
        # tensors): wrap _init_args_hst to see them.
        init = self._init_args_hst

        def init_args(args_dev, kw):
            args_hst, kwargs_hst = init(args_dev, kw)
            names = list(self.arg_names)
            named = list(zip(names, args_hst)) + list(kwargs_hst.items())
            _state.launch = {"kernel": getattr(self.fn, "__name__", "kernel"), "ranges": _ranges_of(named),
                             "program": None}
            return args_hst, kwargs_hst

        self._init_args_hst = init_args
        outer = getattr(_state, "launch", None)
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            del self._init_args_hst
            _state.launch = outer

    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_atomic_rmw = atomic_rmw
    builder.create_atomic_cas = atomic_cas
    builder.set_grid_idx = set_grid_idx
    executor.__call__ = call
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(builder, name, method)
        executor.__call__ = saved_call
