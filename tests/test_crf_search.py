"""The CRF parameter search: the command on a real (2-step) checkpoint (grid, fine stage, outputs, sweep
mode), and `fit`'s `crf.search` protocol (v1/v2 Sec. 4.1) inside the final evaluation."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from deeplab_lit.config import CRFConfig, resolve_experiment
from deeplab_lit.crf.errors import CRFInputError
from deeplab_lit.crf_validation import (
    COARSE, coarse_ranges, coarse_to_fine, collect_unaries, confusion, fine_ranges, grid, miou_from_confusion,
    search_indices, with_best)
from deeplab_lit.errors import UserError
from deeplab_lit.records import SummaryRecord
from test_fit import FAST, cli, run_fit


def test_confusion_and_miou_match_a_direct_count():
    labels = np.array([[0, 1, 1], [2, 2, 0]])
    masks = np.array([[0, 1, 255], [2, 1, 0]])
    matrix = confusion(labels, masks, 3)
    assert matrix.tolist() == [[2, 0, 0], [0, 1, 1], [0, 0, 1]]  # rows: truth, columns: prediction
    assert miou_from_confusion(matrix) == pytest.approx(np.mean([1.0, 0.5, 0.5]))


def test_grids():
    points = grid({"bi_w": [3, 4], "bi_xy_std": [30], "bi_rgb_std": [3, 5]}, {"pos_w": 3})
    assert points == [
        {"pos_w": 3, "bi_w": 3, "bi_xy_std": 30, "bi_rgb_std": 3}, {"pos_w": 3, "bi_w": 3, "bi_xy_std": 30, "bi_rgb_std": 5},
        {"pos_w": 3, "bi_w": 4, "bi_xy_std": 30, "bi_rgb_std": 3}, {"pos_w": 3, "bi_w": 4, "bi_xy_std": 30, "bi_rgb_std": 5},
    ]
    assert fine_ranges({"bi_w": 4, "bi_xy_std": 50, "bi_rgb_std": 1}) == {
        "bi_w": [3.0, 3.5, 4.0, 4.5, 5.0], "bi_xy_std": [40.0, 45.0, 50.0, 55.0, 60.0], "bi_rgb_std": [1.0, 2.0, 3.0]
    }


@pytest.mark.slow
def test_search_end_to_end_and_sweep_mode(tmp_path):
    checkpoint = run_fit(tmp_path, "largefov", "crf.iterations=2", wandb_mode="disabled") / "checkpoints" / "last.ckpt"
    out = tmp_path / "search"
    result = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--images", "2", "--out", str(out),
                 "--bi-w", "3", "5", "--bi-xy-std", "30", "--bi-rgb-std", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "crf_search.csv")))
    coarse = [r for r in rows if r["stage"] == "coarse"]
    assert len(coarse) == 2 and {float(r["bi_w"]) for r in coarse} == {3.0, 5.0}
    assert len(rows) > 2 and all(float(r["pos_w"]) == 3.0 and float(r["pos_xy_std"]) == 3.0 for r in rows)  # fine stage; w2, σγ fixed
    report = json.loads((out / "crf_search.json").read_text())
    assert report["images"] == 2 and report["best"]["miou"] == max(float(r["miou"]) for r in rows)
    best = yaml.safe_load((out / "crf_best.yaml").read_text())["crf"]
    assert best["bi_w"] == report["best"]["bi_w"] and best["iterations"] == 2
    assert list(out.glob("crf_unaries_*.npz"))  # cached for the next run, as arrays (never a pickle)

    evaluated = cli("deeplab_lit.evaluate", "--checkpoint", str(checkpoint), "--crf-params", str(out / "crf_best.yaml"),
                    "--crf.enabled=true", "--trainer.limit_val_batches=2", "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["config"]["crf"]["bi_w"] == best["bi_w"]

    single = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--images", "2", "--out", str(out),
                 "--crf.bi_w=5", "--crf.bi_xy_std=30", "--crf.bi_rgb_std=3")
    assert single.returncode == 0, single.stderr[-2000:]
    line = json.loads(single.stdout.strip().splitlines()[-1])
    expected = next(float(r["miou"]) for r in coarse if float(r["bi_w"]) == 5.0)
    assert line["val/mIoU_crf"] == pytest.approx(expected, abs=1e-9)

    partial = cli("deeplab_lit.crf.search", "--checkpoint", str(checkpoint), "--crf.bi_w=5")
    assert partial.returncode == 2 and "give all three" in partial.stderr


# --- fit's crf.search ---------------------------------------------------------------------------------

SEARCH = ["crf.enabled=true", "crf.search=true"]


def test_with_best_is_a_new_checked_object_with_only_the_searched_values_changed():
    crf = CRFConfig(enabled=True, search=True, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0)
    found = with_best(crf, {"bi_w": 5, "bi_xy_std": 30.0, "bi_rgb_std": 5.0, "pos_w": 99.0, "iterations": 1})
    assert type(found) is CRFConfig and found is not crf and crf.bi_w == 4.0  # the original is untouched
    assert (found.bi_w, found.bi_xy_std, found.bi_rgb_std) == (5.0, 30.0, 5.0)
    assert found == dataclasses.replace(crf, bi_w=5.0, bi_xy_std=30.0, bi_rgb_std=5.0)  # w2, σγ, iterations kept
    with pytest.raises(CRFInputError, match="crf.bi_xy_std"):
        with_best(crf, {"bi_w": 5.0, "bi_xy_std": 0.0, "bi_rgb_std": 5.0})


def test_the_search_grid_is_the_configs_and_the_commands_default():
    assert coarse_ranges(CRFConfig()) == COARSE
    assert COARSE["bi_w"] == [3, 4, 5, 6, 8, 10] and COARSE["bi_xy_std"] == list(range(30, 121, 10))
    spec = resolve_experiment("largefov", [*SEARCH, "crf.search_bi_w=[3,5]", "crf.search_bi_xy_std=[30]"])
    assert coarse_ranges(spec.config.crf) == {"bi_w": [3.0, 5.0], "bi_xy_std": [30.0],
                                              "bi_rgb_std": COARSE["bi_rgb_std"]}


@pytest.mark.parametrize("override, message", [
    ("crf.search_images=0", "crf.search_images=0"),
    ("crf.search_bi_w=[]", "crf.search_bi_w=[]: give at least one value"),
    ("crf.search_bi_w=[-1]", "crf.search_bi_w=-1.0 must be"),
    ("crf.search_bi_xy_std=[0]", "crf.search_bi_xy_std=0.0 must be a positive number"),
    ("crf.search_bi_rgb_std=[3,-2]", "crf.search_bi_rgb_std=-2.0 must be a positive number"),
])
def test_search_keys_are_checked_with_one_line_naming_the_key(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_experiment("largefov", [*SEARCH, override])
    resolve_experiment("largefov", ["crf.enabled=false", "crf.search=true", override])  # no search: not checked


def test_summary_record_carries_the_search_and_reads_records_without_it(tmp_path):
    search = {"images": 2, "indices": [0, 59], "best": {"bi_w": 5.0}, "best_miou": 0.5, "miou_without_crf": 0.4,
              "settings": 2, "note": "..."}
    record = SummaryRecord(kind="fit", experiment="largefov", split="val", results={}, config={}, class_names=["a"],
                           crf_search=search)
    assert SummaryRecord.read(record.write(tmp_path / "summary.json")).crf_search == search
    old = dataclasses.replace(record, crf_search=None).to_json()
    assert "crf_search" not in old  # absent when unused, as best_on_val: version-2 files of before still read
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert SummaryRecord.read(tmp_path / "old.json").crf_search is None


class RandomClassifier(Callback):
    """At the end of training, a random classifier (seeded): two steps from scratch predict background
    everywhere, where every CRF setting ties; these final weights give noisy labels that the CRF settings
    clean up by different amounts, so the search has one best setting to find."""

    def on_train_end(self, trainer, module):
        last = [m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 6][-1]
        with torch.no_grad():
            last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)


@pytest.mark.slow
def test_fit_searches_the_crf_on_val_images_and_reports_with_the_values_found(tmp_path, monkeypatch, capsys):
    """`fit` with crf.search: the values in summary.json are those coarse_to_fine finds on the same images
    with the final model, recomputed here independently; every CRF of the final evaluation used them, and
    `evaluate` with them given explicitly reproduces mIoU_crf exactly."""
    import deeplab_lit.crf as crf_package
    from datamodules import build_datamodule
    from deeplab_lit import training
    from deeplab_lit.checkpoints import load_run
    from deeplab_lit.evaluate import main as evaluate_main

    used = []  # the CRF parameters of every dense_crf call of the final evaluation
    dense_crf, run_evaluation = crf_package.dense_crf, training.run_evaluation

    def spy(probs, images, params=None, **kwargs):
        used.append(params)
        return dense_crf(probs, images, params=params, **kwargs)

    def final_evaluation(*args, **kwargs):
        used.clear()  # the validation during training used the config's values, as it should
        return run_evaluation(*args, **kwargs)

    monkeypatch.setattr(crf_package, "dense_crf", spy)
    monkeypatch.setattr(training, "run_evaluation", final_evaluation)
    # A grid that excludes the experiment's own values (largefov: w1 4, σα 121, σβ 5), coarse only: fast.
    ranges = {"bi_w": [3.0, 6.0], "bi_xy_std": [30.0, 80.0], "bi_rgb_std": [3.0]}
    overrides = [*FAST, "wandb.mode=disabled", *SEARCH, "crf.search_images=2", "crf.iterations=2",
                 "crf.search_bi_w=[3,6]", "crf.search_bi_xy_std=[30,80]", "crf.search_bi_rgb_std=[3]",
                 "crf.search_fine=false"]
    run_dir = tmp_path / "largefov"
    assert training.train(resolve_experiment("largefov", overrides), run_dir=str(run_dir),
                          callbacks=[RandomClassifier()]) == 0
    checkpoints = run_dir / "checkpoints"
    summary = json.loads((checkpoints / "summary.json").read_text())
    search = summary["crf_search"]
    assert search["images"] == 2 and search["settings"] == 4 and "also in the reported val" in search["note"]

    loaded = load_run(checkpoints / "model.pt")
    datamodule = build_datamodule(loaded.spec.config.data)
    datamodule.setup("validate")
    dataset = datamodule.val_dataset
    indices = search_indices(len(dataset), 2)
    assert search["indices"] == indices == [0, len(dataset) - 1]
    entries = collect_unaries(loaded.network("cpu").eval(), dataset, loaded.spec.protocols[0], indices, "cpu",
                              loaded.spec.dataset.mean, loaded.spec.dataset.std)
    fixed = {"iterations": 2, "pos_w": 3.0, "pos_xy_std": 3.0}
    direct = coarse_to_fine(entries, loaded.spec.dataset.num_classes, fixed, "cpu", ranges, fine=False)
    assert search["best"] == direct.best
    assert direct.rows[0]["miou"] > direct.rows[1]["miou"] and direct.best_miou > direct.miou_without_crf  # no tie
    assert (search["best_miou"], search["miou_without_crf"]) == (direct.best_miou, direct.miou_without_crf)

    searched = {name: direct.best[name] for name in ("bi_w", "bi_xy_std", "bi_rgb_std")}
    assert used and all({name: getattr(p, name) for name in searched} == searched for p in used)
    assert all((p.pos_w, p.pos_xy_std, p.iterations) == (3.0, 3.0, 2) for p in used)
    printed = capsys.readouterr().out
    assert f"CRF search (v1/v2 Sec. 4.1) on 2 val images, 4 settings: w1={searched['bi_w']:g}," in printed

    # model.pt carries the values found: evaluate (and predict, the load API) refine with them.
    assert {name: getattr(load_run(checkpoints / "model.pt").spec.config.crf, name) for name in searched} == searched
    out = tmp_path / "explicit.json"
    assert evaluate_main(["--checkpoint", str(checkpoints / "model.pt"), "--trainer.limit_val_batches=2",
                          "--json", str(out)]) == 0
    explicit = json.loads(out.read_text())["results"]
    assert explicit["mIoU_crf"]["mIoU"] == summary["results"]["mIoU_crf"]["mIoU"]
    assert explicit["mIoU"]["mIoU"] == summary["results"]["mIoU"]["mIoU"]



def _rank(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: `_from_rank_zero` as `fit`'s CRF search calls it, succeeding, then failing."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from deeplab_lit.training import _from_rank_zero

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer, outcomes, computed_here = SimpleNamespace(is_global_zero=rank == 0), [], []

    def compute(fail):
        computed_here.append(rank)
        if fail:
            raise ValueError("no val images")
        return {"best": {"bi_w": 5.0}}

    try:
        for fail in (False, True):
            try:
                outcomes.append(["value", _from_rank_zero(trainer, lambda fail=fail: compute(fail))])
            except Exception as error:  # noqa: BLE001 - the outcome is the test's subject
                outcomes.append(["error", f"{type(error).__name__}: {error}"])
    finally:
        dist.destroy_process_group()
    with open(f"{out}/{rank}.json", "w") as stream:
        json.dump({"outcomes": outcomes, "computed": computed_here}, stream)


@pytest.mark.slow
def test_rank_zero_searches_and_every_rank_gets_its_result_or_its_failure(tmp_path):
    """Under DDP only rank 0 runs the search; the other rank receives its values, or stops with its error
    instead of waiting in the broadcast (two gloo processes on CPU)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert zero["computed"] == [0, 0] and one["computed"] == []  # computed on rank 0 only
    value = ["value", {"best": {"bi_w": 5.0}}]
    assert zero["outcomes"] == [value, ["error", "ValueError: no val images"]]
    stopped = "RuntimeError: rank 0 failed (the other ranks stop too): ValueError: no val images"
    assert one["outcomes"] == [value, ["error", stopped]]
