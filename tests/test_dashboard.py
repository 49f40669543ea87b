"""The dashboard: hand-written runs with per-image records, CSV logs and predictions give intervals, verdicts,
the overview, every figure, the synthetic-data section, confusion matrices on demand, W&B logging, the
W&B config's protocol columns, and the page in headless Chromium."""
import json
import re

import numpy as np
import pytest

from deeplab_lit import report
from deeplab_lit.config import resolve_experiment, to_dict
from deeplab_lit.errors import UserError
from deeplab_lit.protocols import MetricKey
from deeplab_lit.records import MetricResult, PerImageCounts, SummaryRecord
from deeplab_lit.report import stats
from deeplab_lit.report.browser import check_images, find_chromium
from deeplab_lit.report.curves import find_logs, read_csv_curves
from deeplab_lit.report.dashboard import build_dashboard

IMAGES = tuple(f"img{i:02d}" for i in range(40))
UNIONS = np.random.default_rng(0).integers(50, 150, (len(IMAGES), 21))


def counts(fraction, noise_seed=None, noise=0, classes=21):
    """Intersection = fraction x union (+ per-image noise), over the 40 images and the first `classes` classes
    (21: VOC, 6: the synthetic set)."""
    union = UNIONS[:, :classes]
    intersection = np.floor(fraction * union).astype(np.int64)
    if noise_seed is not None:
        intersection += np.random.default_rng(noise_seed).integers(-noise, noise + 1, union.shape)
    return PerImageCounts(IMAGES, np.clip(intersection, 0, union), union, np.diag(union.sum(0)))


def write_run(root, experiment, seed, by_metric, overrides=(), csv_rows=None, predictions=None, backbone=None):
    """A run directory as fit writes it: summary.json whose metrics are the counts' (exactly), per_image.npz,
    predictions/ and, if given, a CSVLogger metrics.csv."""
    spec = resolve_experiment(experiment, [f"seed={seed}", *overrides])
    keys = {key.text: (protocol, key) for protocol in spec.protocols for key in protocol.metric_keys()}
    results = {}
    for metric, found in by_metric.items():
        protocol, key = keys[MetricKey.parse(metric).text]
        per_class = dict(zip(spec.dataset.class_names, found.per_class_iou.tolist()))
        results[key.text] = MetricResult(miou=found.miou, pixel_acc=0.9, per_class_iou=per_class,
                                         protocol=protocol.describe(key.crf), per_image=found,
                                         predictions=predictions or {})
    config = to_dict(spec.config)
    if backbone:  # a backbone this branch cannot build (a timm: one): only the record says so
        config["model"]["backbone"] = backbone
    record = SummaryRecord(
        kind="fit", experiment=experiment, split="val", results=results, config=config,
        class_names=list(spec.dataset.class_names), seed=seed,
        overrides=[f"seed={seed}", *overrides, *([f"model.backbone={backbone}"] if backbone else [])],
        protocol={"train_output_stride": spec.config.model.output_stride, "effective_batch_size": 10},
        paper=to_dict(spec.config)["paper"], steps=spec.config.trainer["max_steps"])
    run_dir = root / experiment / f"{'-'.join(overrides) or 'default'}-seed{seed}"
    record.write(run_dir / "checkpoints" / "summary.json")
    if csv_rows:
        log = run_dir / "csv" / "version_0" / "metrics.csv"
        log.parent.mkdir(parents=True)
        log.write_text(csv_rows)
    return run_dir


# Lightning CSVLogger's format: header sorted by name, one line per logged step, empty cells elsewhere.
CSV = """epoch,lr-SGD,step,train/loss,val/mIoU,val/pixel_acc
0,0.01,0,2.5,,
0,0.007,4,1.5,,
0,,4,,0.31,0.8
0,0.004,9,1.1,,
0,,9,,0.52,0.9
"""


