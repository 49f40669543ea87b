"""The model zoo against docs/papers.md: shapes, atrous rates, output-stride switching, torchvision
equivalence, VGG weight conversion, head structure and fusion, pretrained loading, parameter groups,
complexity counting. CPU only; full architectures on 65x65 / 97x97 inputs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deeplab_lit.config import ModelConfig
from deeplab_lit.errors import UserError
from deeplab_lit.models import DeepLab, build_model, count_macs, count_parameters, imagenet_checkpoint
from deeplab_lit.models.backbones import ResNetBackbone
from deeplab_lit.models.heads import ASPPHead, AtrousClassifierHead, ClassifierHead, FCHead

NUM_CLASSES = 21
VGG = dict(backbone="vgg16", output_stride=8, head="fc", multi_grid=[1, 1, 1])
R101_V2 = dict(generation="v2", backbone="resnet101", output_stride=8, bn="frozen")
MSC = [1.0, 0.75, 0.5]

# The model part of every docs/papers.md row (rows differing only in data/recipe share a structure).
PAPER_MODELS = {
    "v1_7x7": dict(VGG, generation="v1", fc6_kernel=7, aspp_rates=[4], fc6_width=4096),
    "v1_4x4": dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[4], fc6_width=4096),
    "v1_4x4_r8": dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[8], fc6_width=4096),
    "largefov": dict(VGG, generation="v1", fc6_kernel=3, aspp_rates=[12], fc6_width=1024),
    "v1_msc": dict(VGG, generation="v1", fc6_kernel=4, aspp_rates=[4], fc6_width=4096, msc_features=True),
    "v1_msc_largefov": dict(VGG, generation="v1", fc6_kernel=3, aspp_rates=[12], fc6_width=1024,
                            msc_features=True),
    "v2_largefov": dict(VGG, generation="v2", fc6_kernel=3, aspp_rates=[12], fc6_width=1024),
    "aspp_s": dict(VGG, generation="v2", fc6_kernel=3, aspp_rates=[2, 4, 8, 12], fc6_width=1024),
    "aspp_l": dict(VGG, generation="v2", fc6_kernel=3, aspp_rates=[6, 12, 18, 24], fc6_width=1024),
    "v2_r101": dict(R101_V2, head="classifier"),
    "v2_r101_msc": dict(R101_V2, head="classifier", msc_scales=MSC),
    "v2_r101_largefov": dict(R101_V2, head="atrous_classifier", aspp_rates=[12], msc_scales=MSC),
    "v2_r101_aspp": dict(R101_V2, head="atrous_classifier", aspp_rates=[6, 12, 18, 24], msc_scales=MSC),
    "v3_r50_block7_os8": dict(generation="v3", backbone="resnet50", output_stride=8, head="classifier",
                              cascade_blocks=3),
    "v3_r50_block7_os32": dict(generation="v3", backbone="resnet50", output_stride=32, head="classifier",
                               cascade_blocks=3),
    "v3_block7_mg124": dict(generation="v3", head="classifier", cascade_blocks=3, multi_grid=[1, 2, 4]),
    "v3_aspp_mg124_r24": dict(generation="v3", multi_grid=[1, 2, 4], aspp_rates=[6, 12, 18, 24],
                              image_pooling=False),
    "v3": dict(generation="v3", multi_grid=[1, 2, 4]),
    "v3_train_os8": dict(generation="v3", multi_grid=[1, 2, 4], output_stride=8),
    "v3plus": dict(generation="v3plus", multi_grid=[1, 2, 4]),
    "v3plus_1conv": dict(generation="v3plus", multi_grid=[1, 2, 4], decoder_convs=1),
    "v3plus_train_os32": dict(generation="v3plus", multi_grid=[1, 2, 4], output_stride=32),
}


def model_cfg(name_or_dict, **overrides) -> ModelConfig:
    fields = PAPER_MODELS[name_or_dict] if isinstance(name_or_dict, str) else name_or_dict
    return ModelConfig(**{**fields, **overrides})


def build_meta(name, **overrides) -> DeepLab:
    """The model on the meta device: real structure and shapes, no weights computed (fast)."""
    with torch.device("meta"):
        return build_model(model_cfg(name, **overrides), NUM_CLASSES)


def conv_attrs(module: nn.Module) -> dict[str, tuple]:
    return {name: (m.stride, m.dilation, m.padding) for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d)}


def module_attributes(model: nn.Module) -> dict[tuple[str, str], object]:
    """Every plain attribute of every module (not parameters, buffers or children)."""
    skip = {"_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
            "_state_dict_hooks", "_load_state_dict_pre_hooks", "_non_persistent_buffers_set"}
    return {(name, key): value for name, m in model.named_modules() for key, value in vars(m).items()
            if key not in skip and not key.startswith("_forward") and not key.startswith("_backward")}


# --- every paper configuration: logits at the input size --------------------------------------------

# Rows whose structure another row already covers (same head type, only a rate, a width or the output
# stride differs; every head is checked one by one below), and v1_7x7, the heaviest (its 4096-wide head
# is v1_4x4_r8's with a larger kernel): run with -m slow.
COVERED_ELSEWHERE = {"v1_7x7", "v1_4x4", "v2_largefov", "aspp_s", "v2_r101_msc", "v2_r101_largefov",
                     "v3_train_os8", "v3plus_1conv"}
FULL_GRID = [(training, size, batch) for training in (True, False) for size in (65, 97) for batch in (1, 2)]
# The fast suite runs two forwards that together take every value of each factor, training with one
# image (where BatchNorm can fail) at the odd size 97; -m slow runs the full grid for every row.
FAST_RUNS = [(True, 97, 1), (False, 65, 2)]


def check_output_sizes(model, runs):
    torch.manual_seed(0)
    with torch.no_grad():
        for training, size, batch in runs:
            model.train(training)
            outputs = model(torch.randn(batch, 3, size, size))
            assert outputs["out"].shape == (batch, NUM_CLASSES, size, size)
            assert outputs["logits"].shape == (batch, NUM_CLASSES, *model.logits_size(size, size))
            assert ("scale_logits" in outputs) == (training and bool(model.msc_scales))


@pytest.mark.parametrize("name", [n for n in PAPER_MODELS if n not in COVERED_ELSEWHERE])
def test_paper_model_outputs_input_size(name):
    check_output_sizes(build_model(model_cfg(name), NUM_CLASSES), FAST_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_model_outputs_input_size_full_grid(name):
    check_output_sizes(build_model(model_cfg(name), NUM_CLASSES), FULL_GRID)


@pytest.mark.parametrize("name, stride", [("largefov", 8), ("v2_r101_msc", 8), ("v3", 16),
                                          ("v3_r50_block7_os32", 32), ("v3plus", 4)])
def test_logits_size_rule_on_even_and_odd_sizes(name, stride):
    """A shape rule, so checked on the meta device (same size arithmetic, nothing computed)."""
    model = build_meta(name).eval()
    assert model.logits_stride == stride
    for height, width in [(64, 97), (33, 50), (321, 513)]:
        logits = model(torch.zeros(1, 3, height, width, device="meta"))["logits"]
        assert logits.shape[-2:] == model.logits_size(height, width) == (
            math.ceil(height / stride), math.ceil(width / stride))


# --- ResNet atrous rates: output stride x multi-grid x cascaded blocks --------------------------------

# Rates of block4 (layer4), block5, block6, block7 at each output stride (v3 Fig. 3 / Table 1).
BLOCK_RATES = {32: [1, 2, 4, 8], 16: [2, 4, 8, 16], 8: [4, 8, 16, 32]}
# layer2 / layer3 per unit (torchvision's replace_stride_with_dilation): (first unit stride, dilations)
LAYER23 = {32: {"layer2": (2, [1] * 4), "layer3": (2, [1] * 23)},
           16: {"layer2": (2, [1] * 4), "layer3": (2, [1] * 23)},
           8: {"layer2": (2, [1] * 4), "layer3": (1, [1] + [2] * 22)}}


@pytest.mark.parametrize("multi_grid", [[1, 1, 1], [1, 2, 1], [1, 2, 3], [1, 2, 4], [2, 2, 2]])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_block4_and_cascaded_block_rates(output_stride, multi_grid):
    with torch.device("meta"):
        backbone = ResNetBackbone(101, output_stride=output_stride, multi_grid=multi_grid, cascade_blocks=3)
    for block_index, name in enumerate(["layer4", "block5", "block6", "block7"]):
        for unit_index, unit in enumerate(getattr(backbone, name)):
            rate = BLOCK_RATES[output_stride][block_index] * multi_grid[unit_index]
            strided = name == "layer4" and unit_index == 0 and output_stride == 32
            assert unit.conv2.kernel_size == (3, 3)
            assert unit.conv2.dilation == (rate, rate) and unit.conv2.padding == (rate, rate)
            assert unit.conv2.stride == ((2, 2) if strided else (1, 1))
            if unit.downsample is not None:
                assert unit.downsample[0].stride == unit.conv2.stride
    for name, (first_stride, dilations) in LAYER23[output_stride].items():
        layer = getattr(backbone, name)
        assert [u.conv2.dilation[0] for u in layer] == dilations
        assert [u.conv2.stride[0] for u in layer] == [first_stride] + [1] * (len(layer) - 1)
        assert layer[0].downsample[0].stride == (first_stride, first_stride)
    out = backbone(torch.zeros(1, 3, 65, 65, device="meta"))  # shapes only; real forwards: paper rows
    assert out["out"].shape == (1, 2048, math.ceil(65 / output_stride), math.ceil(65 / output_stride))
    assert out["layer1"].shape == (1, 256, 17, 17)


def test_paper_multi_grid_example():
    """docs/papers.md: OS 16 with MG (1, 2, 4) -> rates 2, 4, 8; OS 8 -> 4, 8, 16."""
    model = build_meta("v3")
    assert model.atrous_rates()["layer4"] == [2, 4, 8]
    model.set_output_stride(8)
    assert model.atrous_rates()["layer4"] == [4, 8, 16]


def aspp_dilations(model) -> list[int]:
    return [m.dilation[0] for name, m in model.head.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and name.startswith("aspp.branches")]


def test_aspp_rates_follow_output_stride_unless_absolute():
    model = build_meta("v3")
    assert aspp_dilations(model) == [6, 12, 18]
    model.set_output_stride(8)
    assert aspp_dilations(model) == [12, 24, 36] and model.output_stride == 8
    model.set_output_stride(32)
    assert aspp_dilations(model) == [3, 6, 9] and model.output_stride == 32
    assert build_meta("v3", output_stride=8).atrous_rates()["head"] == [12, 24, 36]
    absolute = build_meta("v3", aspp_rates_absolute=True, output_stride=8)
    assert aspp_dilations(absolute) == [6, 12, 18]
    absolute.set_output_stride(16)
    assert aspp_dilations(absolute) == [6, 12, 18]


def test_set_output_stride_changes_exactly_strides_dilations_and_restores():
    model = build_model(model_cfg("v3", cascade_blocks=1), NUM_CLASSES)
    before_attrs = module_attributes(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    model.set_output_stride(8)
    after_attrs = module_attributes(model)
    changed = {key for key in before_attrs if before_attrs[key] != after_attrs[key]}
    expected = {("backbone", "output_stride"), ("backbone.layer3.0", "stride"),
                ("backbone.layer3.0.conv2", "stride"), ("backbone.layer3.0.downsample.0", "stride")}
    expected |= {(f"backbone.layer3.{i}.conv2", a) for i in range(1, 23) for a in ("dilation", "padding")}
    expected |= {(f"backbone.{block}.{i}.conv2", a) for block in ("layer4", "block5") for i in range(3)
                 for a in ("dilation", "padding")}
    expected |= {(f"head.aspp.branches.{i}.0", a) for i in (1, 2, 3) for a in ("dilation", "padding")}
    assert changed == expected
    assert set(after_attrs) == set(before_attrs)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    assert all(p is params_before[n] for n, p in model.named_parameters())  # same weights, in place
    model.set_output_stride(16)
    assert module_attributes(model) == before_attrs


def test_vgg_output_stride_is_fixed_at_8():
    model = build_meta("largefov")
    assert model.output_stride == 8
    model.set_output_stride(8)
    with pytest.raises(UserError, match="output stride of 8"):
        model.set_output_stride(16)


# --- equality with torchvision's dilated ResNet-101 ---------------------------------------------------

def torchvision_features(net, x) -> dict[str, torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    features = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(net, name)(x)
        features[name] = x
    return features


@pytest.mark.parametrize("output_stride, replace", [(8, [False, True, True]), (16, [False, False, True]),
                                                     (32, [False, False, False])])
def test_resnet101_multi_grid_111_equals_torchvision_dilated(output_stride, replace):
    """MG (1, 1, 1) is torchvision's dilated ResNet-101, except layer4's first 3x3 conv at OS 8/16.

    torchvision keeps the previous dilation in the unit that lost its stride (2 at OS 8, 1 at OS 16);
    the paper's block4 rule gives it the block rate (4, 2), see backbones/resnet.py. Layers 1-3 must
    match bit for bit; after giving torchvision's conv that one dilation, layer4 must match too.
    """
    torch.manual_seed(0)
    ours = ResNetBackbone(101, output_stride=output_stride, multi_grid=(1, 1, 1)).eval()
    reference = torchvision.models.resnet101(replace_stride_with_dilation=replace).eval()
    missing, unexpected = reference.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    ours_convs, reference_convs = conv_attrs(ours), conv_attrs(reference)
    differing = {n for n in ours_convs if ours_convs[n] != reference_convs[n]}
    block_rate = 32 // output_stride
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        got, want = ours(x), torchvision_features(reference, x)
        for name in ("layer1", "layer2", "layer3"):
            assert torch.equal(got[name], want[name]), name
        if output_stride == 32:
            assert differing == set()
        else:
            assert differing == {"layer4.0.conv2"}
            assert ours_convs["layer4.0.conv2"][1] == (block_rate, block_rate)
            assert reference_convs["layer4.0.conv2"][1] == (block_rate // 2, block_rate // 2)
            assert not torch.equal(got["layer4"], want["layer4"])
            reference.layer4[0].conv2.dilation = reference.layer4[0].conv2.padding = (block_rate, block_rate)
            want = torchvision_features(reference, x)
        assert torch.equal(got["layer4"], want["layer4"])
        assert torch.equal(got["out"], got["layer4"])


# --- heads against docs/papers.md -------------------------------------------------------------------

FC_ROWS = {  # id: (kernel, rates, width, msc)
    "v1_7x7": (7, [4], 4096, False), "v1_4x4": (4, [4], 4096, False), "v1_4x4_r8": (4, [8], 4096, False),
    "largefov": (3, [12], 1024, False), "v1_msc": (4, [4], 4096, True), "v1_msc_largefov": (3, [12], 1024, True),
    "v2_largefov": (3, [12], 1024, False), "aspp_s": (3, [2, 4, 8, 12], 1024, False),
    "aspp_l": (3, [6, 12, 18, 24], 1024, False),
}


@pytest.mark.parametrize("name", list(FC_ROWS))
def test_vgg_fc_head_structure(name):
    kernel, rates, width, msc = FC_ROWS[name]
    model = build_meta(name)
    head = model.head
    assert isinstance(head, FCHead) and len(head.branches) == len(rates)
    for branch, rate in zip(head.branches, rates):
        assert branch.fc6.kernel_size == (kernel, kernel) and branch.fc6.dilation == (rate, rate)
        assert (branch.fc6.in_channels, branch.fc6.out_channels) == (512, width)
        assert branch.fc7.kernel_size == (1, 1) and (branch.fc7.in_channels, branch.fc7.out_channels) == (width, width)
        assert branch.fc8.kernel_size == (1, 1)
        assert (branch.fc8.in_channels, branch.fc8.out_channels) == (width + (640 if msc else 0), NUM_CLASSES)
        assert branch.dropout.p == 0.5
    if msc:
        mlps = head.msc.mlps
        assert list(mlps) == ["image", "pool1", "pool2", "pool3", "pool4"]
        assert [m[0].in_channels for m in mlps.values()] == [3, 64, 128, 256, 512]
        assert all(m[0].kernel_size == (3, 3) and m[0].out_channels == 128 and m[2].kernel_size == (1, 1)
                   and m[2].out_channels == 128 for m in mlps.values())
    # fc6 keeps the stride-8 size for odd and even kernels (shapes computed on the meta device)
    for size in (65, 64):
        out = model.backbone(torch.zeros(1, 3, size, size, device="meta"))["out"]
        assert head.branches[0].fc6(head.branches[0].pad(out)).shape[-2:] == out.shape[-2:] == (
            math.ceil(size / 8),) * 2


def test_vgg_backbone_structure():
    backbone = build_model(model_cfg("largefov"), NUM_CLASSES).backbone
    pools = [m for m in backbone.features if isinstance(m, nn.MaxPool2d)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)] * 2
    convs = [m for m in backbone.features if isinstance(m, nn.Conv2d)]
    assert [c.dilation[0] for c in convs] == [1] * 10 + [2] * 3
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 65, 65))
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "pool1": (64, 33, 33), "pool2": (128, 17, 17), "pool3": (256, 9, 9), "pool4": (512, 9, 9),
        "pool5": (512, 9, 9), "out": (512, 9, 9)}


@pytest.mark.parametrize("name, rates", [("v2_r101", None), ("v2_r101_largefov", [12]),
                                         ("v2_r101_aspp", [6, 12, 18, 24])])
def test_resnet_v2_head_structure(name, rates):
    head = build_meta(name).head
    if rates is None:
        assert isinstance(head, ClassifierHead) and head.classifier.kernel_size == (1, 1)
        assert (head.classifier.in_channels, head.classifier.out_channels) == (2048, NUM_CLASSES)
    else:
        assert isinstance(head, AtrousClassifierHead)
        assert [(c.kernel_size, c.dilation[0], c.padding[0], c.in_channels, c.out_channels, c.bias is not None)
                for c in head.branches] == [((3, 3), r, r, 2048, NUM_CLASSES, True) for r in rates]


class ConstantBranch(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, msc=None):
        return torch.full((x.shape[0], NUM_CLASSES, *x.shape[-2:]), self.value)


def test_aspp_branches_are_fused_by_sum():
    fc_model = build_model(model_cfg("aspp_l"), NUM_CLASSES)
    fc_model.head.branches = nn.ModuleList(ConstantBranch(v) for v in (1.0, 10.0, 100.0, 1000.0))
    features = {"out": torch.randn(2, 512, 5, 7)}
    assert torch.equal(fc_model.head(features), torch.full((2, NUM_CLASSES, 5, 7), 1111.0))
    resnet_head = build_model(model_cfg("v2_r101_aspp"), NUM_CLASSES).head
    for conv, value in zip(resnet_head.branches, (1.0, 2.0, 4.0, 8.0)):
        nn.init.zeros_(conv.weight)
        nn.init.constant_(conv.bias, value)
    assert torch.equal(resnet_head({"out": torch.randn(1, 2048, 5, 5)}), torch.full((1, NUM_CLASSES, 5, 5), 15.0))


class SizeKeyedHead(nn.Module):
    """Returns a fixed random logits map per input size, so the fusion can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.maps = {}
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, features):
        image, out = features["image"], features["out"]
        key = tuple(image.shape[-2:])
        if key not in self.maps:
            self.maps[key] = torch.randn(image.shape[0], NUM_CLASSES, *out.shape[-2:])
        return self.maps[key] + self.weight


