"""Checks of the command line's arguments shared by its subcommands (``demo``, ``bench``,
``profile``) and the benchmark scripts: each bad value ends the run before any work, with a
message that names the option, instead of a traceback after the work (or a file silently not
written)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def device_type(text: str) -> torch.device:
    """argparse ``type`` of a ``--device`` option: ``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device this command runs on: cpu, cuda or cuda:N")
    return device


def resolve_device(device: torch.device | None, flag: str = "--device") -> torch.device:
    """``device`` (None: CUDA when there is a GPU, else the CPU), checked against this machine."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{flag} {device}: no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def output_folder(path, flag: str) -> Path:
    """Creates the folder ``path`` (and its parents) where a command will write, or ends the run
    naming ``flag`` when it cannot be written: checked before the work, not after it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{flag} {path}: not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"{flag} {path}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: the folder is not writable")
    return folder


def output_file(path, flag: str) -> Path:
    """Checks that the file ``path`` can be written (its folder is created), before the work."""
    file = Path(path)
    if file.is_dir():
        raise SystemExit(f"{flag} {path}: is a folder, not a file")
    output_folder(file.parent, flag)
    if file.exists() and not os.access(file, os.W_OK):
        raise SystemExit(f"{flag} {path}: the file is not writable")
    return file
