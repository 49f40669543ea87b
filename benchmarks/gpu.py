"""Training and evaluation speed, MFU, peak memory and CRF speed of the v3/v3+ recipes on one CUDA GPU.

    python benchmarks/gpu.py [--json FILE|-] [--quick] [--compile] [--batch-sizes 8,16]
                             [--memory-batches 2,4,6,8,12,16] [--sections train,memory,eval,crf]
                             [--cudnn-benchmark] [--smoke]

The networks, optimiser settings, loss and evaluation protocol are the experiments' own (experiments/v3,
v3_train_os8, v3plus; `model.pretrained=none`, random inputs and labels, 21 classes). Rows (`name`):
  train_throughput   images/s of a training step: forward, loss (`optim.loss_at`), backward, SGD step
                     (the experiment's momentum and weight decay over all parameters), synchronised,
                     after warm-up; crop 513, for v3 R101 OS 16, v3 R101 OS 8 and v3+ R101 OS 16, each
                     in fp32 (PyTorch's defaults: convolutions on TF32 tensor cores) and in bf16
                     autocast + channels_last (and + torch.compile with --compile), batch per --batch-sizes
  train_mfu          model FLOPs per step / step time / the device's dense peak (PEAK_TFLOPS: bf16 rows
                     against bf16, fp32 rows against TF32); FLOPs are counted by FlopCounterMode over one
                     forward + loss + backward (convolutions and matmuls; no BN, ReLU, SGD), on the meta
                     device; "n/a" on a device missing from PEAK_TFLOPS
  train_peak_memory  torch.cuda.max_memory_allocated over two training steps (weights, gradients,
                     momentum, activations), v3 R101 trained at OS 8 (v3 App. A: batch 6 fits there)
                     per --memory-batches in fp32 and bf16 + channels_last, and v3 at OS 16 with the
                     paper's batch 16 (`paper_batch`); "OOM" when the step runs out of memory
  eval_ms_flip       images/s ("ms" = multi-scale) of deeplab_lit.inference.predict_probs under v3's `os8_ms_flip` protocol
                     (OS 8, scales 0.5..1.75 step 0.25, + flip, 513x513 canvas), batch 1, fp32 and bf16
  crf_torch          ms per image of the torch dense CRF on the GPU, batch 1 and 8 (500x375, 21 labels,
                     10 iterations, v2 ResNet parameters; benchmarks/crf.py's photographs)
  crf_pydensecrf     ms per image of the pydensecrf reference on one CPU core of this machine (if installed)

Without a CUDA device (or with --smoke) every code path runs in a CPU smoke mode on tiny inputs (ResNet-50,
crop 65, batch 2, one step without warm-up, CRF on 100x75 crops; peak memory "n/a": the CPU has no
allocator statistics, and benchmarks/memory.py counts it with fake tensors instead) in under a minute on two cores; it prints "no CUDA device: CPU smoke mode --
figures are not GPU measurements" and the JSON says "smoke": true. --quick is a short GPU run (5 steps per
row, memory batches 6 and 16, 3 evaluation images) for a 10-minute device session. The default run (30
steps per row, 20 evaluation images) should take 3-5 minutes on an H100/H200 (estimated from its FLOP
counts, not yet timed there); --compile adds roughly a minute of compilation per compiled row. Each
section prints its elapsed time.

Output: a table (name | config | value | unit), printed row by row, and JSON written after every section
(so a run cut short keeps what it measured) to --json, by default
benchmarks/results/gpu-<hostname>.json (gpu-<hostname>-smoke.json in smoke mode); "-", or a path that
cannot be written, prints the JSON to stdout at the end instead. Schema 1:
  {"schema": 1, "smoke": bool, "device": "NVIDIA H200" | "cpu", "peak_tflops": {"bf16", "tf32"} | null,
   "torch": str, "cuda": str | null, "cudnn": int | null, "hostname": str, "argv": [str],
   "settings": {"cudnn_benchmark", "cudnn_allow_tf32", "matmul_allow_tf32", "crop", "backbone"},
   "budget": {"warmup", "iterations", "eval_images", "crf_repeats", "pydensecrf_images"},
   "elapsed_s": {section: seconds},
   "rows": [{"name", "config", "precision" ("fp32" | "bf16"), "channels_last", "compile", "batch",
             "crop" (training crop or evaluation input side; null for the CRF), "output_stride" (null for
             the CRF), "value" (null when OOM, failed or n/a), "unit" ("img/s" | "%" | "GiB" | "ms/img"),
             "status" ("ok" | "OOM" | "n/a" | "error: ..."), plus per name:
             train_*, eval_ms_flip: "experiment", "backbone";
             train_throughput: "step_ms", "peak_memory_gib" (null on the CPU);
             train_mfu: "step_ms", "tflop_per_step", "achieved_tflops", "peak_tflops";
             train_peak_memory: "paper_batch" (the experiment's own batch: 16 at OS 16, 6 at OS 8);
             eval_ms_flip: "ms_per_image", "scales", "flip";
             crf_*: "device", "height", "width", "labels", "iterations"}]}
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: see benchmarks/crf.py
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deeplab_lit.config import resolve_experiment  # noqa: E402
from deeplab_lit.crf import dense_crf, resolve_params  # noqa: E402
from deeplab_lit.inference import predict_probs  # noqa: E402
from deeplab_lit.models import build_model  # noqa: E402
from deeplab_lit.modules.losses import IGNORE_INDEX, loss_terms  # noqa: E402

SCHEMA = 1
SMOKE_BANNER = "no CUDA device: CPU smoke mode -- figures are not GPU measurements"
TRAIN_EXPERIMENTS = ("v3", "v3_train_os8", "v3plus")  # v3 R101 OS 16, OS 8, v3+ R101 (decoder) OS 16
MEMORY_EXPERIMENT, PAPER_BATCH_EXPERIMENT = "v3_train_os8", "v3"
EVAL_EXPERIMENT, EVAL_PROTOCOL = "v3", "os8_ms_flip"

# Dense (no sparsity) tensor-core peaks in TFLOPS from NVIDIA's datasheets (their tables give the sparse
# figure, twice these): (pattern on torch.cuda.get_device_name(), bf16, tf32). First match wins, so the
# specific names come first. fp32 rows count against TF32 because PyTorch runs fp32 convolutions on TF32
# tensor cores by default (torch.backends.cudnn.allow_tf32); V100 has no TF32 or bf16 units: its entry
# is the plain FP32 peak and its bf16 MFU is "n/a".
PEAK_TFLOPS = (
    (r"H200 NVL", 835.5, 417.5),         # H200 NVL datasheet: BF16 1,671 / TF32 835 with sparsity
    (r"H200", 989.5, 494.5),             # H200 SXM datasheet: BF16 1,979 / TF32 989 with sparsity (GH200 alike)
    (r"H100 NVL", 835.5, 417.5),         # H100 NVL datasheet: BF16 1,671 / TF32 835 with sparsity
    (r"H100 PCIe", 756.5, 378.0),        # H100 PCIe datasheet: BF16 1,513 / TF32 756 with sparsity
    (r"H100", 989.5, 494.5),             # H100 SXM5 datasheet ("H100 80GB HBM3"): BF16 1,979 / TF32 989
    (r"A100", 312.0, 156.0),             # A100 datasheet (SXM4 and PCIe): BF16 312, TF32 156 dense
    (r"L40S", 362.05, 183.0),            # L40S datasheet: BF16 362.05, TF32 183 dense
    (r"L40\b", 181.05, 90.5),            # L40 datasheet: BF16 181.05, TF32 90.5 dense
    (r"L4\b", 121.0, 60.0),              # L4 datasheet: BF16 242 / TF32 120 with sparsity
    (r"RTX 4090", 165.2, 82.6),          # Ada whitepaper: RTX 4090 BF16 (FP32 accumulate) 165.2, TF32 82.6
    (r"A10\b", 125.0, 62.5),             # A10 datasheet: BF16 125, TF32 62.5 dense
    (r"V100S", None, 16.4),              # V100S PCIe datasheet: FP32 16.4
    (r"V100-SXM|V100 SXM", None, 15.7),  # V100 datasheet, SXM2: FP32 15.7
    (r"V100", None, 14.0),               # V100 datasheet, PCIe: FP32 14
)


@dataclasses.dataclass(frozen=True)
class Budget:
    warmup: int             # untimed training steps (and eval / CRF calls) before timing
    iterations: int         # timed training steps per row
    eval_images: int        # timed evaluation images per row
    crf_repeats: int        # timed torch CRF calls per row
    pydensecrf_images: int  # images refined by pydensecrf (one timed pass)


BUDGETS = {"full": Budget(5, 30, 20, 10, 8), "quick": Budget(2, 5, 3, 3, 2), "smoke": Budget(0, 1, 1, 1, 2)}


@dataclasses.dataclass(frozen=True)
class Mode:
    precision: str  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False

    @property
    def text(self) -> str:
        return self.precision + ("+CL" if self.channels_last else "") + ("+compile" if self.compile else "")


FP32, BF16_CL = Mode("fp32"), Mode("bf16", channels_last=True)


@dataclasses.dataclass
class Bench:
    """What every measurement needs: the device, the budget, the sizes, and where rows go."""

    device: torch.device
    smoke: bool
    budget: Budget
    crop: int
    overrides: tuple[str, ...]  # applied to every experiment (smoke: a smaller backbone)
    rows: list = dataclasses.field(default_factory=list)

    def spec(self, experiment: str):
        return resolve_experiment(experiment, ["model.pretrained=none", *self.overrides])

    def add(self, name: str, config: str, value, unit: str, status: str = "ok", **fields) -> dict:
        row = {"name": name, "config": config, "precision": None, "channels_last": False, "compile": False,
               "batch": None, "crop": None, "output_stride": None, "value": value, "unit": unit,
               "status": status if value is not None or status != "ok" else "n/a", **fields}
        self.rows.append(row)
        shown = row["status"].split(":")[0] if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3g}"
        print(f"| {name} | {config} | {shown} | {unit} |", flush=True)
        return row


# ---------------------------------------------------------------------------------------------------
# Shared helpers


def seconds_per_call(fn, device: torch.device, warmup: int, iterations: int) -> float:
    """Mean seconds of `fn()` over `iterations` calls after `warmup` calls: CUDA events on a GPU (the
    queue is drained first, so only this work is timed), the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - start) / iterations
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iterations


