"""python -m fasttransformer info, as a user runs it."""
import json
import subprocess
import sys

from fasttransformer.__main__ import main


def test_info_json_reports_versions_extension_and_backends(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch
    assert info["torch"] == torch.__version__
    assert set(info["extension"]) >= {"built"}
    assert info["extension"]["built"] and info["extension"]["cpu_kernels"] is True
    if torch.cuda.is_available():  # make gpu-check builds with CUDA: the kernels must be there
        assert info["extension"]["cuda_kernels"] is True
        assert "9.0" in info["extension"]["cuda_archs"]
    assert info["attention_backends"]["torch-math"] == "usable"
    assert (info["gpu"] is None) == (not torch.cuda.is_available())


def test_info_table_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "fasttransformer", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for field in ("torch", "triton", "GPU", "extension _C", "attention: triton"):
        assert field in result.stdout


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "fasttransformer", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
