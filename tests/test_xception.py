"""DeepLab v3+ with the aligned Xception (v3+ Sec. 3.2, Tables 5 and 7) against TF DeepLab and timm: the
dilation pattern read from the conv modules, timm's own output-stride construction, the decoder's feature,
parameter counts, separable convs where TF puts them, weight import, Multiply-Adds. CPU, odd inputs."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from deeplab_lit.config import ModelConfig, load_experiment
from deeplab_lit.errors import UserError
from deeplab_lit.models import build_model, count_macs, count_parameters, imagenet_checkpoint, imagenet_source
from deeplab_lit.models import pretrained as pretrained_module
from deeplab_lit.models.backbones import XceptionBackbone
from deeplab_lit.models.batchnorm import convert_sync_batchnorm, revert_sync_batchnorm

NUM_CLASSES = 21
X65 = dict(backbone="xception65", multi_grid=[1, 1, 1], aspp_rates=[6, 12, 18])


def model_cfg(**fields) -> ModelConfig:
    return ModelConfig(**{"generation": "v3plus", **X65, **fields})


def meta_backbone(variant="xception65", **kwargs) -> XceptionBackbone:
    with torch.device("meta"):
        return XceptionBackbone(variant, **kwargs)


# --- the dilation pattern: TF's stack_blocks_dense, read from the conv modules ------------------------

# TF core/xception.py, stack_blocks_dense after the stride-2 root: (rate, stride of the unit's third
# depthwise conv and shortcut) per entry-flow block, the middle-flow rate, exit_flow/block1 (rate,
# stride), exit_flow/block2's rate (times multi-grid). The same table is in backbones/xception.py.
TF_PATTERN = {
    "xception65": {
        32: ([(1, 2), (1, 2), (1, 2)], 1, (1, 2), 1),
        16: ([(1, 2), (1, 2), (1, 2)], 1, (1, 1), 2),
        8: ([(1, 2), (1, 2), (1, 1)], 2, (2, 1), 4),
    },
    "xception71": {  # entry flow strides 2, 1, 2, 1, 2
        32: ([(1, 2), (1, 1), (1, 2), (1, 1), (1, 2)], 1, (1, 2), 1),
        16: ([(1, 2), (1, 1), (1, 2), (1, 1), (1, 2)], 1, (1, 1), 2),
        8: ([(1, 2), (1, 1), (1, 2), (1, 1), (1, 1)], 2, (2, 1), 4),
    },
}


def expected_units(variant, output_stride, multi_grid=(1, 1, 1)):
    """[(stride, dilation, padding) of the three depthwise convs, shortcut stride or None] per unit."""
    entry, middle_rate, (exit_rate, exit_stride), exit2_rate = TF_PATTERN[variant][output_stride]

    def unit(rate, stride, rates=(1, 1, 1), shortcut=True):
        convs = [(stride if i == 2 else 1, rate * r, 1 if (stride if i == 2 else 1) == 2 else rate * r)
                 for i, r in enumerate(rates)]
        return convs, (stride if shortcut else None)

    units = [unit(rate, stride) for rate, stride in entry]
    units += [unit(middle_rate, 1, shortcut=False)] * 16
    units += [unit(exit_rate, exit_stride), unit(exit2_rate, 1, multi_grid, shortcut=False)]
    return units


def read_units(backbone):
    """The same, read from the live nn.Conv2d modules."""
    out = []
    for block in backbone.blocks:
        convs = [getattr(block.stack, f"conv{i}").conv_dw for i in (1, 2, 3)]
        assert all(isinstance(c, nn.Conv2d) and c.groups == c.in_channels and c.kernel_size == (3, 3) for c in convs)
        out.append(([(c.stride[0], c.dilation[0], c.padding[0]) for c in convs],
                    block.shortcut.conv.stride[0] if block.shortcut is not None else None))
    return out


@pytest.mark.parametrize("variant", ["xception65", "xception71"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_tf_dilation_pattern_read_from_the_conv_modules(variant, output_stride):
    built = meta_backbone(variant, output_stride=output_stride)
    assert read_units(built) == expected_units(variant, output_stride)
    switched = meta_backbone(variant, output_stride=16 if output_stride != 16 else 8)
    switched.set_output_stride(output_stride)  # in place, from another stride
    assert read_units(switched) == expected_units(variant, output_stride) and switched.output_stride == output_stride
    assert [c.stride for c in (built.stem[0].conv, built.stem[1].conv)] == [(2, 2), (1, 1)]


def test_multi_grid_multiplies_exit_flow_block2_only():
    backbone = meta_backbone(output_stride=16, multi_grid=(1, 2, 4))
    assert read_units(backbone) == expected_units("xception65", 16, (1, 2, 4))
    assert backbone.atrous_rates()["exit_flow/block2"] == [2, 4, 8]
    backbone.set_output_stride(8)
    assert backbone.atrous_rates() == {"entry_flow": [1, 1, 1], "middle_flow": [2] * 16, "exit_flow/block1": [2, 2, 2],
                                       "exit_flow/block2": [4, 8, 16]}


def plain_attributes(module: nn.Module) -> dict:
    return {(name, key): value for name, m in module.named_modules() for key, value in vars(m).items()
            if not key.startswith("_") and key != "training"}


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_switched_layout_equals_timms_own_output_stride_construction(output_stride):
    ours = meta_backbone(output_stride=32)
    ours.set_output_stride(output_stride)
    with torch.device("meta"):
        theirs = timm.create_model("xception65", output_stride=output_stride, num_classes=0)
    for part in ("stem", "blocks"):
        assert plain_attributes(getattr(ours, part)) == plain_attributes(getattr(theirs, part))


def test_parameter_count_equals_timms_features_only_model():
    with torch.device("meta"):
        features_only = timm.create_model("xception65", features_only=True)
        full = timm.create_model("xception65")
    ours = count_parameters(meta_backbone())
    assert ours == count_parameters(features_only) == count_parameters(full) - (2048 * 1000 + 1000) == 37_867_312


# --- forward: TF's decoder feature, timm's numbers, full networks on odd inputs --------------------------

@pytest.fixture(scope="module")
def backbone_and_timm():
    torch.manual_seed(0)
    ours = XceptionBackbone("xception65", output_stride=16).eval()
    theirs = timm.create_model("xception65", output_stride=16, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for module in [*ours.modules(), *theirs.modules()]:  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs


def test_forward_equals_timm_and_taps_tfs_decoder_end_point(backbone_and_timm):
    ours, theirs = backbone_and_timm
    x = torch.randn(1, 3, 65, 65)
    taps = []
    hook = theirs.blocks[1].stack.conv2.register_forward_hook(lambda m, i, o: taps.append(o.clone()))
    with torch.no_grad():
        features = ours(x)
        expected = theirs.forward_features(x * ours.input_scale + ours.input_shift)  # [-1, 1] inputs
    hook.remove()
    assert list(features) == ["entry_flow/block2", "out"] and ours.low_level_feature == "entry_flow/block2"
    assert torch.equal(features["out"], expected)
    # separable_conv2_pointwise of entry_flow/block2: BN output before the ReLU (negative values kept)
    assert torch.equal(features["entry_flow/block2"], taps[0]) and features["entry_flow/block2"].min() < 0
    assert features["entry_flow/block2"].shape == (1, 256, 17, 17) and features["out"].shape == (1, 2048, 5, 5)


def test_inputs_are_mapped_from_imagenet_to_tfs_minus_one_to_one():
    backbone = XceptionBackbone("xception65")
    rgb = torch.rand(1, 3, 4, 4)
    imagenet = (rgb - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(imagenet * backbone.input_scale + backbone.input_shift, 2 * rgb - 1, atol=1e-6)
    assert not any("input_" in k for k in backbone.state_dict())  # not weights


def test_xception71_decoder_feature_is_tfs_entry_flow_block3():
    backbone = meta_backbone("xception71")
    assert (backbone.low_level_block, backbone.low_level_feature) == (2, "entry_flow/block3")
    features = backbone(torch.zeros(1, 3, 97, 97, device="meta"))
    assert features["entry_flow/block3"].shape == (1, 256, 25, 25) and features["out"].shape == (1, 2048, 7, 7)


@pytest.mark.parametrize("generation, separable", [("v3plus", True),
                                                   pytest.param("v3", False, marks=pytest.mark.slow)])
def test_full_networks_on_odd_inputs_at_output_stride_8_and_16(generation, separable):
    torch.manual_seed(0)
    model = build_model(model_cfg(generation=generation, separable=separable), NUM_CLASSES)
    for output_stride in (16, 8):
        model.set_output_stride(output_stride)
        assert model.backbone.output_stride == output_stride
        for training, size, batch in [(True, 97, 1), (False, 65, 2)]:
            model.train(training)
            with torch.no_grad():
                out = model(torch.randn(batch, 3, size, size))
            stride = 4 if generation == "v3plus" else output_stride
            assert out["out"].shape == (batch, NUM_CLASSES, size, size)
            assert out["logits"].shape == (batch, NUM_CLASSES, math.ceil(size / stride), math.ceil(size / stride))
        assert model.atrous_rates()["head"] == [6 * 16 // output_stride, 12 * 16 // output_stride, 18 * 16 // output_stride]


# --- separable convs where TF DeepLab has them ---------------------------------------------------------

def separable(block, in_channels, out_channels, rate):
    depthwise, bn1, relu1, pointwise, bn2, relu2 = block
    return (isinstance(depthwise, nn.Conv2d) and depthwise.groups == depthwise.in_channels == in_channels
            and depthwise.out_channels == in_channels and depthwise.kernel_size == (3, 3)
            and depthwise.dilation == (rate, rate) and depthwise.padding == (rate, rate) and depthwise.bias is None
            and isinstance(bn1, nn.BatchNorm2d) and bn1.num_features == in_channels and isinstance(relu1, nn.ReLU)
            and pointwise.kernel_size == (1, 1) and pointwise.groups == 1 and pointwise.bias is None
            and (pointwise.in_channels, pointwise.out_channels) == (in_channels, out_channels)
            and isinstance(bn2, nn.BatchNorm2d) and bn2.num_features == out_channels and isinstance(relu2, nn.ReLU))


def plain(block, in_channels, out_channels, kernel):
    conv, bn, relu = block
    return (conv.groups == 1 and conv.kernel_size == (kernel, kernel) and conv.bias is None
            and (conv.in_channels, conv.out_channels) == (in_channels, out_channels)
            and isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU))


def test_separable_convs_in_aspp_and_decoder_where_tf_places_them():
    with torch.device("meta"):
        head = build_model(model_cfg(separable=True), NUM_CLASSES).head
    branches = head.aspp.branches
    assert plain(branches[0], 2048, 256, 1)  # TF aspp0: a 1x1 conv
    assert [separable(b, 2048, 256, r) for b, r in zip(branches[1:4], (6, 12, 18))] == [True] * 3  # aspp1-3
    assert branches[4].conv.kernel_size == (1, 1) and branches[4].conv.groups == 1  # image pooling: plain
    assert head.aspp.project[0].kernel_size == (1, 1) and head.aspp.project[0].groups == 1  # concat_projection
    assert plain(head.low_level, 256, 48, 1)  # feature_projection0: plain 1x1
    assert [separable(b, c, 256, 1) for b, c in zip(head.fuse, (304, 256))] == [True, True]  # decoder_conv0/1
    head.set_output_stride(8)
    assert [b[0].dilation[0] for b in branches[1:4]] == [12, 24, 36] == head.atrous_rates()
    with torch.device("meta"):
        plain_head = build_model(model_cfg(separable=False), NUM_CLASSES).head
    assert all(plain(b, 2048, 256, 3) for b in plain_head.aspp.branches[1:4])
    assert all(plain(b, c, 256, 3) for b, c in zip(plain_head.fuse, (304, 256)))
    depthwise = [m for m in plain_head.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise == []


def test_multiply_adds_match_tf_model_zoo():
    """TF's 54.17B (Table 5, decoder + SC, OS 16, 513x513) and 418.64B (model_zoo.md, Cityscapes 1025x2049)
    against ours; TF's tfprof also counts a little padding work of its atrous convs (space_to_batch)."""
    with torch.device("meta"):
        voc = build_model(model_cfg(separable=True), NUM_CLASSES)
        cityscapes = build_model(model_cfg(separable=True), 19)
    assert count_macs(voc, (513, 513)) / 1e9 == pytest.approx(54.17, rel=0.005)
    assert count_macs(cityscapes, (1025, 2049)) / 1e9 == pytest.approx(418.64, rel=0.002)


