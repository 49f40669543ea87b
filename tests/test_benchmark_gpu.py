"""benchmarks/gpu.py: the CPU smoke mode's JSON (schema 1), the peak table, OOM rows, and a --quick GPU run."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu.py"

TOP_LEVEL = {"schema", "smoke", "device", "peak_tflops", "torch", "cuda", "cudnn", "hostname", "argv", "settings",
             "budget", "elapsed_s", "rows"}
ROW_KEYS = {"name", "config", "precision", "channels_last", "compile", "batch", "crop", "output_stride", "value",
            "unit", "status"}
EXTRA_KEYS = {
    "train_throughput": {"experiment", "backbone", "step_ms", "peak_memory_gib"},
    "train_mfu": {"experiment", "backbone", "step_ms", "tflop_per_step", "achieved_tflops", "peak_tflops"},
    "train_peak_memory": {"experiment", "backbone", "paper_batch"},
    "eval_ms_flip": {"experiment", "backbone", "ms_per_image", "scales", "flip"},
    "crf_torch": {"device", "height", "width", "labels", "iterations"},
    "crf_pydensecrf": {"device", "height", "width", "labels", "iterations"},
}
UNITS = {"train_throughput": "img/s", "train_mfu": "%", "train_peak_memory": "GiB", "eval_ms_flip": "img/s",
         "crf_torch": "ms/img", "crf_pydensecrf": "ms/img"}
HAS_PYDENSECRF = importlib.util.find_spec("pydensecrf") is not None


@contextlib.contextmanager
def script_module(path: Path, name: str):
    """A benchmark script as a module, registered under `name` while in use (first: dataclasses look
    themselves up in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module."""
    with script_module(SCRIPT, "benchmarks_gpu") as module:
        yield module


def run_script(tmp_path, *args, timeout):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    target = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(target), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(target.read_text())


def check_schema(result: dict, smoke: bool) -> None:
    assert set(result) == TOP_LEVEL
    assert result["schema"] == 1 and result["smoke"] is smoke
    assert set(result["budget"]) == {"warmup", "iterations", "eval_images", "crf_repeats", "pydensecrf_images"}
    assert set(result["elapsed_s"]) == {"train", "memory", "eval", "crf", "total"}
    names = {row["name"] for row in result["rows"]}
    assert names == set(UNITS) - (set() if HAS_PYDENSECRF else {"crf_pydensecrf"})
    for row in result["rows"]:
        assert set(row) == ROW_KEYS | EXTRA_KEYS[row["name"]], row
        assert row["unit"] == UNITS[row["name"]]
        assert row["precision"] in ("fp32", "bf16")
        if row["value"] is None:
            assert row["status"] in ("n/a", "OOM"), row
        else:
            assert row["status"] == "ok" and math.isfinite(row["value"]) and row["value"] > 0, row


@pytest.mark.slow
def test_smoke_mode_writes_schema_1(tmp_path):
    stdout, result = run_script(tmp_path, "--smoke", timeout=600)
    assert "no CUDA device: CPU smoke mode" in stdout
    check_schema(result, smoke=True)
    assert result["device"] == "cpu" and result["peak_tflops"] is None
    rows = result["rows"]
    by_name = {name: [r for r in rows if r["name"] == name] for name in UNITS}
    # 3 networks x (fp32, bf16 + channels_last) x batch 2; OS 8 memory x 2 precisions + v3's paper-batch row x 2
    assert len(by_name["train_throughput"]) == len(by_name["train_mfu"]) == 6
    assert {(r["experiment"], r["output_stride"]) for r in by_name["train_throughput"]} == {
        ("v3", 16), ("v3_train_os8", 8), ("v3plus", 16)}
    assert {(r["precision"], r["channels_last"]) for r in by_name["train_throughput"]} == {
        ("fp32", False), ("bf16", True)}
    assert len(by_name["train_peak_memory"]) == 4 and len(by_name["eval_ms_flip"]) == 2
    assert len(by_name["crf_torch"]) == 2 and len(by_name["crf_pydensecrf"]) == (1 if HAS_PYDENSECRF else 0)
    # on the CPU: every throughput and CRF row measured; MFU (no peak) and peak memory (no allocator) n/a
    assert all(r["status"] == "ok" for r in rows if r["name"] not in ("train_mfu", "train_peak_memory"))
    assert all(r["status"] == "n/a" for r in by_name["train_mfu"] + by_name["train_peak_memory"])
    assert all(r["tflop_per_step"] > 0 and r["achieved_tflops"] > 0 for r in by_name["train_mfu"])
    assert all(r["output_stride"] == 8 and r["flip"] and r["scales"] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
               for r in by_name["eval_ms_flip"])
    for row in rows:  # the printed table has every row
        assert f"| {row['name']} | {row['config']} |" in stdout


def test_peak_table_matches_device_names(gpu, monkeypatch):
    cuda = torch.device("cuda")
    expected = {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
                "NVIDIA H200": 989.5, "NVIDIA H200 NVL": 835.5, "NVIDIA A100-SXM4-80GB": 312.0,
                "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.05, "NVIDIA L40": 181.05, "NVIDIA L4": 121.0,
                "NVIDIA GeForce RTX 4090": 165.2, "NVIDIA A10": 125.0}
    for name, bf16 in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert gpu.peak_tflops(cuda)["bf16"] == bf16, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert gpu.peak_tflops(cuda) == {"bf16": None, "tf32": 15.7}
    for unknown in ("NVIDIA A10G", "NVIDIA GeForce GTX 1080", "Some Future GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=unknown: name)
        assert gpu.peak_tflops(cuda) is None, unknown
    assert gpu.peak_tflops(torch.device("cpu")) is None


def test_out_of_memory_rows_and_errors(gpu, monkeypatch):
    """A batch that runs out of memory reads "OOM", larger ones are not tried; other errors fail a smoke run
    but only mark the row in a GPU run."""
    tried = []

    def fake_step(spec, device, mode, batch, crop):
        tried.append((spec.name, mode.precision, batch))
        if batch >= 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return lambda: None

    monkeypatch.setattr(gpu, "training_step", fake_step)
    bench = gpu.Bench(torch.device("cpu"), smoke=True, budget=gpu.BUDGETS["smoke"], crop=65,
                      overrides=("model.backbone=resnet50",))
    gpu.memory_section(bench, [2, 4, 6])
    statuses = [(r["experiment"], r["precision"], r["batch"], r["status"]) for r in bench.rows]
    assert statuses == [("v3_train_os8", p, b, s) for p in ("fp32", "bf16") for b, s in ((2, "n/a"), (4, "OOM"),
                                                                                         (6, "OOM"))] + [
        ("v3", "fp32", 2, "n/a"), ("v3", "bf16", 2, "n/a")]
    assert ("v3_train_os8", "fp32", 6) not in tried and ("v3_train_os8", "fp32", 4) in tried
    assert all(r["value"] is None for r in bench.rows)

    def broken():
        raise RuntimeError("compiler failed")
    assert gpu.attempt(False, broken) == (None, "error: RuntimeError: compiler failed")
    with pytest.raises(RuntimeError):
        gpu.attempt(True, broken)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_gpu_run(tmp_path):
    stdout, result = run_script(tmp_path, "--quick", timeout=900)
    assert "smoke mode" not in stdout
    check_schema(result, smoke=False)
    assert result["device"] == torch.cuda.get_device_name()
    rows = result["rows"]
    assert all(r["status"] == "ok" for r in rows if r["name"] in ("eval_ms_flip", "crf_torch", "crf_pydensecrf"))
    assert all(r["device"] == "cuda" for r in rows if r["name"] == "crf_torch")
    measured = [r for r in rows if r["name"] == "train_peak_memory" and r["status"] == "ok"]
    assert measured and all(r["value"] > 0 for r in measured)
    if result["peak_tflops"]:
        assert all(0 < r["value"] < 100 for r in rows if r["name"] == "train_mfu" and r["value"] is not None)