@pytest.fixture
def voc_runs(tmp_path):
    """v2 Table 3 on VOC val (hand-written counts), its ASPP-S on the synthetic set, and the demo."""
    root = tmp_path / "runs"
    same_after_crf = counts(0.70)
    for seed in (0, 1):
        write_run(root, "v2_largefov", seed, {"val/mIoU": counts(0.66, seed, 3), "val/mIoU_crf": same_after_crf},
                  csv_rows=CSV if seed == 0 else None)
        write_run(root, "aspp_s", seed, {"val/mIoU": counts(0.70, 10 + seed, 3), "val/mIoU_crf": same_after_crf})
    write_run(root, "aspp_l", 0, {"val/mIoU": counts(0.68, 20, 30), "val/mIoU_crf": counts(0.73)})
    write_run(root, "aspp_s", 0, {"val/mIoU": counts(0.3, classes=6), "val/mIoU_crf": counts(0.35, classes=6)},
              overrides=["data.name=synthetic"])
    write_run(root, "aspp_l", 0, {"val/mIoU": counts(0.32, classes=6), "val/mIoU_crf": counts(0.3, classes=6)},
              overrides=["data.name=synthetic"])
    write_run(root, "demo", 0, {"val/mIoU": counts(0.4, classes=6)}, csv_rows=CSV)
    # a timm: backbone swapped into a paper experiment: another network, not the paper's row
    write_run(root, "v3plus_1conv", 0, {"val/mIoU": counts(0.6)}, backbone="timm:convnext_tiny")
    return root


def test_csv_log_reader(tmp_path):
    first = tmp_path / "csv" / "version_0" / "metrics.csv"
    first.parent.mkdir(parents=True)
    first.write_text(CSV)
    curves = read_csv_curves(find_logs(tmp_path))
    assert curves["train/loss"] == [(0, 2.5), (4, 1.5), (9, 1.1)]
    assert curves["val/mIoU"] == [(4, 0.31), (9, 0.52)]
    assert curves["learning rate"] == [(0, 0.01), (4, 0.007), (9, 0.004)]
    # a resumed run writes a new version: its steps replace the older file's
    second = tmp_path / "csv" / "version_1" / "metrics.csv"
    second.parent.mkdir(parents=True)
    second.write_text("epoch,step,train/loss\n1,9,0.9\n1,12,0.8\n")
    import os

    os.utime(second, (first.stat().st_mtime + 10, first.stat().st_mtime + 10))
    assert read_csv_curves(find_logs(tmp_path))["train/loss"] == [(0, 2.5), (4, 1.5), (9, 0.9), (12, 0.8)]
    assert read_csv_curves(find_logs(tmp_path / "missing")) == {}


def test_intervals_and_verdicts_of_a_paper_table(voc_runs):
    dashboard = build_dashboard(report.load_local(voc_runs), [], bootstrap=stats.Bootstrap(2000, seed=0))
    result = next(s.result for s in dashboard.sections if s.result.table.id == "v2_table3_aspp")
    largefov, aspp_s, aspp_l = result.rows
    before = largefov.cells[0]
    # the cell's statistics over two seeds, in points, from the runs' own per-image counts
    runs = [r.per_image()["mIoU"] for r in before.runs]
    expected = stats.cell_stats(stats.Bootstrap(2000, seed=0), runs).scaled(100)
    assert before.stats == expected and before.stats.n == 2 and before.stats.interval.method == "images + seeds"
    assert before.stats.interval.low < before.mean < before.stats.interval.high
    assert aspp_l.cells[0].stats.interval.method == "images"  # one seed: the percentile interval
    claims = {(c.column, c.higher, c.lower): c for c in result.claims}
    # ASPP-S 70 % vs LargeFOV 66 % of every union: the paper's ordering, far outside the noise
    claim = claims["before CRF", "ASPP-S {2, 4, 8, 12}", "LargeFOV"]
    assert claim.paper == pytest.approx(66.98 - 65.76) and claim.verdict == stats.AGREES_SIGNIFICANT
    assert claim.interval.low > 0 and claim.difference.combined is not None
    # ASPP-L (about 66.2 %) below ASPP-S (69.5 %): the paper claims the opposite, significantly so here
    assert claims["before CRF", "ASPP-L {6, 12, 18, 24}", "ASPP-S {2, 4, 8, 12}"].verdict == \
        stats.DISAGREES_SIGNIFICANT
    # ASPP-L about 66.2 % with large per-image noise vs LargeFOV 65.7 %: the paper's sign, inside the noise
    noisy = claims["before CRF", "ASPP-L {6, 12, 18, 24}", "LargeFOV"]
    assert noisy.ours > 0 and noisy.interval.contains(0.0) and noisy.verdict == stats.AGREES_WITHIN_NOISE
    assert noisy.note == "images only (seed spread needs two seeds per row)"
    # after the CRF both rows have identical counts: difference 0, interval [0, 0], the paper's gap is not there
    same = claims["after CRF", "LargeFOV", "ASPP-S {2, 4, 8, 12}"]
    assert same.ours == 0 and (same.interval.low, same.interval.high) == (0, 0) and same.verdict == stats.DISAGREES
    # with CRF > without, per row: the same runs, paired
    crf = claims["columns", "LargeFOV · after CRF", "LargeFOV · before CRF"]
    assert crf.difference.paired_runs and crf.verdict == stats.AGREES_SIGNIFICANT
    # LargeFOV ~65.5 / 69.5 vs the paper's 65.76 / 69.84; ASPP-S and ASPP-L are off by more than a point before CRF
    assert [r.cells[0].within for r in result.rows] == [True, False, False] and result.rows_within == 1
    assert result.rows_compared == 3