# --- ImageNet weights from timm ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_state(tmp_path_factory):
    """A randomly initialised timm xception65 state dict (classifier included), as .pth and .safetensors."""
    torch.manual_seed(3)
    state = timm.create_model("xception65").state_dict()
    root = tmp_path_factory.mktemp("timm")
    torch.save(state, root / "xception65.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    return state, root


@pytest.mark.parametrize("file_name", ["xception65.pth", "model.safetensors"])
def test_weight_import_from_a_timm_state_dict(timm_state, file_name):
    state, root = timm_state
    model = build_model(model_cfg(separable=True, pretrained=str(root / file_name)), NUM_CLASSES)
    ours = model.backbone.state_dict()
    assert set(ours) == {k for k in state if not k.startswith("head.")}
    assert all(torch.equal(ours[k], state[k]) for k in ours)
    assert model.init_source == str(root / file_name)


def test_a_state_dict_of_another_network_is_one_line(tmp_path):
    path = tmp_path / "xception71.pth"
    with torch.device("meta"):
        other = timm.create_model("xception71")
    torch.save({k: torch.zeros(v.shape) for k, v in other.state_dict().items()}, path)
    with pytest.raises(UserError, match=r"does not match timm's xception65 .*of another shape") as error:
        build_model(model_cfg(pretrained=str(path)), NUM_CLASSES)
    assert "\n" not in str(error.value)


def test_imagenet_reads_the_hugging_face_cache_and_never_downloads(timm_state, tmp_path, monkeypatch):
    state, root = timm_state
    monkeypatch.setattr(pretrained_module, "hf_cache_dir", lambda: tmp_path)
    repo = tmp_path / "models--timm--xception65.tf_in1k"
    assert imagenet_checkpoint("xception65") == repo and imagenet_source("xception65") == "timm xception65.tf_in1k"
    with pytest.raises(UserError, match=r"not in the Hugging Face cache .*timm.create_model\('xception65.tf_in1k', "
                                        r"pretrained=True\)"):
        build_model(model_cfg(pretrained="imagenet"), NUM_CLASSES)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(root / "model.safetensors")
    assert imagenet_checkpoint("xception65") == snapshot / "model.safetensors"
    model = build_model(model_cfg(pretrained="imagenet"), NUM_CLASSES)
    assert torch.equal(model.backbone.blocks[20].stack.conv3.conv_pw.weight, state["blocks.20.stack.conv3.conv_pw.weight"])
    assert model.init_source == f"imagenet:{snapshot / 'model.safetensors'}"


# --- rules, recipe, BatchNorm ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(cascade_blocks=1), "model.cascade_blocks copies ResNet's block4"),
    (dict(generation="v3", head="classifier", separable=True), "model.separable=true"),
    (dict(output_stride=12), "model.output_stride=12: it supports output stride 8, 16, 32"),
])
def test_invalid_xception_combinations_name_the_key(fields, message):
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(**{"generation": "v3plus", **X65, **fields}), NUM_CLASSES)


