"""The ablation report: aggregation maths on hand-written summaries, W&B as a source (its API replaced
at the boundary, `wandb.Api`), offline W&B logging, the rendered pages, and real 2-step fits."""
import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from deeplab_lit import report
from deeplab_lit.config import resolve_experiment, to_dict
from deeplab_lit.errors import UserError
from deeplab_lit.protocols import MetricKey
from deeplab_lit.records import MetricResult, SummaryRecord

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def summary(experiment, seed, metrics, overrides=(), steps=None, protocols=True, world_size=1,
            init="imagenet (torchvision)"):
    """A summary.json as fit writes it, for `experiment` resolved with `overrides`."""
    spec = resolve_experiment(experiment, [f"seed={seed}", *overrides])
    cfg = spec.config
    by_key = {key.text: (protocol, key) for protocol in spec.protocols for key in protocol.metric_keys()}
    results = {}
    for name, value in metrics.items():
        protocol, key = by_key[MetricKey.parse(name).text]
        results[key.text] = MetricResult(miou=value, pixel_acc=0.9, per_class_iou={}, protocol=protocol.describe(key.crf))
    return SummaryRecord(
        kind="fit", experiment=experiment, split="val", results=results, config=to_dict(cfg),
        class_names=list(spec.dataset.class_names), seed=seed, description=cfg.description, ablation=cfg.ablation,
        overrides=[f"seed={seed}", "wandb.mode=online", *overrides],
        protocol={"train_output_stride": cfg.model.output_stride, "eval_output_stride": spec.protocols[0].output_stride,
                  "eval_mode": cfg.eval.mode, "eval_scales": list(cfg.eval.scales), "eval_flip": cfg.eval.flip,
                  "crf": to_dict(cfg)["crf"], "bn_mode": cfg.model.bn,
                  "effective_batch_size": cfg.data.batch_size * world_size, "init_source": init,
                  "world_size": world_size, "precision": "bf16-mixed"},
        paper=to_dict(cfg)["paper"], steps=cfg.trainer["max_steps"] if steps is None else steps).to_json()


def write(root, name, data):
    path = root / data["experiment"] / f"{name}-seed{data['seed']}" / "checkpoints" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


V3_PROTOCOL_METRICS = {"val/mIoU": 0.772, "val/mIoU_os8": 0.786, "val/mIoU_os8_ms": 0.791,
                       "val/mIoU_os8_ms_flip": 0.795}


@pytest.fixture
def runs(tmp_path):
    """Hand-written runs whose aggregates are worked out in the tests below."""
    root = tmp_path / "runs"
    write(root, "a", summary("v2_largefov", 0, {"val/mIoU": 0.655, "val/mIoU_crf": 0.700}))
    write(root, "a", summary("v2_largefov", 1, {"val/mIoU": 0.662, "val/mIoU_crf": 0.690}))
    # a second run of seed 1 that stopped early (a debug run): set aside for the full one
    write(root, "0debug", summary("v2_largefov", 1, {"val/mIoU": 0.10, "val/mIoU_crf": 0.11},
                             overrides=["trainer.max_steps=2"], steps=2))
    write(root, "a", summary("aspp_s", 0, {"val/mIoU": 0.671, "val/mIoU_crf": 0.695},
                             overrides=["crf.enabled=true"]))  # a no-op override: not a recipe change
    write(root, "a", summary("aspp_s", 1, {"val/mIoU": 0.667, "val/mIoU_crf": 0.699}))
    # ASPP-L not run
    write(root, "a", summary("v3", 0, V3_PROTOCOL_METRICS))
    write(root, "w8", summary("v3plus_1conv", 0, {"val/mIoU": 0.775}, overrides=["model.decoder_channels=8"]))
    write(root, "w48", summary("v3plus_1conv", 0, {"val/mIoU": 0.781}))  # 48 wide: Table 1 and Table 2
    write(root, "c2", summary("v3plus_1conv", 0, {"val/mIoU": 0.779}, overrides=["model.decoder_convs=2"]))
    write(root, "a", summary("v3plus", 1, {"val/mIoU": 0.787, "val/mIoU_os8": 0.79}))
    write(root, "a", summary("v2_r101_msc_coco", 0, {"val/mIoU": 0.70}, world_size=2))
    write(root, "a", summary("demo", 0, {"val/mIoU": 0.14}, overrides=["trainer.max_steps=2"]))
    return root