def attempt(strict: bool, measure, *args):
    """(measure(*args), "ok") or (None, "OOM" / "error: ..."); memory is released either way. `strict`
    (smoke mode, tests) re-raises errors other than running out of memory."""
    try:
        result, status = measure(*args), "ok"
    except torch.cuda.OutOfMemoryError:
        result, status = None, "OOM"
    except Exception as error:  # a GPU run keeps going past one failing row (e.g. torch.compile)
        if strict:
            raise
        result, status = None, f"error: {type(error).__name__}: {error}"[:300]
    release()
    return result, status


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_tflops(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, bf16, tf32 in PEAK_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return {"bf16": bf16, "tf32": tf32}
    return None


def random_batch(batch: int, size: int, classes: int, device, channels_last: bool):
    images = torch.randn(batch, 3, size, size, device=device)
    masks = torch.randint(0, classes, (batch, size, size), device=device)
    masks[:, :, : size // 10] = IGNORE_INDEX  # a band of ignored pixels, as VOC's borders
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images, masks


def build(spec, device, mode: Mode, train: bool):
    with torch.device(device):
        model = build_model(spec.config.model, spec.dataset.num_classes)
    model.train(train)
    return model.to(memory_format=torch.channels_last) if mode.channels_last else model


def training_step(spec, device, mode: Mode, batch: int, crop: int):
    """One SGD step of the experiment's recipe on a random batch, as a closure."""
    model = build(spec, device, mode, train=True)
    optim = spec.config.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                                weight_decay=optim.weight_decay)
    if mode.compile:
        torch._dynamo.reset()  # each row compiles its own graph (static shapes), none reused from the last
    network = torch.compile(model, dynamic=False) if mode.compile else model
    images, masks = random_batch(batch, crop, spec.dataset.num_classes, device, mode.channels_last)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=mode.precision == "bf16"):
            loss = sum(loss_terms(network(images), masks, optim.loss_at, model.align_corners))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def training_flops_per_image(spec, crop: int) -> int:
    """FLOPs of forward + loss + backward for one image (counted at batch 2: BN needs two values), on
    the meta device: exact shapes, nothing computed."""
    with torch.device("meta"):
        model = build_model(spec.config.model, spec.dataset.num_classes)
        images, masks = random_batch(2, crop, spec.dataset.num_classes, "meta", False)
    with FlopCounterMode(display=False) as counter:
        sum(loss_terms(model(images), masks, spec.config.optim.loss_at, model.align_corners)).backward()
    return counter.get_total_flops() // 2


