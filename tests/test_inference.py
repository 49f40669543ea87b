"""Exactness of each inference strategy on full architectures (small inputs)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deeplab_lit.config import build_protocols, load_experiment
from deeplab_lit.inference import (
    Protocol,
    evaluation_output_stride,
    pad_multiple,
    predict_logits_slide,
    predict_logits_whole,
    predict_probs,
)
from deeplab_lit.models import build_model


def model_for(name, *overrides):
    cfg = load_experiment(name, ["model.pretrained=none", "model.backbone=resnet50", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, 5).eval()


@pytest.fixture(scope="module")
def v3():
    return model_for("v3")


@torch.no_grad()
def test_scale_one_without_flip_is_exactly_the_plain_prediction(v3):
    images = torch.randn(1, 3, 45, 53)
    plain = predict_logits_whole(v3, images).softmax(1)
    assert torch.equal(predict_probs(v3, images, Protocol()), plain)
    assert plain.shape == (1, 5, 45, 53)


@torch.no_grad()
def test_whole_image_pads_with_mean_and_crops_back(v3):
    images = torch.randn(1, 3, 45, 53)
    padded = F.pad(images, (0, 64 - 53, 0, 48 - 45), value=0.0)
    expected = v3(padded)["out"][..., :45, :53]
    assert pad_multiple(v3) == 16
    assert torch.equal(predict_logits_whole(v3, images), expected)


def test_pad_multiple_keeps_every_msc_scale_aligned():
    msc = model_for("v2_r101_msc")
    assert msc.output_stride == 8 and pad_multiple(msc) == 32  # 0.75 * 32 and 0.5 * 32 are multiples of 8


class SymmetricNet(nn.Module):
    """A flip-equivariant network: stride-1 convolutions whose kernels are left-right symmetric."""

    output_stride = 1
    align_corners = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 5, padding=2)
        for conv in (self.conv1, self.conv2):
            conv.weight.data = (conv.weight.data + conv.weight.data.flip(-1)) / 2

    def forward(self, x):
        return {"out": self.conv2(torch.relu(self.conv1(x)))}


@torch.no_grad()
def test_flip_averaging_of_an_equivariant_net_equals_plain():
    net = SymmetricNet()
    images = torch.randn(2, 3, 21, 30)
    plain = predict_probs(net, images, Protocol())
    flipped = predict_probs(net, images, Protocol(flip=True))
    assert torch.allclose(flipped, plain, atol=1e-6)


@torch.no_grad()
def test_flip_of_a_flip_symmetric_input_on_a_real_model(v3):
    half = torch.randn(1, 3, 32, 32)
    images = torch.cat([half, half.flip(-1)], dim=-1)  # symmetric input
    plain = predict_probs(v3, images, Protocol())
    both = predict_probs(v3, images, Protocol(flip=True))
    assert torch.allclose(both, (plain + plain.flip(-1)) / 2, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("align_corners", [True, False])
def test_multi_scale_is_the_mean_of_per_scale_probabilities(v3, align_corners):
    v3.align_corners = align_corners
    images = torch.randn(1, 3, 40, 48)
    probs = predict_probs(v3, images, Protocol(scales=[0.5, 1.0, 1.5]))
    expected = 0
    for scale in (0.5, 1.0, 1.5):
        # the corner-aligned grid (TF's scale_dimension): (n - 1) * s + 1; else rounded n * s
        size = (int(39 * scale + 1), int(47 * scale + 1)) if align_corners else (int(40 * scale + 0.5),
                                                                                  int(48 * scale + 0.5))
        scaled = images if scale == 1.0 else F.interpolate(images, size=size, mode="bilinear",
                                                           align_corners=align_corners)
        logits = predict_logits_whole(v3, scaled)
        expected = expected + F.interpolate(logits, size=(40, 48), mode="bilinear",
                                            align_corners=align_corners).softmax(1)
    v3.align_corners = True
    assert torch.allclose(probs, expected / 3, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(1, 40, 48), atol=1e-5)


@torch.no_grad()
def test_one_window_covering_the_image_equals_whole(v3):
    images = torch.randn(1, 3, 45, 53)
    whole = predict_logits_whole(v3, images)
    assert torch.equal(predict_logits_slide(v3, images, crop=64, stride=48), whole)
    assert torch.equal(predict_probs(v3, images, Protocol(mode="slide", slide_crop=64, slide_stride=48)), whole.softmax(1))


@torch.no_grad()
def test_sliding_windows_average_the_overlaps(v3):
    images = torch.randn(1, 3, 32, 80)
    windows = [(0, 32), (24, 56), (48, 80)]  # crop 32, stride 24, the last flush with the border
    total = torch.zeros(1, 5, 32, 80)
    count = torch.zeros(1, 1, 32, 80)
    for left, right in windows:
        total[..., left:right] += predict_logits_whole(v3, images[..., left:right])
        count[..., left:right] += 1
    assert torch.allclose(predict_logits_slide(v3, images, crop=32, stride=24), total / count, atol=1e-6)


@torch.no_grad()
def test_eval_output_stride_switches_in_place_and_restores(v3):
    reference = model_for("v3", "model.output_stride=8")
    reference.load_state_dict(v3.state_dict())
    images = torch.randn(1, 3, 33, 41)
    state = copy.deepcopy(v3.state_dict())
    probs = predict_probs(v3, images, Protocol(output_stride=8))
    assert v3.output_stride == 16
    assert all(torch.equal(state[k], v) for k, v in v3.state_dict().items())
    assert torch.allclose(probs, predict_probs(reference, images, Protocol()), atol=1e-5)
    with evaluation_output_stride(v3, 32):
        assert v3.output_stride == 32
    assert v3.output_stride == 16


def test_protocols_from_the_v3_experiment():
    protocols = build_protocols(load_experiment("v3"))
    assert [(p.name, p.output_stride, len(p.scales), p.flip) for p in protocols] == [
        ("", 16, 1, False), ("os8", 8, 1, False), ("os8_ms", 8, 6, False), ("os8_ms_flip", 8, 6, True)
    ]
    crf = build_protocols(load_experiment("aspp_l"))
    assert crf[0].crf and crf[0].output_stride == 8
