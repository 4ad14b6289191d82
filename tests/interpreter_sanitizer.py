"""A sanitizer for Triton's interpreter: what a GPU would get wrong and the interpreter hides.

Bounds: the masked-in lanes of every load, store and atomic a kernel makes must lie inside the
storage of one of the launch's tensor arguments, all of them in the same one. On a GPU an access
past an allocation is an illegal-address fault, or, inside the caching allocator's slack, a
silent read of another tensor; the interpreter reads and writes host memory unchecked, so such a
bug passes on the CPU whenever the value read is masked away later.

Races: the interpreter runs a launch's programs one after another, so a program that reads what
another program of the same launch writes, or two programs that store to the same element, get
the same answer every run here, while on a GPU the programs run at once and the answer depends on
their timing. At the end of each launch every element stored by one program must be neither
stored nor read by any other (atomics are exempt; a program may read back what it stored).
Elements are compared by start address, so a race between accesses of different widths to
overlapping bytes is not seen (no kernel here mixes widths on one tensor).

Only lanes whose mask is true are checked, as a GPU only touches those. `checked()` patches the
interpreter for the duration of a `with`; conftest turns it on for every test under
TRITON_INTERPRET=1 (FASTTRANSFORMER_SANITIZE=0 turns it off)."""
import contextlib
import threading

import numpy as np


class OutOfBoundsAccess(AssertionError):
    pass


class DataRace(AssertionError):
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


def _where(launch, kind):
    return f"{launch['kernel']} at program {launch['program']}: a masked-in {kind}"


def _check(kind, ptrs, mask, dtype_tt):
    """Raises OutOfBoundsAccess unless all masked-in lanes lie in one tensor argument's storage;
    records plain loads and stores for the race check."""
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
    for index, (start, end, _) in enumerate(launch["ranges"]):
        if start <= low and high <= end:  # the usual case: one tensor holds all of them
            if kind in ("load", "store"):
                launch[kind + "s"].setdefault(index, []).append((launch["program_index"], addresses))
            return
    owner = np.full(addresses.shape, -1)
    for index, (start, end, _) in enumerate(launch["ranges"]):
        owner[(addresses >= start) & (addresses + width <= end)] = index
    if (owner >= 0).all():
        # Every lane is inside some tensor, but not all inside one: one access's lanes come from
        # one base pointer, so the access ran off its tensor into another's storage.
        names = sorted({launch["ranges"][index][2] for index in owner.tolist()})
        raise OutOfBoundsAccess(f"{_where(launch, kind)} spans the storages of {', '.join(names)}")
    bad = int(addresses[owner < 0][0])
    start, end, name = min(launch["ranges"], key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
    raise OutOfBoundsAccess(
        f"{_where(launch, kind)} of {int((owner < 0).sum())} lane(s) outside every tensor argument "
        f"(first: {bad - start} bytes from the start of {name}'s storage of {end - start} bytes)")


def _check_races(launch):
    """Raises DataRace if an element one program stored is stored or read by another."""
    programs = launch["programs"]
    for index, stores in launch["stores"].items():
        start, _, name = launch["ranges"][index]
        addresses = np.concatenate([a for _, a in stores])
        writers = np.concatenate([np.full(a.shape, p) for p, a in stores])
        # Each program's stored elements once, then any element stored by two programs.
        pairs = np.unique(np.stack([addresses, writers.astype(np.uint64)]), axis=1)
        addresses, writers = pairs[0], pairs[1].astype(np.int64)
        twice = np.flatnonzero(addresses[1:] == addresses[:-1])
        if twice.size:
            at = twice[0]
            raise DataRace(
                f"{launch['kernel']}: programs {programs[writers[at]]} and {programs[writers[at + 1]]} both store "
                f"{name}'s element at byte {int(addresses[at]) - start} ({twice.size} element(s) stored by more "
                f"than one program)")
        for reader, read in launch["loads"].get(index, []):
            spot = np.searchsorted(addresses, read)
            spot = np.minimum(spot, addresses.size - 1)
            clash = (addresses[spot] == read) & (writers[spot] != reader)
            if clash.any():
                at = spot[np.flatnonzero(clash)[0]]
                raise DataRace(
                    f"{launch['kernel']}: program {programs[reader]} reads {name}'s element at byte "
                    f"{int(addresses[at]) - start}, which program {programs[writers[at]]} of the same launch "
                    f"stores ({int(clash.sum())} such lane(s) in that load)")


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
            launch["program_index"] = len(launch["programs"])
            launch["programs"].append((x, y, z))
        return saved["set_grid_idx"](x, y, z)

    def call(self, *args, **kwargs):
        # The interpreter runs on host copies of the arguments (the same storages for CPU
        # tensors): wrap _init_args_hst to see them.
        init = self._init_args_hst

        def init_args(args_dev, kw):
            args_hst, kwargs_hst = init(args_dev, kw)
            named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
            _state.launch = {"kernel": getattr(self.fn, "__name__", "kernel"), "ranges": _ranges_of(named),
                             "program": None, "program_index": -1, "programs": [], "loads": {}, "stores": {}}
            return args_hst, kwargs_hst

        self._init_args_hst = init_args
        outer = getattr(_state, "launch", None)
        try:
            result = saved_call(self, *args, **kwargs)
            launch = getattr(_state, "launch", None)
            if launch is not None and launch is not outer:
                _check_races(launch)
            return result
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