def test_msc_fuses_scales_by_max_at_the_largest_scale():
    model = build_model(model_cfg("v2_r101_msc", backbone="resnet50"), NUM_CLASSES)
    model.head = SizeKeyedHead()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        train_out = model.train()(x)
    maps = [model.head.maps[size] for size in [(65, 65), (48, 48), (32, 32)]]  # floor(65 * s)
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 9), (6, 6), (4, 4)]
    upsampled = [maps[0]] + [F.interpolate(m, size=(9, 9), mode="bilinear", align_corners=True)
                             for m in maps[1:]]  # model.align_corners: true by default (Caffe's Interp)
    expected = torch.stack(upsampled).max(dim=0).values
    assert torch.equal(train_out["logits"], expected)
    assert all(torch.equal(a, b) for a, b in zip(train_out["scale_logits"], maps))
    assert torch.equal(train_out["out"], F.interpolate(expected, size=(65, 65), mode="bilinear",
                                                       align_corners=True))
    with torch.no_grad():
        eval_out = model.eval()(x)
    assert set(eval_out) == {"logits", "out"} and torch.equal(eval_out["logits"], expected)


def test_v3_aspp_and_v3plus_decoder_structure():
    head = build_meta("v3").head
    assert isinstance(head, ASPPHead)
    branches = head.aspp.branches
    assert [b[0].kernel_size for b in branches[:4]] == [(1, 1)] + [(3, 3)] * 3
    assert all(b[0].out_channels == 256 and b[0].bias is None and isinstance(b[1], nn.BatchNorm2d)
               for b in branches[:4])
    pooling = branches[4]
    assert pooling.conv.kernel_size == (1, 1) and pooling.conv.out_channels == 256
    assert head.aspp.project[0].in_channels == 5 * 256 and head.aspp.project[0].out_channels == 256
    assert head.classifier.in_channels == 256 and head.classifier.out_channels == NUM_CLASSES
    no_pool = build_meta("v3_aspp_mg124_r24").head.aspp
    assert len(no_pool.branches) == 5 and no_pool.project[0].in_channels == 5 * 256
    decoder = build_meta("v3plus").head
    assert (decoder.low_level[0].in_channels, decoder.low_level[0].out_channels) == (256, 48)
    assert [(c[0].in_channels, c[0].out_channels, c[0].kernel_size) for c in decoder.fuse] == [
        (304, 256, (3, 3)), (256, 256, (3, 3))]
    assert decoder.classifier.in_channels == 256
    one_conv = build_meta("v3plus_1conv", decoder_channels=32).head
    assert len(one_conv.fuse) == 1 and one_conv.fuse[0][0].in_channels == 288