def test_dashboard_page_sections_and_figures(voc_runs, tmp_path):
    out = tmp_path / "out"
    assert report.main(["--runs", str(voc_runs), "--out", str(out), "--confusion", "v2_table3_aspp/2",
                        "--resamples", "1000"]) == 0
    markdown = (out / "report.md").read_text()
    # the overview first, then the contents, the reading guide, the tables with runs
    assert markdown.index("## Overview") < markdown.index("## Contents") < markdown.index(
        "## How to read the significance column") < markdown.index("## v2 Table 3")
    # v2_largefov is also v2 Table 2's batch 10, 20K row
    assert ("3 of 25 paper tables have runs on the papers' image sets: v2_table2_recipe, v2_table3_aspp, "
            "crf_on_off.") in markdown
    assert "3 of 7 rows compared are within ±1 mIoU of the paper." in markdown  # LargeFOV in all three tables
    assert "Reproduced and significant: ASPP-S {2, 4, 8, 12} > LargeFOV (before CRF)" in markdown
    # 3 row pairs x 2 columns + 3 rows x (after CRF > before CRF)
    assert "| v2 Table 3: ASPP on VGG-16 (VOC val) | 3/3 | 1/3 | 5 | 2 | 1 | 1 | 0 |" in markdown
    # per run and protocol: its own interval over its 40 images
    assert re.search(r"\| ASPP-L \{6, 12, 18, 24\} \| before CRF \| 0 \| \d+\.\d\d \| \[\d+\.\d\d, \d+\.\d\d\] \| 40 \|",
                     markdown)
    figures = {p.relative_to(out / "figures").as_posix() for p in (out / "figures").rglob("*.png")}
    assert {"v2_table3_aspp.png", "v2_table3_aspp.claims.png", "v2_table3_aspp.heatmap.png",
            "v2_table3_aspp.curves.png", "v2_table3_aspp.confusion-2-before-crf.png",
            "v2_table3_aspp.confusion-2-after-crf.png", "other/demo.curves.png"} <= figures
    assert "v1_table2_fov.png" not in figures and "## Paper tables not run yet" in markdown
    for name in figures:
        assert f"](figures/{name})" in markdown
    # curves: logged for LargeFOV seed 0 only; the others say so
    assert ("- training curves: no curve logged: LargeFOV · seed 1, ASPP-S {2, 4, 8, 12} · seed 0, "
            "ASPP-S {2, 4, 8, 12} · seed 1, ASPP-L {6, 12, 18, 24} · seed 0") in markdown
    # VOC data is not on this machine: the qualitative panel says why
    assert "qualitative: image, ground truth, each row's prediction: no predictions saved" in markdown
    # the synthetic runs: their own section, no paper column, never in the paper rows
    section = markdown[markdown.index("## On the synthetic set"):markdown.index("## Runs in no paper table")]
    assert "| row | experiment | before CRF: ours | before CRF: 95 % interval |" in section
    assert "66.98" not in section and "paper" not in section.split("| row |")[1].split("\n")[0]
    assert "### v2 Table 3: ASPP on VGG-16 (the synthetic set)" in section and "| v1_7x7 |" not in section
    assert "| ASPP-S {2, 4, 8, 12} vs ASPP-L {6, 12, 18, 24} | before CRF |" in section
    paper_rows = markdown[markdown.index("## v2 Table 3"):markdown.index("## On the synthetic set")]
    assert "data.name=synthetic" not in paper_rows
    assert "| demo | 0 | the synthetic set |" in markdown
    assert "| v3plus_1conv | 0 | PASCAL VOC 2012 val | 59.61 | [59.59, 59.63] | 30000 | seed=0, model.backbone=timm:" \
        "convnext_tiny |" in markdown and "- v3plus_1conv: no curve logged" in markdown
    assert "| v3+ Table 1: decoder 1x1 projection width (one 3x3 conv, VOC val) | 0/5 |" in markdown
    page = (out / "report.html").read_text()
    assert len(re.findall(r"<img ", page)) == len(figures)
    assert "<td class='v-agrees-significant'>agrees, significant</td>" in page