def describe(spec, crop: int, batch: int, mode: Mode, output_stride: int | None = None, suffix: str = "") -> dict:
    """The common fields of a model row; `output_stride`: an evaluation stride other than the training one."""
    model = spec.config.model
    stride = output_stride or model.output_stride
    return {"config": f"{spec.name} {model.backbone} OS{stride} {crop}px b{batch} {mode.text}{suffix}",
            "precision": mode.precision, "channels_last": mode.channels_last, "compile": mode.compile,
            "batch": batch, "crop": crop, "output_stride": stride, "experiment": spec.name,
            "backbone": model.backbone}


# ---------------------------------------------------------------------------------------------------
# Measurements: what one row times, then one function per section


def time_training(bench: Bench, spec, mode: Mode, batch: int) -> tuple[float, float | None]:
    """Seconds per training step, and the peak memory over warm-up and timed steps (GiB; CUDA only)."""
    step = training_step(spec, bench.device, mode, batch, bench.crop)
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    seconds = seconds_per_call(step, bench.device, bench.budget.warmup, bench.budget.iterations)
    return seconds, torch.cuda.max_memory_allocated(bench.device) / 2**30 if cuda else None


def training_memory(bench: Bench, spec, mode: Mode, batch: int) -> float | None:
    """Peak GiB allocated over two training steps (the second holds SGD's momentum buffers too); None on
    the CPU, which has no allocator statistics (the steps run all the same)."""
    step = training_step(spec, bench.device, mode, batch, bench.crop)
    cuda = bench.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(bench.device)
    step(), step()
    if not cuda:
        return None
    torch.cuda.synchronize(bench.device)
    return torch.cuda.max_memory_allocated(bench.device) / 2**30