def test_image_pooling_trains_with_batch_of_one():
    model = build_model(model_cfg("v3"), NUM_CLASSES).train()
    pooling = model.head.aspp.branches[-1]
    mean_before = pooling.bn.running_mean.clone()
    out = model(torch.randn(1, 3, 65, 65))["out"]
    out.sum().backward()
    assert pooling.bn.weight.grad is not None and pooling.conv.weight.grad.abs().sum() > 0
    assert torch.equal(pooling.bn.running_mean, mean_before)  # no statistics from a single value
    x = torch.randn(1, 2048, 5, 5)
    with torch.no_grad():
        assert torch.equal(pooling.train()(x), pooling.eval()(x))  # train normalises like eval at N=1
        pooling.train()(torch.randn(2, 2048, 5, 5))
    assert not torch.equal(pooling.bn.running_mean, mean_before)  # batches of 2 use batch statistics


def test_every_batchnorm_uses_the_configured_momentum_and_frozen_bn_stays_frozen():
    model = build_meta("v3plus", bn_momentum=0.0003)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) > 100 and all(m.momentum == 0.0003 for m in batchnorms)
    frozen = build_model(model_cfg("v2_r101"), NUM_CLASSES).train()
    backbone_bns = [m for m in frozen.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and not m.weight.requires_grad for m in backbone_bns)
    stats = [m.running_mean.clone() for m in backbone_bns]
    with torch.no_grad():
        frozen(torch.randn(2, 3, 65, 65))
    assert all(torch.equal(m.running_mean, s) for m, s in zip(backbone_bns, stats))


