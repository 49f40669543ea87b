"""`model.backbone=timm:<name>`: timm models under the DeepLab heads. Shapes on odd inputs, the in-place
output-stride switch against timm's own construction, parameter counts, multi-grid, one-line refusals at
resolution time, weight import, and two training steps through `fit` on the synthetic data."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

from deeplab_lit.config import ModelConfig, load_experiment
from deeplab_lit.errors import UserError
from deeplab_lit.fit import main as fit_main
from deeplab_lit.models import build_model, count_parameters, supported_output_strides
from deeplab_lit.models.backbones import TimmBackbone

NUM_CLASSES = 21
SMALL = ["resnet18d", "regnety_002"]  # a ResNet-D (avg-pool shortcut) and a RegNet, both small


def conv_layout(module: nn.Module) -> dict:
    return {name: (type(m).__name__, m.stride, m.dilation, m.padding) if isinstance(m, nn.Conv2d)
            else type(m).__name__ for name, m in module.named_modules()}


@pytest.mark.parametrize("name", SMALL)
def test_switch_in_place_equals_timms_own_construction(name):
    torch.manual_seed(0)
    backbone = TimmBackbone(name, output_stride=16).eval()
    parameters = {k: p for k, p in backbone.named_parameters()}
    x = torch.randn(1, 3, 65, 65)
    for output_stride in (8, 32, 16):
        backbone.set_output_stride(output_stride)
        reference = timm.create_model(name, output_stride=output_stride).eval()
        reference.prune_intermediate_layers(indices=None, prune_head=True, prune_norm=False)
        reference.load_state_dict(backbone.model.state_dict())
        assert conv_layout(backbone.model) == conv_layout(reference)
        with torch.no_grad():
            ours = backbone(x)
            theirs = reference.forward_intermediates(x, indices=backbone.indices, intermediates_only=True)
        assert torch.equal(ours["out"], theirs[-1]) and torch.equal(ours["stride4"], theirs[0])
        assert ours["out"].shape[-1] == math.ceil(65 / output_stride) and ours["stride4"].shape[-1] == 17
    assert all(p is parameters[k] for k, p in backbone.named_parameters())  # the same weights, in place


@pytest.mark.parametrize("name", SMALL)
def test_parameter_count_equals_timms_features_only_model(name):
    with torch.device("meta"):
        ours = TimmBackbone(name, output_stride=16)
        features_only = timm.create_model(name, features_only=True, output_stride=16)
    assert count_parameters(ours) == count_parameters(features_only)


def test_v3plus_on_odd_inputs_at_output_stride_8_and_16():
    torch.manual_seed(0)
    model = build_model(ModelConfig(generation="v3plus", backbone="timm:regnety_002", multi_grid=[1, 1, 1]),
                        NUM_CLASSES)
    assert model.head.low_level_key == "stride4" and model.head.low_level[0].in_channels == 24
    for output_stride in (16, 8):
        model.set_output_stride(output_stride)
        for training, size, batch in [(True, 97, 1), (False, 65, 2)]:
            model.train(training)
            with torch.no_grad():
                out = model(torch.randn(batch, 3, size, size))
            assert out["out"].shape == (batch, NUM_CLASSES, size, size)
            assert out["logits"].shape[-2:] == (math.ceil(size / 4),) * 2
        assert model.atrous_rates()["head"] == [96 // output_stride, 192 // output_stride, 288 // output_stride]


def test_multi_grid_on_the_last_three_units_follows_the_papers_rule():
    with torch.device("meta"):
        backbone = TimmBackbone("resnet50d", output_stride=16, multi_grid=(1, 2, 4))
        plain = TimmBackbone("resnet50d", output_stride=16)
    assert [u.conv2.dilation[0] for u in plain.model.layer4] == [1, 2, 2]  # timm's rule
    assert [u.conv2.dilation[0] for u in backbone.model.layer4] == [2, 4, 8]  # block rate 2 x (1, 2, 4)
    assert [u.conv2.padding[0] for u in backbone.model.layer4] == [2, 4, 8]
    backbone.set_output_stride(8)
    assert [u.conv2.dilation[0] for u in backbone.model.layer4] == [4, 8, 16]
    assert [u.conv2.dilation[0] for u in backbone.model.layer3][1:] == [2] * 5


@pytest.mark.parametrize("overrides, message", [
    (["model.backbone=timm:resnet5"], "model.backbone='timm:resnet5' is not a model of timm 1.0.31 (did you mean "
                                      "'timm:resnet50'?)"),
    (["model.backbone=timm:vit_tiny_patch16_224"], "model.backbone=timm:vit_tiny_patch16_224 cannot give "
                                                   "model.output_stride=16: timm builds it at no output stride"),
    (["model.backbone=timm:convnext_atto"], "eval.protocols[0].output_stride=8: model.backbone=timm:convnext_atto "
                                            "evaluates at output stride 16 only"),
    (["model.backbone=timm:regnety_002", "model.multi_grid=[1, 2, 4]"],
     "model.multi_grid=[1, 2, 4]: model.backbone=timm:regnety_002 cannot apply multi-grid (its last stage s4 has "
     "7 units"),
    (["model.backbone=timm:resnet18d", "model.cascade_blocks=1"], "model.cascade_blocks copies ResNet's block4"),
])
def test_unsupported_names_and_strides_are_one_line_at_resolution(overrides, message):
    with pytest.raises(UserError) as error:
        load_experiment("v3plus_timm", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_supported_output_strides_come_from_timm():
    cfg = ModelConfig(generation="v3plus", backbone="timm:resnet50d", multi_grid=[1, 1, 1])
    assert supported_output_strides(cfg) == (8, 16, 32)
    convnext = ModelConfig(generation="v3plus", backbone="timm:convnext_atto", multi_grid=[1, 1, 1])
    assert supported_output_strides(convnext) == (16,)  # its downsampling convs change type when dilated
    assert load_experiment("v3plus_timm", ["model.backbone=timm:resnet50d.a1_in1k"]).model.backbone == \
        "timm:resnet50d.a1_in1k"  # a timm pretrained tag is part of the name


def test_weight_import_from_a_timm_state_dict(tmp_path):
    torch.manual_seed(4)
    state = timm.create_model("resnet18d").state_dict()
    path = tmp_path / "resnet18d.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(generation="v3", backbone="timm:resnet18d", multi_grid=[1, 1, 1],
                                    pretrained=str(path)), NUM_CLASSES)
    ours = model.backbone.state_dict()
    assert set(ours) == {f"model.{k}" for k in state if not k.startswith("fc.")}
    assert all(torch.equal(v, state[k.removeprefix("model.")]) for k, v in ours.items())
    with pytest.raises(UserError, match="does not match timm's regnety_002"):
        build_model(ModelConfig(generation="v3", backbone="timm:regnety_002", multi_grid=[1, 1, 1],
                                pretrained=str(path)), NUM_CLASSES)


FAST = ["data.name=synthetic", "data.root=", "model.pretrained=none", "data.crop_size=65", "data.batch_size=2",
        "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "wandb.mode=disabled"]


@pytest.mark.parametrize("backbone", [pytest.param("timm:resnet18d", marks=pytest.mark.slow), "timm:regnety_002"])
def test_fit_two_steps_of_v3plus_on_a_timm_backbone(tmp_path, backbone):
    run_dir = tmp_path / "run"
    args = ["--experiment", "v3plus_timm", "--run-dir", str(run_dir),
            *[f"--{o}" for o in [*FAST, f"model.backbone={backbone}"]]]
    assert fit_main(args) == 0
    summary = json.loads((run_dir / "checkpoints" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["model"]["backbone"] == backbone
    assert set(summary["metrics"]) >= {"val/mIoU", "val/mIoU_os8"}  # trained at 16, evaluated at 16 and 8
    assert summary["protocol"]["init_source"] == "random (no pre-training)"
