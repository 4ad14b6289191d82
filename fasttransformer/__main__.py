"""Command line: ``python -m fasttransformer info | demo | bench | profile`` (also installed as
``fasttransformer``)."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def environment() -> dict:
    """Versions, the GPU, what the native extension was built with, usable attention backends."""
    import torch

    from fasttransformer import __version__, _extension

    info = {
        "fasttransformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": None,
        "extension": _extension.build_info(),
        "attention_backends": {},
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = None
        info["triton_error"] = str(error)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1),
                       "multiprocessors": props.multi_processor_count}
    info["attention_backends"] = attention_backends(info)
    from fasttransformer.ops import autotune
    info["autotune"] = autotune.describe()
    return info


def attention_backends(info: dict) -> dict:
    """Each backend a user could run here: "usable", or the reason it is not."""
    import torch

    backends = {"torch-math": "usable"}
    if info["gpu"] is None:
        reason = "no CUDA GPU"
        backends.update({"torch-flash": reason, "torch-efficient": reason, "torch-cudnn": reason})
    else:
        cuda = torch.backends.cuda
        backends["torch-flash"] = "usable" if cuda.is_flash_attention_available() else "not built into this torch"
        backends["torch-efficient"] = "usable"
        backends["torch-cudnn"] = "usable" if torch.backends.cudnn.is_available() else "cuDNN not available"
    if info["triton"] is None:
        backends["triton"] = "triton is not installed"
    elif info["gpu"] is None:
        backends["triton"] = "no CUDA GPU (the interpreter runs with TRITON_INTERPRET=1, for tests)"
    else:
        from fasttransformer.ops.attention import _gpu_unsupported
        backends["triton"] = _gpu_unsupported(0) or "usable"
    return backends


def print_info(info: dict) -> None:
    ext = info["extension"]
    if ext["built"]:
        kernels = ", ".join(k for k, on in [("CPU", ext["cpu_kernels"]), ("CUDA", ext["cuda_kernels"])] if on)
        extension = f"built with {kernels} kernels" + (f" (archs {ext['cuda_archs']})" if ext["cuda_archs"] else "")
        extension += ", OpenMP" if ext["openmp"] else ", no OpenMP"
    else:
        extension = f"NOT built ({ext['error']}); build it with: pip install --no-build-isolation -e ."
    gpu = info["gpu"]
    rows = [
        ("fasttransformer", info["fasttransformer"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        ("triton", info["triton"] or "not installed"),
        ("GPU", f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['memory_gib']} GiB)" if gpu else "none"),
        ("extension _C", extension),
    ]
    rows += [(f"attention: {name}", status) for name, status in info["attention_backends"].items()]
    tune = info["autotune"]
    if tune["enabled"] is None:
        rows.append(("autotune", tune["error"]))
    elif tune["enabled"]:
        where = tune["cache"] or "memory only (FASTTRANSFORMER_AUTOTUNE_CACHE is empty)"
        rows.append(("autotune", f"on: {tune['choices']} tuned cases in {where}"))
    else:
        rows.append(("autotune", "off: the config table (FASTTRANSFORMER_AUTOTUNE=1 times the configs on CUDA)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fasttransformer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info_parser = commands.add_parser("info", help="versions, GPU, native extension and usable backends")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    from fasttransformer import demo
    demo.build_parser(commands.add_parser("demo", help="train a small Seq2SeqTransformer on a synthetic task"))
    from fasttransformer.bench import cli as bench
    bench.build_parser(commands.add_parser("bench", help="benchmarks against torch (JSON, Markdown, plots)"))
    from fasttransformer import profile
    profile.build_parser(commands.add_parser("profile", help="profile Seq2SeqTransformer steps (top kernels, trace)"))
    args = parser.parse_args(argv)
    if args.command == "profile":
        profile.run(args)
    if args.command == "demo":
        demo.run(args)
    if args.command == "bench":
        bench.run(args)
    if args.command == "info":
        info = environment()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
