"""The fast path: 8-bit batches normalised on the device, channels-last and compile give the same results."""
import shutil

import numpy as np
import pytest
import torch

from deeplab_lit.config import resolve_experiment
from deeplab_lit.errors import UserError
from deeplab_lit.modules import build_module
from deeplab_lit.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalise, prepare_batch
from test_modules import module_for


def test_normalise_matches_the_float_formula_and_keeps_the_device():
    rgb = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = (rgb.numpy() / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    out = normalise(rgb, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == rgb.shape
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_prepare_batch_converts_uint8_and_leaves_normalised_floats_alone():
    batch = {"image": torch.full((1, 3, 2, 2), 124, dtype=torch.uint8), "mask": torch.full((1, 2, 2), 255, dtype=torch.uint8)}
    out = prepare_batch(batch, IMAGENET_MEAN, IMAGENET_STD)
    assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.int64 and (out["mask"] == 255).all()
    assert out["image"][0, 0].abs().max() < 0.006  # the 8-bit mean colour normalises to almost 0
    floats = {"image": torch.ones(1, 3, 2, 2)}
    assert prepare_batch(floats, IMAGENET_MEAN, IMAGENET_STD)["image"] is floats["image"]


def test_prepare_batch_gives_the_requested_memory_format():
    """Training batches arrive stored channels-last; the network gets the layout its `perf` asks for."""
    rgb = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    stored_channels_last = rgb.permute(0, 3, 1, 2)
    expected = normalise(stored_channels_last.contiguous(), IMAGENET_MEAN, IMAGENET_STD)
    plain = prepare_batch({"image": stored_channels_last}, IMAGENET_MEAN, IMAGENET_STD)["image"]
    assert plain.is_contiguous() and torch.equal(plain, expected)
    last = prepare_batch({"image": stored_channels_last}, IMAGENET_MEAN, IMAGENET_STD, torch.channels_last)["image"]
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, expected)


def test_the_load_api_and_the_module_normalise_alike():
    """api.Segmenter.normalise (H x W x 3 input) and the module's batch hook use the same function."""
    from deeplab_lit.api import Segmenter

    module = module_for("v3", "model.backbone=resnet50")
    rgb = torch.randint(0, 256, (1, 6, 4, 3), dtype=torch.uint8)
    segmenter = Segmenter.__new__(Segmenter)
    segmenter.mean, segmenter.std = module.mean, module.std
    from_module = module.on_after_batch_transfer({"image": rgb.permute(0, 3, 1, 2).contiguous()}, 0)["image"]
    assert torch.equal(segmenter.normalise(rgb), from_module)


def test_channels_last_gives_the_same_logits():
    plain = module_for("v3plus", "model.backbone=resnet50").eval()
    fast = module_for("v3plus", "model.backbone=resnet50", "perf.channels_last=true").eval()
    fast.model.load_state_dict(plain.model.state_dict())
    conv = fast.model.backbone.conv1 if hasattr(fast.model.backbone, "conv1") else next(
        m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    rgb = torch.randint(0, 256, (2, 3, 49, 57), dtype=torch.uint8)
    batch = fast.on_after_batch_transfer({"image": rgb.clone()}, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(plain.on_after_batch_transfer({"image": rgb.clone()}, 0)["image"])["out"]
        got = fast(batch["image"])["out"]
    assert got.shape == expected.shape == (2, 5, 49, 57)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_cudnn_benchmark_is_one_key():
    assert resolve_experiment("v3", ["perf.cudnn_benchmark=true"]).trainer_arguments()["benchmark"] is True
    assert resolve_experiment("v3").trainer_arguments()["benchmark"] is False
    with pytest.raises(UserError, match="trainer.benchmark: use perf.cudnn_benchmark"):
        resolve_experiment("v3", ["trainer.benchmark=true"])


def test_perf_keys_do_not_change_the_run():
    from deeplab_lit.config import key_role

    assert {key_role(f"perf.{k}") for k in ("channels_last", "compile", "cudnn_benchmark")} == {"infrastructure"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="torch.compile needs a C compiler")
def test_compile_gives_the_same_logits_and_state_dict_names():
    spec = resolve_experiment("v3", ["model.pretrained=none", "model.backbone=resnet50", "perf.compile=true"])
    torch.manual_seed(0)
    module = build_module(spec).eval()
    names = list(module.model.state_dict())
    images = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        expected = module(images)["out"]
        module.on_fit_start()
        got = module(images)["out"]
    assert list(module.model.state_dict()) == names  # checkpoints unchanged
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
