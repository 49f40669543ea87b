"""benchmarks/memory.py: the fake-tensor count of a training step's peak memory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeplab_lit.config import resolve_experiment
from deeplab_lit.models import build_model
from test_benchmark_gpu import script_module

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
RESNET50 = ("model.backbone=resnet50",)


@pytest.fixture(scope="module")
def memory():
    with script_module(SCRIPT, "benchmarks_memory") as module:
        yield module


def test_the_count_holds_the_network_and_activations_grow_with_the_batch(memory):
    with torch.device("meta"):
        network = build_model(resolve_experiment("v3", ["model.pretrained=none", *RESNET50]).config.model, 21)
    parameter_bytes = 4 * sum(p.numel() for p in network.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in network.buffers())
    two, four = (memory.count_peak("v3", batch, 97, RESNET50) for batch in (2, 4))
    for peak in (two, four):
        assert peak["parameters"] == parameter_bytes and peak["buffers"] == buffer_bytes
        assert peak["total"] >= peak["parameters"] + peak["activations"]
    assert four["activations"] == pytest.approx(2 * two["activations"], rel=0.01)  # saved tensors scale with N


def test_rows_are_experiment_and_batches(memory):
    assert memory.parse_rows(["v3_train_os8:1,6", "v3:16"]) == [("v3_train_os8", 1), ("v3_train_os8", 6), ("v3", 16)]
    with pytest.raises(ValueError, match="write EXPERIMENT:BATCH"):
        memory.parse_rows(["v3"])
    for rows in (["v3"], ["v4:2"]):
        with pytest.raises(SystemExit) as exit_info:
            memory.main(["--rows", *rows])
        assert exit_info.value.code == 2
