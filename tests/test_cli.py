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


def test_info_says_whether_autotune_is_on_and_what_its_file_holds(capsys, monkeypatch, tmp_path):
    from fasttransformer.ops import autotune
    monkeypatch.setattr(autotune, "ENABLED", False)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "tuned.json"))
    assert main(["info"]) == 0
    assert "off: the config table (FASTTRANSFORMER_AUTOTUNE=1" in capsys.readouterr().out

    monkeypatch.setattr(autotune, "ENABLED", True)
    entries = {f"forward/case{i}": {"stamp": autotune.stamp(), "choice": None} for i in range(3)}
    entries["forward/old"] = {"stamp": "another build", "choice": None}  # not counted: tuned again
    (tmp_path / "tuned.json").write_text(json.dumps({"format": autotune.FORMAT, "entries": entries}))
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["autotune"] == {
        "enabled": True, "cache": str(tmp_path / "tuned.json"), "choices": 3}
    assert main(["info"]) == 0
    assert f"on: 3 tuned cases in {tmp_path / 'tuned.json'}" in capsys.readouterr().out

    monkeypatch.setattr(autotune, "ENABLED", None)  # FASTTRANSFORMER_AUTOTUNE=sometimes at import
    monkeypatch.setattr(autotune, "_BAD_VALUE", "sometimes")
    assert main(["info"]) == 0  # info reports the bad value; the attention calls raise it
    assert "FASTTRANSFORMER_AUTOTUNE must be 1 (tune) or 0 (the config table), got 'sometimes'" in (
        capsys.readouterr().out)


def test_unknown_command_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "fasttransformer", "frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr
