"""Opt-in autotuning of the attention kernels' tile configs: ``FASTTRANSFORMER_AUTOTUNE=1``.

By default the kernels take their tile sizes, warps and stages from a table per (GPU arch,
dtype, head dim) (``fasttransformer/kernels/configs.py``): the first call costs one compile, and
the same inputs give the same bits on every run and every machine of an arch. The table was
chosen by compiling (registers, spills, shared memory), not by timing on every GPU. With
``FASTTRANSFORMER_AUTOTUNE=1`` in the environment when fasttransformer is imported (or after
``enable()``), the first call of each *case* on a CUDA device times candidate configs on the
call's own inputs instead and keeps the fastest:

- A case is the kernel (forward, backward, forward mode), the GPU's name, the dtype, the head
  dims, the masks in use (kinds, not values), dropout, the GQA group, and powers of two of Lq, Lk
  and B x Hq (``case_key``).
- The candidates: the table's entry, then a grid of tiles x warps at 2 stages, then the winner's
  tiles at 1 and 3 stages (``candidates``; ``SHORT``/``LONG`` sides per dtype). The fastest
  replaces the table's entry if it takes at least MIN_GAIN (3%) less time. The backward's
  two kernels are tuned one after the other (dK/dV with dQ at its table entry, then dQ with the
  chosen dK/dV), each inside the whole backward. A candidate the GPU cannot run (too much
  shared memory) is skipped; the table's entry always runs.
- Timing: ``triton.testing.do_bench`` (median). Each candidate compiles once (Triton's cache
  keeps it), so a case's first call takes tens of seconds; later calls, and later processes,
  look the choice up.
- The choices are kept in a JSON file, ``FASTTRANSFORMER_AUTOTUNE_CACHE`` (default
  ``$XDG_CACHE_HOME/fasttransformer/autotune.json``, ``~/.cache`` without it), with a stamp of what
  they depend on (the kernels' sources, Triton, torch): a stamp that differs retunes. Writes are
  atomic and merge what other processes wrote, under a lock (``<file>.lock``, POSIX).
  ``FASTTRANSFORMER_AUTOTUNE_CACHE=""`` keeps them in memory only.
- While a CUDA graph is being captured nothing is timed: a case not yet tuned takes the table.
- The launches are pure (each writes fresh outputs, dropout is keyed by its seed), so timing
  them changes nothing; the call's result is computed once more with the chosen config, the
  bits every later call of the case gives.

Tuned configs differ by GPU and by timing noise, so two machines (or two cache files) may round
differently; the table is what keeps bits equal everywhere. Off CUDA (Triton's interpreter) the
tile sizes change only the interpreter's speed, and nothing is tuned.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from fasttransformer.kernels.configs import Config

try:
    import fcntl  # POSIX: the cache file's lock
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger("fasttransformer")

ENV = "FASTTRANSFORMER_AUTOTUNE"
CACHE_ENV = "FASTTRANSFORMER_AUTOTUNE_CACHE"
FORMAT = 1
# The devices whose calls are tuned (the tests add "cpu" to run the search under the interpreter).
DEVICE_TYPES = ("cuda",)
# Tile sides of the grid: (query-block kernels' BLOCK_M or the dK/dV kernel's BLOCK_N) x the other.
LONG = {"2-byte": (64, 128), "fp32": (32, 64)}
SHORT = {"2-byte": (32, 64, 128), "fp32": (16, 32)}
DECODE_ROWS = (16, 32)  # BLOCK_M of a call with at most 16 query rows (a decoding step, packed or not)
WARPS = (4, 8)
STAGES = (1, 3)  # tried for the winner of the grid, which runs at 2
MIN_GAIN = 0.03  # a candidate replaces the table's entry when it takes at least 3% less time

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
_LOCK = threading.RLock()
_MEMORY: Dict[tuple, object] = {}  # case key -> what was chosen (None: the table), this process
_WARNED = set()


def _from_environment() -> Optional[bool]:
    """FASTTRANSFORMER_AUTOTUNE: True (1/true/yes/on), False (unset, 0/false/no/off), or None (any
    other value: ``enabled`` raises, naming it)."""
    value = os.environ.get(ENV, "").strip().lower()
    return True if value in _TRUE else False if value in _FALSE else None


# Read once, when fasttransformer is imported (a call then pays one attribute read, not an
# environment lookup: decoding steps are bound by host time); ``enable`` changes it at run time.
ENABLED: Optional[bool] = _from_environment()
_BAD_VALUE = os.environ.get(ENV)


def enabled() -> bool:
    """Whether calls are tuned: FASTTRANSFORMER_AUTOTUNE at import, or ``enable``'s last word.
    Raises ValueError for a value of FASTTRANSFORMER_AUTOTUNE that is neither on nor off."""
    if ENABLED is None:
        raise ValueError(f"{ENV} must be 1 (tune) or 0 (the config table), got {_BAD_VALUE!r}")
    return ENABLED


def enable(on: bool = True) -> None:
    """Turns tuning on (or off) in this process, whatever FASTTRANSFORMER_AUTOTUNE said."""
    global ENABLED
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, got {on!r}")
    ENABLED = on


def cache_path() -> Optional[Path]:
    """The JSON file of the choices (None: FASTTRANSFORMER_AUTOTUNE_CACHE is set empty, memory only)."""
    if CACHE_ENV in os.environ:
        value = os.environ[CACHE_ENV]
        return Path(value).expanduser() if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fasttransformer" / "autotune.json"


_STAMP: Optional[str] = None


def stamp() -> str:
    """What the choices depend on besides the case: the kernels' sources and Triton's version (the
    AOT record's key), and torch's version."""
    global _STAMP
    if _STAMP is None:
        from fasttransformer.kernels.aot import record_key
        _STAMP = f"{record_key()[:16]}-torch-{torch.__version__}"
    return _STAMP


def _bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_name(index)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def case_key(kernel: str, query, key, value, attn_mask=None, key_padding_mask=None, causal_offset=None, window=None,
             dropout_p: float = 0.0, **extra) -> tuple:
    """The case of a call: what its best config may depend on (see the module's docstring),
    never the values of its tensors. ``extra``: the kernel's own flags (bias_grad, tangent_mask).
    A tuple (a call's lookup costs little host time); ``"/".join`` of it keys the file."""
    batch, heads, seqlen_q, head_dim = query.shape
    mask = "none" if attn_mask is None else "bool" if attn_mask.dtype == torch.bool else "float"
    return (kernel, _device_name(query.device), str(query.dtype)[6:], f"D{head_dim}", f"Dv{value.shape[-1]}",
            f"group{heads // max(1, key.shape[1])}", f"Lq{_bucket(seqlen_q)}", f"Lk{_bucket(key.shape[2])}",
            f"BH{_bucket(batch * heads)}", f"mask-{mask}", "padding" if key_padding_mask is not None else "no-padding",
            "causal" if causal_offset is not None else "not-causal", "window" if window else "no-window",
            "dropout" if dropout_p > 0 else "no-dropout", *(name for name, on in sorted(extra.items()) if on))


def candidates(kernel: str, dtype: torch.dtype, seqlen_q: int) -> List[Config]:
    """The grid of ``kernel`` ("forward", "dkdv", "dq" or "jvp") at 2 stages: tiles x warps. The
    dK/dV kernel's long side is BLOCK_N (keys), the others' BLOCK_M; a forward of at most 16
    query rows (a decoding step) takes DECODE_ROWS rows and longer key tiles."""
    kind = "fp32" if dtype == torch.float32 else "2-byte"
    if kernel == "forward" and seqlen_q <= DECODE_ROWS[0]:
        tiles = [(rows, n) for rows in DECODE_ROWS for n in (*SHORT[kind], 2 * SHORT[kind][-1])]
    elif kernel == "dkdv":
        tiles = [(m, n) for n in LONG[kind] for m in SHORT[kind]]
    else:
        tiles = [(m, n) for m in LONG[kind] for n in SHORT[kind]]
    return [Config(m, n, warps, 2) for m, n in tiles for warps in WARPS]


def _measure(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds a call of ``run`` takes: do_bench's median on CUDA; on the interpreter (the
    tests), one timed call after one untimed."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")
    run()
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def _unrunnable():
    """The errors that rule a candidate out: the GPU cannot run its tiles (shared memory)."""
    from triton.runtime.errors import OutOfResources
    return (OutOfResources,)


def search(kernel: str, run: Callable[[Optional[Config]], object], dtype: torch.dtype, seqlen_q: int,
           device: torch.device) -> Tuple[Optional[Config], Dict[str, float]]:
    """(the fastest config, None for the table's entry; every timing in ms by config). ``run(config)``
    launches the kernel's whole call with ``config`` (None: the table's)."""
    times: Dict[str, float] = {"table": _measure(lambda: run(None), device)}  # its errors are the call's
    best, best_time = None, times["table"]

    def time_all(configs):
        nonlocal best, best_time
        for config in configs:
            name = "x".join(map(str, config))
            if name in times:
                continue
            try:
                times[name] = _measure(lambda: run(config), device)
            except _unrunnable() as error:
                logger.debug("autotune %s: %s skipped (%s)", kernel, name, error)
                continue
            if times[name] < best_time:
                best, best_time = config, times[name]

    time_all(candidates(kernel, dtype, seqlen_q))
    if best is not None:
        time_all([best._replace(num_stages=stages) for stages in STAGES])
    if best_time > times["table"] * (1 - MIN_GAIN):
        best = None  # within the noise of the table's: keep its bits
    return best, times


def _load(path: Path) -> Dict[str, dict]:
    """The file's entries of this stamp ({} when there is none, or it cannot be read: warned once)."""
    try:
        with open(path) as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        _warn_once(f"read {path}", f"autotune: cannot read {path} ({error}); tuning again")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        _warn_once(f"format {path}", f"autotune: {path} is not a fasttransformer autotune file; tuning again")
        return {}
    return {key: entry for key, entry in data["entries"].items()
            if isinstance(entry, dict) and entry.get("stamp") == stamp()}


def _save(path: Path, key: str, entry: dict) -> None:
    """Adds ``entry`` to the file, keeping what other processes (or stamps) wrote: the read, merge
    and write hold an exclusive lock on ``<file>.lock`` (POSIX; elsewhere a race may drop an entry,
    which a later process tunes again), and the write is atomic (a temporary file, renamed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the lock file is closed
            try:
                with open(path) as file:
                    data = json.load(file)
                if (not isinstance(data, dict) or data.get("format") != FORMAT
                        or not isinstance(data.get("entries"), dict)):
                    raise ValueError
            except (OSError, ValueError):
                data = {"format": FORMAT, "entries": {}}
            data["entries"][key] = entry
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(handle, "w") as file:
                    json.dump(data, file, indent=1, sort_keys=True)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
    except OSError as error:
        _warn_once(f"write {path}", f"autotune: cannot write {path} ({error}); the choices stay in memory")


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        logger.warning(message)


def _encode(chosen):
    """A choice as JSON holds it: a Config as a list, None as None, the backward's pair as a list."""
    if chosen is None or isinstance(chosen, Config):
        return None if chosen is None else list(chosen)
    return [_encode(config) for config in chosen]


def _decode(value) -> Optional[Config]:
    return None if value is None else Config(*value)


def _valid_config(value) -> bool:
    """None (the table) or [BLOCK_M, BLOCK_N, warps, stages]: powers of two from 16 (tiles, warps
    from 1) and stages from 1."""
    if value is None:
        return True
    if not isinstance(value, list) or len(value) != 4 or not all(type(v) is int and v > 0 for v in value):
        return False
    return all(v >= 16 and v & (v - 1) == 0 for v in value[:2]) and value[2] & (value[2] - 1) == 0


def _valid_choice(kernel: str, choice) -> bool:
    if kernel == "backward":
        return isinstance(choice, list) and len(choice) == 2 and all(map(_valid_config, choice))
    return _valid_config(choice)


def tuned(kernel: str, case: tuple, device: torch.device, search_case: Callable[[], Tuple[object, dict]]):
    """What ``case`` of ``kernel`` runs with: this process's choice, else the file's, else
    ``search_case()``'s (kept in both). ``search_case`` returns (choice, timings): a Config or None
    (the table), or for the backward a pair of them. While a CUDA graph is being captured, a case
    not yet tuned gets None (the table) and is not tuned."""
    with _LOCK:
        if case in _MEMORY:
            return _MEMORY[case]
        path, name = cache_path(), "/".join(case)
        stored = _load(path).get(name) if path is not None else None
        if stored is not None and ("choice" not in stored or not _valid_choice(kernel, stored["choice"])):
            _warn_once(f"entry {name}", f"autotune: {path} holds {stored.get('choice')!r} for {name}, not a "
                                        "config; tuning again")
            stored = None
        if stored is not None:
            choice = stored["choice"]
        elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            logger.debug("autotune %s: %s not tuned while a CUDA graph is captured: the table's config", kernel, name)
            return None
        else:
            start = time.perf_counter()
            try:
                chosen, times = search_case()
            except torch.OutOfMemoryError:  # do_bench's L2 flush buffer (256 MB), a candidate's lists
                _warn_once(f"memory {name}", f"autotune: out of memory while timing {name}: the table's config, "
                                             "not saved (a later process tunes it again)")
                _MEMORY[case] = None
                return None
            choice = _encode(chosen)
            logger.info("autotune %s: %s -> %s (table %.3f ms, chosen %.3f ms; %d timed in %.1f s)", kernel, name,
                        choice or "the table's config", times.get("table", float("nan")), min(times.values()),
                        len(times), time.perf_counter() - start)
            if path is not None:
                _save(path, name, {"stamp": stamp(), "choice": choice, "times_ms": times})
        _MEMORY[case] = choice
        return choice


def forward_config(query, run: Callable[[Optional[Config]], object], **case) -> Optional[Config]:
    """The forward's config for this call (None: the table's), tuning its case on a first call.
    ``run(config)`` is the call's launch with ``config``; ``case``: ``case_key``'s arguments."""
    if not enabled() or query.device.type not in DEVICE_TYPES:
        return None
    key = case_key("forward", query, **case)
    return _decode(tuned("forward", key, query.device,
                         lambda: search("forward", run, query.dtype, query.shape[2], query.device)))


def jvp_config(query, run: Callable[[Optional[Config]], object], **case) -> Optional[Config]:
    """The forward-mode (JVP) kernel's config for this call, as ``forward_config``."""
    if not enabled() or query.device.type not in DEVICE_TYPES:
        return None
    key = case_key("jvp", query, **case)
    return _decode(tuned("jvp", key, query.device, lambda: search("jvp", run, query.dtype, query.shape[2],
                                                                  query.device)))


def backward_configs(query, run: Callable[[Optional[Config], Optional[Config]], object],
                     **case) -> Tuple[Optional[Config], Optional[Config]]:
    """(dK/dV config, dQ config) for this backward (None: the table's), tuning its case on a first
    call: the dK/dV kernel first (dQ at its table entry), then the dQ kernel with the chosen
    dK/dV config, each timed inside the whole backward. ``run(dkdv, dq)`` is the call's launch."""
    if not enabled() or query.device.type not in DEVICE_TYPES:
        return None, None

    def search_case():
        dkdv, dkdv_times = search("dkdv", lambda config: run(config, None), query.dtype, query.shape[2], query.device)
        dq, dq_times = search("dq", lambda config: run(dkdv, config), query.dtype, query.shape[2], query.device)
        times = {f"dkdv {name}": ms for name, ms in dkdv_times.items()}
        times.update({f"dq {name}": ms for name, ms in dq_times.items()})
        times["table"] = dkdv_times["table"]
        return (dkdv, dq), times

    choice = tuned("backward", case_key("backward", query, **case), query.device, search_case)
    return (None, None) if choice is None else (_decode(choice[0]), _decode(choice[1]))


def describe() -> dict:
    """For ``fasttransformer info``: {"enabled": bool (None with "error": a bad value), "cache":
    the file or None, "choices": how many cases it holds for these kernels and versions}."""
    try:
        on = enabled()
    except ValueError as error:
        return {"enabled": None, "error": str(error), "cache": None, "choices": 0}
    path = cache_path()
    try:
        choices = len(_load(path)) if path is not None else 0
    except ImportError:  # no triton: nothing to tune
        choices = 0
    return {"enabled": on, "cache": None if path is None else str(path), "choices": choices}


def clear_memory() -> None:
    """Forgets this process's choices (the file keeps its own)."""
    with _LOCK:
        _MEMORY.clear()
        _WARNED.clear()