# --- parameter groups and atrous rates for the summary -------------------------------------------------

def test_parameter_groups_by_role():
    vgg = build_meta("v1_msc_largefov")
    groups = vgg.named_parameter_groups()
    names = {g: {n for n, _ in params} for g, params in groups.items()}
    vgg_convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    assert names["pretrained"] == {f"backbone.features.{i}.{p}" for i in vgg_convs for p in ("weight", "bias")} | {
        f"head.branches.0.{layer}.{p}" for layer in ("fc6", "fc7") for p in ("weight", "bias")}
    assert names["new"] == {"head.branches.0.fc8.weight", "head.branches.0.fc8.bias"} | {
        n for n, _ in vgg.named_parameters() if n.startswith("head.msc.")}
    resnet = build_meta("v3plus", cascade_blocks=1)
    groups = resnet.named_parameter_groups()
    assert all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer")) for n, _ in groups["pretrained"])
    assert all(n.startswith(("head.", "backbone.block5.")) for n, _ in groups["new"])
    assert len(groups["pretrained"]) + len(groups["new"]) == len(list(resnet.parameters()))
    with torch.device("meta"):
        imagenet_resnet101 = torchvision.models.resnet101()
    assert sum(p.numel() for _, p in groups["pretrained"]) == count_parameters(
        imagenet_resnet101) - 2048 * 1000 - 1000  # the ImageNet trunk without fc