def test_experiments_follow_the_paper_and_tf():
    sc = load_experiment("v3plus_xception65_sc")
    assert (sc.model.backbone, sc.model.separable, list(sc.model.multi_grid), sc.model.output_stride) == (
        "xception65", True, [1, 1, 1], 16)
    assert (sc.optim.weight_decay, sc.optim.depthwise_weight_decay, sc.optim.lr, sc.data.crop_size) == (
        0.00004, False, 0.007, 513)
    assert load_experiment("cityscapes_v3plus_xception71").model.backbone == "xception71"


def test_depthwise_weights_get_no_weight_decay():
    import dataclasses

    from deeplab_lit.config import DatasetInfo, resolve_experiment
    from deeplab_lit.modules import build_module

    spec = resolve_experiment("v3plus_xception65_sc", ["model.pretrained=none"])
    spec = dataclasses.replace(spec, dataset=DatasetInfo("test", 5, tuple(f"c{i}" for i in range(5))))
    module = build_module(spec)
    groups = {g["name"]: g for g in module.parameter_groups()}
    assert (groups["pretrained_depthwise"]["weight_decay"], groups["new_depthwise"]["weight_decay"]) == (0.0, 0.0)
    assert groups["pretrained"]["weight_decay"] == groups["new"]["weight_decay"] == 0.00004
    assert len(groups["pretrained_depthwise"]["params"]) == 21 * 3  # every unit's three depthwise convs
    assert len(groups["new_depthwise"]["params"]) == 3 + 2  # ASPP branches, decoder convs
    assert sum(len(g["params"]) for g in groups.values()) == len(list(module.parameters()))