def by_id(results):
    return {r.table.id: r for r in results}


def test_mean_std_n_and_difference_per_row(runs):
    tables = by_id(report.build_report(report.load_local(runs)))
    largefov, aspp_s, aspp_l = tables["v2_table3_aspp"].rows
    before, after = largefov.cells
    # seeds 0 and 1: 65.5 and 66.2 (the 2-step run of seed 1 is set aside), after CRF 70.0 and 69.0
    assert before.values == pytest.approx([65.5, 66.2]) and before.n == 2
    assert before.mean == pytest.approx(65.85) and before.std == pytest.approx(0.7 / 2 ** 0.5)
    assert before.paper == 65.76 and before.diff == pytest.approx(0.09)
    assert after.mean == pytest.approx(69.5) and after.std == pytest.approx(1 / 2 ** 0.5) and after.paper == 69.84
    assert [r.steps for r in largefov.runs] == [20000, 20000]
    assert largefov.notes == ["1 more run(s) of the same seed(s) set aside"]
    assert aspp_s.cells[0].mean == pytest.approx(66.9) and aspp_s.notes == []  # crf.enabled=true changed nothing
    assert aspp_l.runs == [] and aspp_l.notes == ["not run"] and aspp_l.cells[0].mean is None
    assert aspp_l.cells[0].paper == 68.96 and aspp_l.cells[1].paper == 71.57


def test_ordering_and_deltas_against_the_paper(runs):
    result = by_id(report.build_report(report.load_local(runs)))["v2_table3_aspp"]
    before, after = result.agreements
    # before CRF: paper ASPP-S 66.98 > LargeFOV 65.76, ours 66.90 > 65.85: agrees; ASPP-L not run, left out
    assert before.labels == ["LargeFOV", "ASPP-S {2, 4, 8, 12}"] and before.pairs == (1, 1) and before.agrees
    assert before.kendall_tau == pytest.approx(1.0)
    # after CRF: paper LargeFOV 69.84 > ASPP-S 69.73, ours 69.50 < 69.70: differs
    assert after.pairs == (0, 1) and not after.agrees and after.kendall_tau == pytest.approx(-1.0)
    assert after.deltas() == [("ASPP-S {2, 4, 8, 12}", pytest.approx(69.73 - 69.84), pytest.approx(0.2))]
    lines = report.agreement_lines(result)
    assert lines[0] == ("Ordering (before CRF): paper ASPP-S {2, 4, 8, 12} > LargeFOV; ours ASPP-S {2, 4, 8, 12} > "
                        "LargeFOV — agrees (1/1 pairs, Kendall τ = 1.00)")
    assert lines[3] == "Deltas vs LargeFOV (after CRF): ASPP-S {2, 4, 8, 12}: paper -0.11, ours +0.20 (sign differs)"
    assert lines[4] == ("after CRF − before CRF: LargeFOV: paper +4.08, ours +3.65; "
                        "ASPP-S {2, 4, 8, 12}: paper +2.75, ours +2.80")


def test_pairs_and_tau_of_three_rows_with_a_paper_tie():
    # paper: a = b > c (tie a-b is not compared); ours: b > a > c -> pairs (a,c) and (b,c) agree
    agreement = report.Agreement("x", ["a", "b", "c"], [70.0, 70.0, 60.0], [65.0, 66.0, 50.0])
    assert agreement.pairs == (2, 2) and agreement.agrees
    assert agreement.order(agreement.paper) == "a = b > c" and agreement.order(agreement.ours) == "b > a > c"
    # three rows, one discordant pair of three: tau = (2 - 1) / 3
    swapped = report.Agreement("x", ["a", "b", "c"], [3.0, 2.0, 1.0], [3.0, 1.0, 2.0])
    assert swapped.pairs == (2, 3) and swapped.kendall_tau == pytest.approx(1 / 3)


