"""Untrusted files and faults: hostile checkpoints and caches, errors in worker processes, outputs that
cannot be written, atomic writes, run-directory locks, preemption with DataLoader workers."""
from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deeplab_lit.errors import UserError, original_message
from deeplab_lit.files import RunLock, atomic_write, check_writable, write_json_atomic
from test_fit import FAST, cli, run_fit

ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}


class RunsCode:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = run_fit(tmp_path_factory.mktemp("safety"), "v3", "model.backbone=resnet50", "trainer.limit_val_batches=1",
                      wandb_mode="disabled")
    return run_dir / "checkpoints" / "last.ckpt"


def one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------
# Files from someone else are data


def test_a_pickle_payload_in_a_checkpoint_never_runs(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"] = {"config": RunsCode(marker)}  # where older Lightning code looked
    torch.save(content, hostile)
    one_line_error(cli("deeplab_lit.evaluate", "--checkpoint", str(hostile)), "refused", "posix.system")
    assert not marker.exists()

    # The same file planted as the last checkpoint of a run directory: the resume check refuses it.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(hostile, run_dir / "checkpoints" / "last.ckpt")
    args = ["--experiment", "v3", "--run-dir", str(run_dir), *[f"--{o}" for o in FAST], "--model.backbone=resnet50",
            "--wandb.mode=disabled"]
    one_line_error(cli("deeplab_lit.fit", *args), "resume checkpoint", "refused")
    one_line_error(cli("deeplab_lit.fit", *args, "--resume", str(hostile)), "refused")
    assert not marker.exists()


def test_checkpoints_that_are_not_ours_or_do_not_fit(checkpoint, tmp_path):
    content = torch.load(checkpoint, weights_only=True)
    cases = {}
    foreign = dict(content)
    del foreign["deeplab_lit"]
    cases["foreign"] = (foreign, "not a checkpoint written by deeplab_lit")
    missing = dict(content, state_dict={k: v for k, v in content["state_dict"].items() if "layer4" not in k})
    cases["missing"] = (missing, "does not fit the network of its stored config")
    other = json.loads(json.dumps(content["deeplab_lit"]))
    other["config"]["model"]["backbone"] = "resnet101"
    cases["other network"] = (dict(content, deeplab_lit=other), "does not fit the network of its stored config")
    weights = dict(content, state_dict={k: v.float() for k, v in list(content["state_dict"].items())[:3]})
    cases["bare tensors"] = ({"weights": list(weights["state_dict"].values())}, "not a checkpoint written by")
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.ckpt"
        torch.save(data, path)
        one_line_error(cli("deeplab_lit.evaluate", "--checkpoint", str(path)), str(path), message)


def test_a_hostile_crf_cache_is_refused(tmp_path):
    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.crf_search import read_cache

    marker = tmp_path / "pwned"
    cache = tmp_path / "crf_unaries_0123456789.npz"
    np.savez(cache, format=np.array(1), num_classes=np.array(21),
             probs_0=np.array([RunsCode(marker)], dtype=object))
    with pytest.raises(UserError, match="not a cache of this command"):
        read_cache(cache, resolve_experiment("largefov"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# One line, exit 2, wherever the error surfaces


@pytest.fixture
def bad_mask_root(tmp_path):
    """A copy of the synthetic set whose first training mask holds a value outside the classes."""
    from datamodules.readers import read_index_png, write_index_png
    from datamodules.synthetic import default_synthetic_root, ensure_synthetic

    root = tmp_path / "synthetic"
    shutil.copytree(ensure_synthetic(default_synthetic_root()), root)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for name in ids:  # every training mask: whichever the sampler draws first is bad
        mask = read_index_png(root / "SegmentationClass" / f"{name}.png").copy()
        mask[0, 0] = 7
        write_index_png(root / "SegmentationClass" / f"{name}.png", mask)
    return root


def test_an_error_in_a_dataloader_worker_is_one_line_and_leaves_no_run_directory(bad_mask_root, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--experiment", "v3", "--run-dir", str(run_dir), *[f"--{o}" for o in FAST], "--model.backbone=resnet50",
            "--wandb.mode=disabled", f"--data.root={bad_mask_root}", "--data.num_workers=2"]
    result = cli("deeplab_lit.fit", *args)
    one_line_error(result, "holds value 7", "expected 0..5 or 255")
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_torch_worker_wrapping_is_undone():
    wrapped = ("Caught UserError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 3, in f\n    raise UserError("mask m.png holds value 7")\n'
               "deeplab_lit.errors.UserError: mask m.png holds value 7\n")
    assert str(UserError(wrapped)) == "mask m.png holds value 7" == original_message(wrapped)
    assert str(UserError("plain message")) == "plain message"


@pytest.mark.parametrize("content, message", [
    (b"crf: [1, 2", "not valid YAML"),
    (b"- 1\n- 2\n", "expected a mapping"),
    (b"bi_w: 4\n", "expected a 'crf:' mapping"),
    (b"\x00\x01\xff\xfe binary", "not a text file"),
    (b"crf: {bi_w: -1, bi_xy_std: -5}\n", "crf.bi_xy_std must be a positive number"),
    (b"crf: {bi_w: 4, pos_w: 3, enabled: true, model_stride: 8}\n", "unknown config key 'crf.model_stride'"),
])
def test_bad_crf_params_files(checkpoint, tmp_path, content, message):
    path = tmp_path / "crf.yaml"
    path.write_bytes(content)
    one_line_error(cli("deeplab_lit.evaluate", "--checkpoint", str(checkpoint), "--crf-params", str(path)), message)


def test_outputs_are_checked_before_the_evaluation(checkpoint, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for path, message in [(tmp_path, "is a directory"), (blocker / "out.json", "is a file, not a directory")]:
        started = time.time()
        one_line_error(cli("deeplab_lit.evaluate", "--checkpoint", str(checkpoint), "--json", str(path)), "--json",
                       message)
        assert time.time() - started < 60  # refused at once, not after evaluating
    args = ["--experiment", "v3", *[f"--{o}" for o in FAST], f"--output_dir={blocker}/runs"]
    one_line_error(cli("deeplab_lit.fit", *args), "output_dir", "is a file, not a directory")


def _write_under_a_file_size_limit(path: str) -> str:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    try:
        write_json_atomic(path, {"values": list(range(10_000))})
    except UserError as error:
        return str(error)
    return "written"


def test_a_full_disk_leaves_neither_the_file_nor_a_temporary_one(tmp_path):
    """A file size limit stands in for a full disk: the write fails half-way."""
    target = tmp_path / "summary.json"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        message = pool.apply(_write_under_a_file_size_limit, (str(target),))
    assert message.startswith(f"cannot write {target}: File too large (the disk or quota is full)")
    assert list(tmp_path.iterdir()) == []


def test_outputs_have_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def _write_many(args) -> int:
    path, tag = args
    for index in range(40):
        atomic_write(path, lambda stream: stream.write(f"{tag}-{index}".encode() * 1000))
    return tag


def test_two_processes_writing_the_same_file_never_collide(tmp_path):
    target = tmp_path / "last.ckpt"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert sorted(pool.map(_write_many, [(target, 1), (target, 2)])) == [1, 2]
    assert target.read_bytes()[:4] in (b"1-39", b"2-39") and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_an_interrupted_write_deletes_its_temporary_file(tmp_path):
    def fails(stream):
        stream.write(b"half")
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.json", fails)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="is a directory"):
        check_writable(tmp_path, "--json")


# ---------------------------------------------------------------------------------------------------
# One run directory, one live process


def _hold_lock(run_dir, ready, release):
    with RunLock(run_dir, f"run {run_dir}"):
        ready.set()
        release.wait(30)


def test_the_run_lock_names_the_holder_and_is_released_when_it_exits(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(UserError, match=rf"run {tmp_path} is in use by process {holder.pid} "):
        RunLock(tmp_path, f"run {tmp_path}").acquire()
    release.set()
    holder.join(30)
    with RunLock(tmp_path, f"run {tmp_path}"):  # free again
        pass
    # A lock file left by a process that died (kill -9 leaves the file, never the lock) is taken over.
    (tmp_path / ".lock").write_text("999999\n")
    with RunLock(tmp_path, f"run {tmp_path}"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_two_identical_commands_started_together(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "deeplab_lit.fit", "--experiment", "v3", "--run-dir", str(run_dir),
            *[f"--{o}" for o in FAST], "--model.backbone=resnet50", "--wandb.mode=disabled", "--trainer.max_steps=8",
            "--trainer.val_check_interval=8", "--trainer.limit_val_batches=1"]
    # Output into files, not pipes: a pipe nobody reads fills (64 KiB) and blocks the process writing to it.
    logs = [open(tmp_path / f"err{i}.txt", "w+") for i in range(2)]
    first, second = (subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True, env=ENV) for log in logs)
    outcomes = []
    for process, log in zip((first, second), logs):
        code = process.wait(600)
        log.seek(0)
        outcomes.append((code, log.read(), process.pid))
        log.close()
    outcomes.sort(key=lambda o: o[0])
    (code_a, err_a, _), (code_b, err_b, pid_b) = outcomes
    assert code_a == 0, err_a[-2000:]
    assert code_b == 2 and err_b.count("\n") == 1, err_b[-2000:]
    holder = first.pid if pid_b == second.pid else second.pid
    assert f"run {run_dir} is in use by process {holder} " in err_b
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


# ---------------------------------------------------------------------------------------------------
# Preemption


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_exits_143_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "deeplab_lit.fit", "--experiment", "v3", "--run-dir", str(run_dir),
            *[f"--{o}" for o in FAST], "--model.backbone=resnet50", "--wandb.mode=disabled", "--trainer.max_steps=40",
            "--trainer.val_check_interval=40", "--trainer.limit_val_batches=1", "--data.num_workers=2",
            "--trainer.enable_progress_bar=false"]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                           start_new_session=True)  # its own process group, as a scheduler's job
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "config.yaml").is_file():
        time.sleep(0.2)
    time.sleep(8)  # training, with both workers alive
    os.killpg(job.pid, signal.SIGTERM)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 143, err[-3000:]
    assert "terminated: saved" in err and "DataLoader worker" not in err
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < saved["global_step"] < 40
    resumed = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in resumed.stdout
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 40


def test_a_crash_while_persistent_workers_run_still_exits(tmp_path):
    """Workers ignore SIGTERM (they leave it to the main process), so multiprocessing's exit handler, which
    SIGTERMs daemonic children and joins them, waited forever after an error with persistent workers alive."""
    from datamodules.synthetic import generate_synthetic

    synthetic_root = tmp_path / "synthetic"
    generate_synthetic(synthetic_root, sizes={"train": 8, "val": 2})
    script = tmp_path / "crash.py"
    script.write_text(f"""
from deeplab_lit.cli import run
from deeplab_lit.config import DataConfig
from datamodules import build_datamodule

def main(argv):
    dm = build_datamodule(DataConfig(name="synthetic", root={str(synthetic_root)!r}, num_workers=2, batch_size=2,
                                     crop_size=33), seed=0)
    dm.setup("fit")
    global batches  # held past the error, as a Trainer holds its loaders: the workers stay alive
    batches = iter(dm.train_dataloader())
    next(batches)
    raise RuntimeError("a programming error, not a UserError")

run(main, [])
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and "RuntimeError: a programming error" in result.stderr