def test_sync_batchnorm_keeps_the_stems_activation(backbone_and_timm):
    backbone = copy.deepcopy(backbone_and_timm[0])
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        before = backbone(x)["out"]
        synced = convert_sync_batchnorm(backbone)
        assert isinstance(synced.stem[0].bn, nn.SyncBatchNorm) and isinstance(synced.stem[0].bn.act, nn.ReLU)
        assert torch.equal(synced(x)["out"], before)
        reverted = revert_sync_batchnorm(synced)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
        assert torch.equal(reverted(x)["out"], before)


@pytest.mark.slow
def test_fit_two_steps_of_v3plus_xception65_sc(tmp_path):
    import json

    from deeplab_lit.fit import main as fit_main

    fast = ["data.name=synthetic", "data.root=", "model.pretrained=none", "data.crop_size=65", "data.batch_size=2",
            "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "wandb.mode=disabled"]
    assert fit_main(["--experiment", "v3plus_xception65_sc", "--run-dir", str(tmp_path / "run"),
                     *[f"--{o}" for o in fast]]) == 0
    summary = json.loads((tmp_path / "run" / "checkpoints" / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["metrics"]) >= {"val/mIoU", "val/mIoU_os8", "val/mIoU_os8_ms_flip"}


def test_bn_sync_trains_with_the_activation_keeping_plugin(tmp_path):
    import pickle

    from deeplab_lit.config import resolve_experiment
    from deeplab_lit.sync_batchnorm import SyncBatchNormKeepingActivations
    from deeplab_lit.trainer import build_trainer

    spec = resolve_experiment("v3plus_xception65_sc", ["model.bn=sync", "data.name=synthetic", "data.root="])
    trainer = build_trainer(spec, root_dir=tmp_path, progress_bar=False)
    assert isinstance(trainer._accelerator_connector._layer_sync, SyncBatchNormKeepingActivations)
    assert isinstance(pickle.loads(pickle.dumps(trainer._accelerator_connector._layer_sync)), SyncBatchNormKeepingActivations)