def test_protocol_rows_overrides_and_notes(runs):
    records = report.load_local(runs)
    tables = by_id(report.build_report(records))
    inference = tables["v3_table6_inference"]
    # the COCO-pretrained row (v3_coco) has no run in this directory: its cell stays empty beside the paper's
    assert [r.cells[0].mean for r in inference.rows] == pytest.approx([77.2, 78.6, 79.1, 79.5, None])
    assert [r.cells[0].paper for r in inference.rows] == [77.21, 78.51, 79.45, 79.77, 82.70]
    assert inference.agreements[0].agrees
    # each metric's protocol as the summary records it
    v3 = next(r for r in records if r.experiment == "v3")
    assert report.describe_protocol(v3, "val/mIoU_os8_ms_flip") == \
        "train OS 16 · eval OS 8 · 6 scales 0.5-1.75 · flip · batch 16 · imagenet (torchvision)"
    assert inference.rows[0].protocol == "train OS 16 · eval OS 16 · batch 16 · imagenet (torchvision)"
    train_os = tables["v3_table10_train_os"].rows[1]
    assert [c.mean for c in train_os.cells] == pytest.approx([77.2, 78.6])
    assert [c.paper for c in train_os.cells] == [77.21, 78.51]

    decoder = tables["v3plus_table1_decoder"].rows
    assert [(r.row.label, r.cells[0].mean, r.cells[0].paper) for r in decoder if r.runs] == [
        ("1x1 width 8", pytest.approx(77.5), 77.61), ("1x1 width 48", pytest.approx(78.1), 78.21)]
    assert decoder[0].notes == []  # the row's own key is not a recipe change
    one, two, three, *variants = tables["v3plus_table2_decoder_convs"].rows
    assert [r.row.label for r in variants] == ["one [3x3, 128]", "one [1x1, 256]",
                                               "Conv3 + Conv2, one [3x3, 256] each"]
    assert all(r.runs == [] and r.cells[0].paper is not None for r in variants)
    assert one.cells[0].mean == pytest.approx(78.1) and one.cells[0].paper == 78.21
    assert two.cells[0].values == pytest.approx([77.9, 78.7]) and two.cells[0].paper == 78.85  # two experiments
    assert {r.experiment for r in two.runs} == {"v3plus_1conv", "v3plus"} and three.runs == []

    coco = tables["v2_table4_resnet"].rows[2]
    assert coco.notes == ["paper: MS-COCO pre-trained weights; ours: imagenet (torchvision)",
                          "effective batch 20 (2 GPUs x 10), recipe 10"]
    assert [r.experiment for r in report.unmatched(records)] == ["demo"]


def test_markdown_and_self_contained_html(runs, tmp_path):
    code = report.main(["--runs", str(runs), "--out", str(tmp_path / "out")])
    assert code == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    # no per-image records in these hand-written summaries: no intervals, the rest as before
    assert ("| LargeFOV | v2_largefov | 65.76 | 65.85 ± 0.49 | — | +0.09 | — | 69.84 | 69.50 ± 0.71 | — | -0.34 | — | "
            "2 | train OS 8 · eval OS 8 · batch 10 · imagenet (torchvision) | "
            "1 more run(s) of the same seed(s) set aside |") in markdown
    assert ("| ASPP-L {6, 12, 18, 24} | aspp_l | 68.96 | not run | — | — | — | 71.57 | not run | — | — | — | 0 | — | "
            "not run |" in markdown)
    assert "`v2_table3_aspp`: 2/3 rows run; 2/2 within ±1 of the paper." in markdown
    assert ("| ASPP-S {2, 4, 8, 12} > LargeFOV | before CRF | +1.22 | +1.05 | — | agrees (no interval) |"
            in markdown)
    assert "| LargeFOV > ASPP-S {2, 4, 8, 12} | after CRF | +0.11 | -0.20 | — | disagrees (no interval) |" in markdown
    assert "| demo | 0 | the synthetic set | 14.00 | — | 2 | seed=0, wandb.mode=online, trainer.max_steps=2 |" in markdown
    # v2_largefov is also v2 Table 2's 20K row; v3 the reference row of v3 Tables 8 and 9
    ran = {"v2_table2_recipe", "v2_table3_aspp", "v2_table4_resnet", "crf_on_off", "v3_table5_aspp",
           "v3_table6_inference", "v3_table8_training", "v3_table9_batch", "v3_table10_train_os",
           "v3plus_table1_decoder", "v3plus_table2_decoder_convs", "v3plus_table3_inference"}
    for table in report.TABLES:
        assert f"](#{table.id})" in markdown  # every table in the contents
        # a chart for the tables with runs; the others are listed with their paper numbers
        assert (f"](figures/{table.id}.png)" in markdown) == (table.id in ran), table.id
    assert "## Paper tables not run yet" in markdown and "| 7x7, rate 4, 4096 wide | v1_7x7 | 64.38 | 67.64 |" in markdown
    page = (tmp_path / "out" / "report.html").read_text()
    sources = re.findall(r"(?:src|href)='([^'#]*)'", page)
    figures = sorted((tmp_path / "out" / "figures").rglob("*.png"))
    assert len(sources) == len(figures) and all(s.startswith("data:image/png;base64,") for s in sources)
    figure = tmp_path / "out" / "figures" / "v2_table3_aspp.png"
    embedded = [base64.b64decode(s.split(",", 1)[1]) for s in sources]
    assert figure.read_bytes() in embedded
    image = Image.open(io.BytesIO(figure.read_bytes()))
    assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400