def test_confusion_requests_are_checked(voc_runs, tmp_path):
    with pytest.raises(UserError, match="--confusion nope: no table 'nope'"):
        report.main(["--runs", str(voc_runs), "--out", str(tmp_path), "--confusion", "nope"])
    with pytest.raises(UserError, match=r"--confusion v2_table3_aspp/9: v2_table3_aspp has rows 1-3"):
        report.main(["--runs", str(voc_runs), "--out", str(tmp_path), "--confusion", "v2_table3_aspp/9"])
    with pytest.raises(UserError, match="--resamples 10: use at least 1000"):
        report.main(["--runs", str(voc_runs), "--out", str(tmp_path), "--resamples", "10"])


def test_a_per_image_file_that_does_not_reproduce_its_summary_is_left_out(voc_runs):
    path = next(voc_runs.glob("aspp_l/default-seed0/checkpoints/summary.json"))
    data = json.loads(path.read_text())
    data["results"]["mIoU"]["mIoU"] += 1e-9  # e.g. a summary rewritten by an older evaluation
    path.write_text(json.dumps(data))
    record = next(r for r in report.load_local(voc_runs) if r.summary_path == str(path))
    assert record.per_image() is None and "does not reproduce mIoU of its summary" in record.per_image_note


def test_log_wandb_logs_the_figures_and_claims(voc_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert report.main(["--runs", str(voc_runs), "--out", str(out), "--log-wandb", "ent/proj", "--wandb-mode",
                        "offline", "--resamples", "1000"]) == 0
    media = out.glob("wandb/offline-run-*/files/media")
    media = next(media)
    images = {re.sub(r"_\d+_[0-9a-f]+\.png$", "", p.name) for p in (media / "images" / "report").rglob("*.png")}
    assert {"v2_table3_aspp_chart", "v2_table3_aspp_claims_chart", "v2_table3_aspp_heatmap_chart",
            "v2_table3_aspp_curves_chart"} <= images
    claims = json.loads(next((media / "table" / "report").glob("v2_table3_aspp_claims_*.table.json")).read_text())
    assert claims["columns"] == report.render.WANDB_CLAIM_COLUMNS
    assert ["v2_table3_aspp", "ASPP-S {2, 4, 8, 12}", "LargeFOV", "before CRF"] in [line[:4] for line in claims["data"]]
    verdicts = {tuple(line[1:4]): line[9] for line in claims["data"]}
    assert verdicts["ASPP-S {2, 4, 8, 12}", "LargeFOV", "before CRF"] == "agrees, significant"
    table = json.loads(next((media / "table" / "report").glob("v2_table3_aspp_[0-9]*.table.json")).read_text())
    assert table["columns"][-6:] == ["ci_low", "ci_high", "ci_method", "image_std", "spread", "data"]


def test_wandb_source_reads_history_and_a_local_per_image_record(voc_runs, monkeypatch):
    import wandb

    path = next(voc_runs.glob("v2_largefov/default-seed0/checkpoints/summary.json"))
    data = json.loads(path.read_text())

    class Run:
        state, url, created_at = "finished", "https://wandb.ai/e/p/runs/x", "2026-01-01"
        config = {**data["config"], "protocol": data["protocol"], "overrides": data["overrides"]}
        summary_metrics = {**data["metrics"], "summary_json": str(path), "val/iou/disc": 0.5}

        def scan_history(self, keys):
            steps = {"train/loss": [(1, 2.0), (2, 1.0)], "val/mIoU": [(2, 0.4)], "lr-SGD": [(1, 0.01), (2, 0.005)]}
            return [{"trainer/global_step": s, keys[1]: v} for s, v in steps.get(keys[1], [])]

    class Api:
        def runs(self, path):
            return [Run()]

    monkeypatch.setattr(wandb, "Api", Api)
    (record,), _ = report.load_wandb("e/p")
    assert record.per_image()["mIoU"].miou == data["metrics"]["val/mIoU"]
    record.summary_path = None  # as on a machine without the run directory: W&B's history
    assert record.curves() == {"train/loss": [(1, 2.0), (2, 1.0)], "val/mIoU": [(2, 0.4)],
                               "learning rate": [(1, 0.01), (2, 0.005)]}
    assert record.per_class == {"mIoU": {"disc": 0.5}}


def test_wandb_config_carries_every_protocol_column():
    """What fit puts into the W&B config (training._fit: the resolved config + run_columns + overrides), flattened
    as the W&B UI groups it, has a key for every protocol column of the dashboard."""
    from types import SimpleNamespace

    from deeplab_lit.trainer import run_columns

    def flat(value, prefix=""):  # W&B shows nested config dicts as dotted keys
        if not isinstance(value, dict):
            return {prefix[:-1]: value}
        return {k: v for key, inner in value.items() for k, v in flat(inner, f"{prefix}{key}.").items()}

    spec = resolve_experiment("v3plus")
    trainer = SimpleNamespace(world_size=2, precision="bf16-mixed")
    config = flat({**spec.to_dict(), "protocol": run_columns(spec, trainer), "overrides": list(spec.overrides)})
    needed = {"protocol.train_output_stride", "protocol.eval_output_stride", "protocol.eval_scales",
              "protocol.eval_flip", "protocol.eval_mode", "protocol.crf.enabled", "protocol.bn_mode",
              "protocol.effective_batch_size", "protocol.init_source", "protocol.world_size", "protocol.precision",
              "model.backbone", "model.generation", "model.head", "model.decoder_channels", "model.decoder_convs",
              "model.multi_grid", "model.aspp_rates", "model.image_pooling", "model.output_stride", "data.name",
              "data.batch_size", "data.crop_size", "eval.protocols", "seed", "name", "ablation"}
    assert needed <= set(config), sorted(needed - set(config))
    assert config["protocol.effective_batch_size"] == 2 * spec.config.data.batch_size


def test_the_page_in_headless_chromium(voc_runs, tmp_path):
    """Every <img> of the rendered HTML decodes in a real browser (naturalWidth > 0)."""
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    out = tmp_path / "out"
    assert report.main(["--runs", str(voc_runs), "--out", str(out), "--resamples", "1000"]) == 0
    seen = check_images(out / "report.html")
    assert seen["images"] == len(list((out / "figures").rglob("*.png"))) and seen["broken"] == []
    assert min(seen["widths"]) > 100
    # and a page with a broken image is caught
    broken = out / "broken.html"
    broken.write_text("<html><body><img alt='x' src='data:image/png;base64,AAAA'></body></html>")
    assert check_images(broken)["broken"] == ["x"]


def test_honest_axes(voc_runs):
    """Bars start at 0; only VOC-level numbers (all far above 0) get a broken axis, drawn as two panels
    (a stub from 0 and the range of the numbers) with break marks, and the axis label says where; the error
    bars are the cells' 95 % intervals."""
    from deeplab_lit.report import figures

    assert figures.axis_break([65.76, 66.9, 71.57, 64.9]) == 55.0
    assert figures.axis_break([37.4, 54.6, 30.2]) == 0.0 and figures.axis_break([]) == 0.0
    assert figures.axis_break([44.0, 50.0]) == 0.0  # 35 would be a break, but less than BREAK_FROM
    records = report.load_local(voc_runs)
    voc = next(r for r in report.build_report(records, bootstrap=stats.Bootstrap(1000))
               if r.table.id == "v2_table3_aspp")
    top, stub = figures.bars_figure(voc).axes
    assert stub.get_ylim()[0] == 0 and top.get_ylim()[0] == 60.0 and "axis broken: 0 … 60" in top.get_ylabel()
    assert len(top.lines) >= 2  # the break marks
    cell = voc.rows[0].cells[0]
    error_bars = [c for c in top.containers if getattr(c, "has_yerr", False)]
    segments = error_bars[0].lines[2][0].get_segments()  # ours before CRF: 3 rows, LargeFOV first
    assert segments[0][0][1] == pytest.approx(cell.stats.interval.low)
    assert segments[0][1][1] == pytest.approx(cell.stats.interval.high)
    synthetic = report.build_report(records, data="the synthetic set", bootstrap=stats.Bootstrap(1000))
    (axes,) = figures.bars_figure(synthetic[0]).axes
    assert axes.get_ylim()[0] == 0 and axes.get_ylabel() == "mIoU (%), axis from 0"


def test_curves_of_a_moved_run_directory(voc_runs):
    """A runs/ directory copied to another machine: the summary's checkpoint path names the old place, the
    CSV log is found beside the summary all the same."""
    path = next(voc_runs.glob("v2_largefov/default-seed0/checkpoints/summary.json"))
    data = json.loads(path.read_text())
    data["checkpoint"] = "/elsewhere/runs/v2_largefov/default-seed0/checkpoints/best-step30000.ckpt"
    path.write_text(json.dumps(data))
    record = next(r for r in report.load_local(voc_runs) if r.summary_path == str(path))
    assert record.run_dir == path.parent.parent
    assert record.curves()["val/mIoU"] == [(4, 0.31), (9, 0.52)]