def test_atrous_rates_summary():
    rates = build_meta("v3_block7_mg124").atrous_rates()
    assert rates["output_stride"] == 16 and rates["layer4"] == [2, 4, 8] and rates["head"] == []
    assert [rates[b] for b in ("block5", "block6", "block7")] == [[4, 8, 16], [8, 16, 32], [16, 32, 64]]
    assert build_meta("aspp_l").atrous_rates()["head"] == [6, 12, 18, 24]
    assert build_meta("largefov").atrous_rates()["conv5"] == [2, 2, 2]


# --- pretrained initialisation -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vgg16_imagenet_file(tmp_path_factory):
    """A randomly initialised torchvision vgg16 state dict in torchvision's file format."""
    torch.manual_seed(1)
    state = torchvision.models.vgg16().state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name, taps, rows", [
    pytest.param("v1_7x7", [0, 1, 2, 3, 4, 5, 6], list(range(4096)), marks=pytest.mark.slow),
    ("v1_4x4_r8", [0, 2, 4, 6], list(range(4096))),
    ("largefov", [0, 3, 6], list(range(0, 4096, 4))),
    ("aspp_l", [0, 3, 6], list(range(0, 4096, 4))),
])
def test_vgg16_imagenet_conversion(vgg16_imagenet_file, name, taps, rows):
    path, state = vgg16_imagenet_file
    model = build_model(model_cfg(name, pretrained=str(path)), NUM_CLASSES)
    ours = model.state_dict()
    for key in [k for k in state if k.startswith("features.")]:
        assert torch.equal(ours[f"backbone.{key}"], state[key]), key
    fc6 = state["classifier.0.weight"].view(4096, 512, 7, 7)
    rows_t, taps_t = torch.tensor(rows), torch.tensor(taps)
    expected_fc6 = fc6.index_select(0, rows_t).index_select(2, taps_t).index_select(3, taps_t)
    expected_fc7 = state["classifier.3.weight"].index_select(0, rows_t).index_select(1, rows_t)[:, :, None, None]
    for branch in model.head.branches:
        assert torch.equal(branch.fc6.weight, expected_fc6)
        assert torch.equal(branch.fc6.bias, state["classifier.0.bias"][rows_t])
        assert torch.equal(branch.fc7.weight, expected_fc7)
        assert torch.equal(branch.fc7.bias, state["classifier.3.bias"][rows_t])
    assert model.init_source == str(path)