def time_evaluation(bench: Bench, spec, protocol, mode: Mode, size: int) -> float:
    """Seconds per image of predict_probs under `protocol` (batch 1)."""
    model = build(spec, bench.device, mode, train=False)
    images, _ = random_batch(1, size, spec.dataset.num_classes, bench.device, mode.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast(bench.device.type, torch.bfloat16,
                                                    enabled=mode.precision == "bf16"):
            predict_probs(model, images, protocol)
    return seconds_per_call(run, bench.device, bench.budget.warmup, bench.budget.eval_images)


def time_crf(bench: Bench, probs, images) -> float:
    """Seconds per call of the torch CRF on the whole batch, on the benchmark's device."""
    probs, images = probs.to(bench.device), images.to(bench.device)
    return seconds_per_call(lambda: dense_crf(probs, images), bench.device, bench.budget.warmup,
                            bench.budget.crf_repeats)


def train_section(bench: Bench, batches: list[int], modes: list[Mode], peaks: dict | None) -> None:
    for experiment in TRAIN_EXPERIMENTS:
        spec = bench.spec(experiment)
        flops_per_image = training_flops_per_image(spec, bench.crop)
        for mode in modes:
            for batch in batches:
                result, status = attempt(bench.smoke, time_training, bench, spec, mode, batch)
                seconds, memory = result or (None, None)
                fields = describe(spec, bench.crop, batch, mode)
                step_ms = seconds * 1000 if seconds else None
                bench.add("train_throughput", value=batch / seconds if seconds else None, unit="img/s",
                          status=status, step_ms=step_ms, peak_memory_gib=memory, **fields)
                tflop = flops_per_image * batch / 1e12
                achieved = tflop / seconds if seconds else None
                peak = (peaks or {}).get("bf16" if mode.precision == "bf16" else "tf32")
                bench.add("train_mfu", value=100 * achieved / peak if achieved and peak else None, unit="%",
                          status=status, step_ms=step_ms, tflop_per_step=tflop, achieved_tflops=achieved,
                          peak_tflops=peak, **fields)


def memory_section(bench: Bench, batches: list[int]) -> None:
    os8, os16 = bench.spec(MEMORY_EXPERIMENT), bench.spec(PAPER_BATCH_EXPERIMENT)
    for spec, sizes in ((os8, batches), (os16, [2 if bench.smoke else os16.config.data.batch_size])):
        for mode in (FP32, BF16_CL):
            status = "ok"
            for batch in sizes:
                # a batch that ran out of memory makes every larger one run out too: not tried again
                gib, status = (None, "OOM") if status == "OOM" else attempt(
                    bench.smoke, training_memory, bench, spec, mode, batch)
                paper_batch = spec is os16 or batch == spec.config.data.batch_size  # v3: 16 at OS 16, 6 at OS 8
                bench.add("train_peak_memory", value=gib, unit="GiB", status=status, paper_batch=paper_batch,
                          **describe(spec, bench.crop, batch, mode))


def eval_section(bench: Bench, size: int) -> None:
    spec = bench.spec(EVAL_EXPERIMENT)
    protocol = next(p for p in spec.protocols if p.name == EVAL_PROTOCOL)
    protocol = dataclasses.replace(protocol, canvas=(size, size))  # the 513 canvas; smoke: the tiny crop
    for mode in (FP32, BF16_CL):
        seconds, status = attempt(bench.smoke, time_evaluation, bench, spec, protocol, mode, size)
        bench.add("eval_ms_flip", value=1 / seconds if seconds else None, unit="img/s", status=status,
                  ms_per_image=seconds * 1000 if seconds else None, scales=list(protocol.scales),
                  flip=protocol.flip, **describe(spec, size, 1, mode, protocol.output_stride, " MS+flip"))


def crf_section(bench: Bench) -> None:
    # benchmarks/crf.py's photographs and unaries (imported here: scikit-image is needed by this section only)
    from benchmarks.crf import CLASSES, voc_like_inputs

    batches = (1, 2) if bench.smoke else (1, 8)
    probs, images = voc_like_inputs(max(max(batches), bench.budget.pydensecrf_images))
    if bench.smoke:  # a small image: 100x75 of the 500x375 ones
        probs, images = probs[..., :75, :100].contiguous(), images[:, :75, :100].contiguous()
    height, width = images.shape[1:3]
    fields = {"precision": "fp32", "height": height, "width": width, "labels": CLASSES,
              "iterations": resolve_params(None).iterations}
    for batch in batches:
        seconds, status = attempt(bench.smoke, time_crf, bench, probs[:batch], images[:batch])
        bench.add("crf_torch", f"torch {bench.device.type} b{batch} {width}x{height}",
                  1000 * seconds / batch if seconds else None, "ms/img", status, batch=batch,
                  device=bench.device.type, **fields)
    if importlib.util.find_spec("pydensecrf") is None:
        print("pydensecrf is not installed: no reference row", flush=True)
        return
    count = bench.budget.pydensecrf_images
    seconds, status = attempt(bench.smoke, seconds_per_call, lambda: dense_crf(
        probs[:count], images[:count], backend="pydensecrf", workers=1), torch.device("cpu"), 0, 1)
    bench.add("crf_pydensecrf", f"pydensecrf 1 core {width}x{height} ({count} images)",
              1000 * seconds / count if seconds else None, "ms/img", status, batch=1, device="cpu 1 core", **fields)


# ---------------------------------------------------------------------------------------------------
# Command line


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_json(smoke: bool) -> Path:
    return ROOT / "benchmarks" / "results" / f"gpu-{socket.gethostname()}{'-smoke' if smoke else ''}.json"


def write_json(result: dict, target: str | Path | None, final: bool) -> None:
    """To `target`; "-" (or a target that cannot be written) prints it to stdout once, at the end."""
    text = json.dumps(result, indent=2) + "\n"
    if target not in (None, "-"):
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(text)
            if final:
                print(f"JSON written to {target}", flush=True)
            return
        except OSError as error:
            if final:
                print(f"cannot write {target} ({error}): JSON on stdout", file=sys.stderr, flush=True)
    if final:
        print(text, end="", flush=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the JSON here ('-' = stdout); default benchmarks/results/gpu-HOST.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations: fits a 10-minute device session")
    parser.add_argument("--compile", action="store_true", help="also train bf16 + channels_last + torch.compile")
    parser.add_argument("--batch-sizes", type=int_list, default=[8, 16], help="training batches (default 8,16)")
    parser.add_argument("--memory-batches", type=int_list, default=None,
                        help="peak-memory batches at OS 8 (default 2,4,6,8,12,16; --quick 6,16)")
    parser.add_argument("--sections", default="train,memory,eval,crf", help="which sections to run, in order")
    parser.add_argument("--crop", type=int, default=513, help="training crop and evaluation canvas")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (fit leaves it off)")
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke mode even when CUDA is available")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"train", "memory", "eval", "crf"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from train, memory, eval, crf")

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke:
        print(SMOKE_BANNER, flush=True)
        device, budget, crop, overrides = torch.device("cpu"), BUDGETS["smoke"], 65, ("model.backbone=resnet50",)
        batches, memory_batches = [2], [2]
    else:
        device, budget, crop, overrides = torch.device("cuda"), BUDGETS["quick" if args.quick else "full"], \
            args.crop, ()
        batches = args.batch_sizes
        memory_batches = args.memory_batches or ([6, 16] if args.quick else [2, 4, 6, 8, 12, 16])
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    bench = Bench(device, smoke, budget, crop, overrides)
    peaks = peak_tflops(device)
    target = args.json if args.json else default_json(smoke)
    result = {
        "schema": SCHEMA, "smoke": smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_tflops": peaks, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "hostname": socket.gethostname(), "argv": list(sys.argv[1:] if argv is None else argv),
        "settings": {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "crop": crop, "backbone": "resnet50" if smoke else "resnet101"},
        "budget": dataclasses.asdict(budget), "elapsed_s": {}, "rows": bench.rows,
    }
    print(f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}, peak TFLOPS {peaks or 'unknown'}")
    print("| name | config | value | unit |\n|---|---|---|---|", flush=True)
    modes = [FP32, BF16_CL] + ([dataclasses.replace(BF16_CL, compile=True)] if args.compile else [])
    run = {"train": lambda: train_section(bench, batches, modes, peaks),
           "memory": lambda: memory_section(bench, memory_batches),
           "eval": lambda: eval_section(bench, crop),
           "crf": lambda: crf_section(bench)}
    started = time.perf_counter()
    for section in sections:
        start = time.perf_counter()
        run[section]()
        result["elapsed_s"][section] = round(time.perf_counter() - start, 1)
        print(f"  [{section}: {result['elapsed_s'][section]:.1f} s]", flush=True)
        write_json(result, target, final=False)
    result["elapsed_s"]["total"] = round(time.perf_counter() - started, 1)
    print(f"  [total: {result['elapsed_s']['total']:.1f} s]", flush=True)
    write_json(result, target, final=True)
    return result


if __name__ == "__main__":
    main()
