"""fastlesson.env: the one home of the hardware and version strings in records, bundles and benches."""

import platform
import sys
from pathlib import Path

import torch

from fastlesson import env


def test_device_text_names_cpu_threads_or_the_gpu():
    text = env.device_text()
    if torch.cuda.is_available():
        assert text == f"GPU {torch.cuda.get_device_name(0)} (mixed precision)"
    else:
        assert text == f"CPU ({torch.get_num_threads()} threads)"


def test_hardware_names_the_cpu_model_and_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(env, "cpu_model", lambda: "Some CPU")
    assert env.hardware() == f"CPU Some CPU, 3 threads, torch {torch.__version__}"


def test_cpu_model_falls_back_to_platform_without_proc(monkeypatch):
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (_ for _ in ()).throw(OSError(p))
                        if p == "/proc/cpuinfo" else real_open(p, *a, **k))
    assert env.cpu_model() == (platform.processor() or platform.machine())


def test_versions_and_package_version():
    import fastai

    v = env.versions()
    assert v["fastai"] == fastai.__version__ and v["torch"] == torch.__version__
    assert set(v) == {"fastlesson", "fastai", "torch", "torchvision", "timm", "python"}
    assert env.package_version("fastai") == fastai.__version__
    assert env.package_version("no-such-package-xyz") == "not installed"


def test_bench_env_summary_uses_the_shared_strings(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    import _common

    monkeypatch.setattr(env, "cpu_model", lambda: "Some CPU")
    lines = _common.env_summary(repeats=2).splitlines()
    assert lines[0].startswith("cpu: Some CPU (") and lines[-1] == "repeats: 2"
    assert f"torch {env.package_version('torch')}" in lines[4]