def test_imagenet_reads_torch_hub_cache_and_never_downloads(vgg16_imagenet_file, tmp_path, monkeypatch):
    path, state = vgg16_imagenet_file
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    expected = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    assert imagenet_checkpoint("vgg16") == expected
    with pytest.raises(UserError, match=f"not found at {expected}.*IMAGENET1K_V1"):
        build_model(model_cfg("largefov", pretrained="imagenet"), NUM_CLASSES)
    expected.parent.mkdir()
    expected.symlink_to(path)
    model = build_model(model_cfg("largefov", pretrained="imagenet"), NUM_CLASSES)
    assert torch.equal(model.backbone.features[0].weight, state["features.0.weight"])


def test_resnet_imagenet_state_dict_loads_as_is(tmp_path):
    torch.manual_seed(2)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_model(model_cfg("v3_r50_block7_os8", pretrained=str(path)), NUM_CLASSES)
    ours = model.backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert not any(k.startswith("fc.") for k in ours)
    with pytest.raises(UserError, match="does not match a torchvision resnet101"):
        build_model(model_cfg("v3", pretrained=str(path)), NUM_CLASSES)


def test_own_state_dict_loads_all_but_mismatched_classifier(tmp_path):
    source = build_model(model_cfg("v3", backbone="resnet50"), 91)  # e.g. a COCO model
    path = tmp_path / "coco.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, path)  # Lightning
    model = build_model(model_cfg("v3", backbone="resnet50", pretrained=str(path)), NUM_CLASSES)
    for key, value in model.state_dict().items():
        if key.startswith("head.classifier."):
            assert value.shape[0] == NUM_CLASSES
        else:
            assert torch.equal(value, source.state_dict()[key]), key