def test_command_line_errors_are_one_line(tmp_path):
    broken = tmp_path / "runs" / "x" / "checkpoints" / "summary.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    for args, message in [
        (["--runs", str(tmp_path / "missing")], f"error: --runs {tmp_path / 'missing'}: no such directory"),
        (["--runs", str(tmp_path / "runs")], f"error: {broken}: not a summary.json written by deeplab_lit.fit"),
        (["--sweep", "abc"], "error: --sweep ID needs --wandb ENTITY/PROJECT"),
        ([], "error: give --runs DIR (local run directories) and/or --wandb ENTITY/PROJECT"),
    ]:
        result = subprocess.run([sys.executable, "-m", "deeplab_lit.report", *args], capture_output=True, text=True,
                                env=ENV, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith(message), args


# ---------------------------------------------------------------------------------------------------
# W&B as a source: `wandb.Api` replaced by an object with the public API's surface (Api.runs,
# Api.sweep(path).runs; Run.state, .config, .summary_metrics, .url, .created_at).


class FakeRun:
    def __init__(self, data, state="finished", number=0):
        self.state = state
        # what fit's WandbLogger stores: the resolved experiment + protocol + overrides, plus the
        # sweep's flat parameters that W&B adds to a sweep run's config
        self.config = {**data["config"], "protocol": data["protocol"], "overrides": data["overrides"],
                       "experiment": data["experiment"], "wandb.mode": "online"}
        self.summary_metrics = {**data["metrics"], "trainer/global_step": data["steps"], "_step": 7}
        self.url = f"https://wandb.ai/ent/proj/runs/run{number}"
        self.created_at = f"2026-01-0{number + 1}T00:00:00"


class FakeApi:
    calls = []
    runs_by_path = {}

    def __init__(self):
        FakeApi.calls.append(("Api",))

    def runs(self, path):
        FakeApi.calls.append(("runs", path))
        return FakeApi.runs_by_path[path]

    def sweep(self, path):
        FakeApi.calls.append(("sweep", path))
        return type("Sweep", (), {"runs": FakeApi.runs_by_path[path]})()


@pytest.fixture
def fake_wandb(monkeypatch):
    import wandb

    FakeApi.calls = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    return FakeApi


def test_wandb_runs_give_the_same_report_as_local_summaries(fake_wandb, runs):
    local = report.load_local(runs)
    datas = [json.loads(Path(r.source).read_text()) for r in local]
    fake_wandb.runs_by_path["ent/proj/sw1234"] = [FakeRun(d, number=i % 9) for i, d in enumerate(datas)] + [
        FakeRun(datas[0], state="running"), FakeRun(datas[0], state="crashed")]
    records, skipped = report.load_wandb("ent/proj", "sw1234")
    assert fake_wandb.calls == [("Api",), ("sweep", "ent/proj/sw1234")]
    assert skipped == {"running": 1, "crashed": 1} and len(records) == len(local)
    from_wandb, from_disk = by_id(report.build_report(records)), by_id(report.build_report(local))
    for table_id, result in from_disk.items():
        for ours, theirs in zip(result.rows, from_wandb[table_id].rows):
            assert [c.values for c in ours.cells] == [c.values for c in theirs.cells], (table_id, ours.row.label)
            assert ours.protocol == theirs.protocol and ours.notes == theirs.notes
    assert records[0].source.startswith("https://wandb.ai/ent/proj/runs/")


def test_wandb_project_without_sweep_and_api_errors(fake_wandb, runs, tmp_path, capsys):
    data = json.loads(next(runs.rglob("summary.json")).read_text())
    fake_wandb.runs_by_path["ent/proj"] = [FakeRun(data)]
    assert report.main(["--wandb", "ent/proj", "--out", str(tmp_path / "out")]) == 0
    assert fake_wandb.calls[-1] == ("runs", "ent/proj")
    assert "Sources: W&B ent/proj (1 finished runs)." in (tmp_path / "out" / "report.md").read_text()

    class Unreachable(FakeApi):
        def runs(self, path):
            raise ConnectionError("Max retries exceeded with url: /graphql\n(Caused by NewConnectionError)")

    import wandb

    wandb.Api = Unreachable
    with pytest.raises(UserError) as error:
        report.load_wandb("ent/proj")
    assert str(error.value) == ("--wandb ent/proj: ConnectionError: Max retries exceeded with url: /graphql (Caused "
                                "by NewConnectionError); check `wandb login` and the path, or build the report from "
                                "--runs DIR")
    with pytest.raises(UserError, match="expected ENTITY/PROJECT"):
        report.load_wandb("just-a-project")


def test_log_wandb_writes_every_table_to_an_offline_run(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert report.main(["--runs", str(runs), "--out", str(out), "--log-wandb", "ent/proj", "--wandb-mode", "offline"]) == 0
    tables = sorted(out.glob("wandb/offline-run-*/files/media/table/report/*.table.json"))
    names = sorted(re.sub(r"_\d+_[0-9a-f]+\.table\.json$", "", p.name) for p in tables)
    assert [n for n in names if not n.endswith(("_claims", "_runs")) and n not in ("overview", "others")] == sorted(
        t.id for t in report.TABLES)
    assert {"overview", "v2_table3_aspp_claims", "v2_table3_aspp_runs", "others"} <= set(names)
    aspp = json.loads(next(p for p in tables if p.name.startswith("v2_table3_aspp_")).read_text())
    assert aspp["columns"] == report.WANDB_COLUMNS
    assert aspp["data"][0][:10] == ["v2_table3_aspp", "LargeFOV", "v2_largefov", "before CRF", "val/mIoU", 65.76,
                                    65.85, round(0.7 / 2 ** 0.5, 4), 2, 0.09]
    assert aspp["data"][1][10] == "train OS 8 · eval OS 8 · CRF · batch 10 · imagenet (torchvision)"
    assert len(list(out.glob("wandb/offline-run-*/files/media/html/report/page_*.html"))) == 1


# ---------------------------------------------------------------------------------------------------
# Plan: runs and GPU hours of the sweep files


def test_every_table_is_trained_by_its_sweep_file():
    for table in report.TABLES:
        points = [p for name in table.sweeps for p in report.grid_points(yaml.safe_load(
            (REPO / "sweeps" / name).read_text()))]
        configs = [report.point_config(point) for point in points]
        records = [report.RunRecord(cfg.name, cfg.seed, to_dict(cfg), {}) for cfg in configs]
        for table_row in table.rows:
            seeds = {r.seed for r in records if report.matches(r, table_row)}
            assert len(seeds) >= 2, f"{table.sweeps} do not train '{table_row.label}' of {table.id} twice"


def test_plan_counts_runs_and_training_flops(tmp_path):
    from deeplab_lit.model_summary import summarize

    (tmp_path / "aspp.yaml").write_text((REPO / "sweeps" / "aspp.yaml").read_text())
    result = report.plan(tmp_path, tflops=100.0)
    assert result.distinct_runs == 6 and result.sweeps[0][:2] == ["aspp.yaml", "6"]
    lines = {line[0]: line for line in result.tables}
    assert lines["v2 Table 3: ASPP on VGG-16 (VOC val)"][1:3] == ["aspp.yaml", "6"]
    assert lines["v2 Table 3: ASPP on VGG-16 (VOC val)"][4] == (
        "LargeFOV 65.76/69.84 · ASPP-S {2, 4, 8, 12} 66.98/69.73 · ASPP-L {6, 12, 18, 24} 68.96/71.57")
    assert lines["v1 Table 2: field of view of fc6 (VGG-16, VOC val)"][2] == "0"  # its sweep file is not there
    # the costliest run is ASPP-L; its training alone, from the summary command's MACs (a real forward):
    # 3 x forward x batch x steps; validation every 1,000 steps and the final evaluation come on top
    gmacs = summarize(resolve_experiment("aspp_l"), [321])["gmacs"]["321x321"]
    train_hours = 6 * gmacs * 1e9 * 10 * 20000 / 100e12 / 3600
    low, high = map(float, result.sweeps[0][2].split("-"))
    assert train_hours < high < train_hours * 1.5
    assert float(result.sweeps[0][3]) == pytest.approx(result.gpu_hours, abs=0.05)


# ---------------------------------------------------------------------------------------------------
# Real runs: 2-step fits of paper experiments on the synthetic data, then the report on their run dirs.

FIT_ARGS = ["--data.name=synthetic", "--data.root=", "--data.crop_size=65", "--data.batch_size=2",
            "--data.num_workers=0", "--model.pretrained=none", "--trainer.max_steps=2",
            "--trainer.limit_val_batches=2", "--trainer.val_check_interval=2", "--wandb.mode=disabled",
            "--crf.search=false"]  # aspp_s cross-validates its CRF (v2 Sec. 4.1): tested in test_crf_search.py


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_runs")
    for experiment, seed in [("v2_largefov", 0), ("v2_largefov", 1), ("aspp_s", 0)]:
        result = subprocess.run([sys.executable, "-m", "deeplab_lit.fit", f"--experiment={experiment}",
                                 f"--seed={seed}", f"--output_dir={root}", *FIT_ARGS],
                                capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_report_on_real_run_directories(real_runs, tmp_path):
    """Real 2-step fits on the synthetic set: their per-image records reproduce their summaries exactly, they
    fill v2 Table 3 in the synthetic-set section with intervals and a qualitative panel, and no VOC paper row
    takes them."""
    summaries = {(d["experiment"], d["seed"]): d for d in
                 (json.loads(p.read_text()) for p in real_runs.rglob("summary.json"))}
    assert sorted(summaries) == [("aspp_s", 0), ("v2_largefov", 0), ("v2_largefov", 1)]
    assert report.main(["--runs", str(real_runs), "--out", str(tmp_path), "--resamples", "1000"]) == 0
    records = report.load_local(real_runs)
    for record in records:
        counts = record.per_image()
        assert set(counts) == {"mIoU", "mIoU_crf"}, record.per_image_note
        for key, found in counts.items():
            assert found.miou == record.metrics[f"val/{key}"]  # exactly
            assert len(found.names) == 2  # trainer.limit_val_batches=2, one image per batch
        assert sorted(record.predictions("mIoU")) == sorted(counts["mIoU"].names)
    assert by_id(report.build_report(records))["v2_table3_aspp"].rows_run == 0  # never against VOC numbers
    results = by_id(report.build_report(records, data="the synthetic set", bootstrap=report.Bootstrap(1000)))
    largefov, aspp_s = results["v2_table3_aspp"].rows
    for row_, experiment, seeds in [(largefov, "v2_largefov", [0, 1]), (aspp_s, "aspp_s", [0])]:
        for cell, metric in zip(row_.cells, ["val/mIoU", "val/mIoU_crf"]):
            assert cell.values == pytest.approx([100 * summaries[(experiment, s)]["metrics"][metric] for s in seeds])
            assert cell.paper is None and cell.stats.n == len(seeds) and cell.stats.images == 2
        assert row_.protocol == "train OS 8 · eval OS 8 · batch 2 · random (no pre-training)"
        overrides = sorted(a[2:] for a in FIT_ARGS if not a.startswith(("--data.root", "--data.num_workers", "--wandb")))
        if experiment == "v2_largefov":  # its recipe has the released CRF values: no search to switch off
            overrides.remove("crf.search=false")
        assert row_.notes == ["overrides: " + ", ".join(overrides)]
    assert results["v2_table3_aspp"].claims and not results["v2_table3_aspp"].agreements
    markdown = (tmp_path / "report.md").read_text()
    assert "### v2 Table 3: ASPP on VGG-16 (the synthetic set)" in markdown
    for kind in ("png", "claims.png", "heatmap.png", "qualitative.png"):
        assert (tmp_path / "figures" / f"the-synthetic-set--v2_table3_aspp.{kind}").is_file(), kind
    assert results["crf_on_off"].rows_run == 2