def test_missing_or_corrupt_pretrained_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match=f"model.pretrained: file {missing} not found"):
        build_model(model_cfg("v3", pretrained=str(missing)), NUM_CLASSES)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"cannot read {corrupt}"):
        build_model(model_cfg("v3", pretrained=str(corrupt)), NUM_CLASSES)


# --- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, key", [
    (dict(generation="v2", backbone="resnet101", head="fc"), "model.head=fc needs model.backbone=vgg16"),
    (dict(generation="v3plus", backbone="vgg16", head="aspp", output_stride=8), "model.generation=v3plus"),
    (dict(generation="v1", backbone="resnet101", head="classifier"), "model.generation=v1"),
    (dict(generation="v3", multi_grid=[1, 2]), "model.multi_grid"),
    (dict(VGG, generation="v1", output_stride=16), "model.output_stride=16"),
    (dict(VGG, generation="v1", cascade_blocks=1), "model.cascade_blocks"),
    (dict(generation="v3", msc_features=True), "model.msc_features"),
    (dict(generation="v2", backbone="resnet101", head="atrous_classifier", aspp_rates=[]), "model.aspp_rates"),
    (dict(generation="v3", backbone="resnet152"), "model.backbone='resnet152' is unknown"),
    (dict(VGG, generation="v1", fc6_width=1000, pretrained="__vgg__"), "model.fc6_width=1000"),
])
def test_invalid_combinations_name_the_key(fields, key, vgg16_imagenet_file):
    if fields.get("pretrained") == "__vgg__":
        fields = dict(fields, pretrained=str(vgg16_imagenet_file[0]))
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("+", r"\+")):
        build_model(ModelConfig(**fields), NUM_CLASSES)


# --- complexity ---------------------------------------------------------------------------------------

def test_count_macs_is_exact_for_a_convolution():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, (5, 7)) == 8 * 3 * 9 * 5 * 7
    assert count_parameters(conv) == 8 * 3 * 9 + 8


def test_count_macs_on_meta_equals_cpu_and_keeps_mode():
    cfg = model_cfg("v2_r101_largefov", backbone="resnet50")
    model = build_model(cfg, NUM_CLASSES).train()
    cpu_macs = count_macs(model, (65, 65))
    assert model.training
    with torch.device("meta"):
        meta_model = build_model(cfg, NUM_CLASSES)
    assert count_macs(meta_model, (65, 65)) == cpu_macs
    # the three MSC scales (65, 48, 32 -> stride-8 maps 9, 6, 4) run the same network
    single = build_model(dataclasses.replace(cfg, msc_scales=[]), NUM_CLASSES)
    head_macs_per_pixel = 2048 * 9 * NUM_CLASSES  # one 3x3 rate-12 classifier
    total = count_macs(single, (65, 65))
    assert total - count_macs(single.backbone, (65, 65)) == head_macs_per_pixel * 9 * 9
    assert cpu_macs == total + count_macs(single, (48, 48)) + count_macs(single, (32, 32))
