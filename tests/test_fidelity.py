"""What the released configs and the papers fix beyond the rows' numbers: LargeFOV's pool5a, the v1 MSc
stage and its MLPs, Caffe's MSC sizes, output strides beyond 32, the v3+ decoder variants, TF's BatchNorm
without fine-tuning, the evaluation canvas, discrete scales, where the loss is computed, the CRF search."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_lit.config import DatasetInfo, load_experiment, resolve_experiment
from deeplab_lit.errors import UserError
from deeplab_lit.inference import predict_logits_whole, predict_probs
from deeplab_lit.model_summary import summarize
from deeplab_lit.models import build_model
from deeplab_lit.models.deeplab import scaled_size
from deeplab_lit.modules import build_module
from deeplab_lit.modules.losses import downsample_labels
from deeplab_lit.protocols import Protocol

CLASSES = 5


def network(name, *overrides, classes=CLASSES):
    cfg = load_experiment(name, ["model.pretrained=none", *overrides])
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg.model, trainable=()), classes)


# --- v1 / v2 VGG ----------------------------------------------------------------------------------

def test_largefov_averages_pool5_before_fc6_as_the_released_prototxt():
    largefov, four = network("largefov"), network("v1_4x4")
    pool = largefov.head.pool5a
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 1, 1)
    assert pool.count_include_pad  # Caffe divides by the whole window, padding included
    assert isinstance(four.head.pool5a, nn.Identity) and isinstance(network("v2_largefov").head.pool5a, nn.AvgPool2d)
    largefov.eval()
    x = torch.randn(1, 3, 41, 41)
    features = largefov.backbone(x)
    expected = largefov.head.branches[0](F.avg_pool2d(features["out"], 3, 1, 1))
    assert torch.allclose(largefov.head(features), expected, atol=1e-6)


def test_msc_mlps_have_dropout_and_the_prototxt_initialisation():
    head = network("v1_msc").head
    for mlp in head.msc.mlps.values():
        convs = [m for m in mlp.modules() if isinstance(m, nn.Conv2d)]
        dropouts = [m for m in mlp.modules() if isinstance(m, nn.Dropout)]
        assert len(convs) == 2 and [d.p for d in dropouts] == [0.5, 0.5]
        assert all(0.0005 < float(c.weight.std()) < 0.002 and not c.bias.any() for c in convs)  # gaussian 0.001


def test_the_msc_stage_starts_from_its_base_run_and_trains_only_the_new_weights(tmp_path):
    overrides = [f"output_dir={tmp_path}", "seed=3"]
    spec = resolve_experiment("v1_msc", overrides)
    with pytest.raises(UserError, match=r"model.pretrained=run:v1_4x4: no finished run of v1_4x4 \(seed 3\) in .*; "
                                        r"train it first: python -m deeplab_lit.fit --experiment v1_4x4 --seed=3 "
                                        rf"--output_dir={tmp_path}"):
        spec.model_for_training()
    # The base run's final weights, where fit leaves them (model.pt, or last.ckpt's network).
    base = network("v1_4x4", classes=21)
    checkpoints = resolve_experiment("v1_4x4", overrides).default_run_dir() / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in base.state_dict().items()}}, checkpoints / "last.ckpt")
    (checkpoints / "summary.json").write_text("{}")
    module = build_module(spec)
    staged = module.model
    fc8, base_fc8 = staged.head.branches[0].fc8, base.head.branches[0].fc8
    assert fc8.in_channels == 4096 + 640
    assert torch.equal(fc8.weight[:, :4096], base_fc8.weight) and torch.equal(fc8.bias, base_fc8.bias)
    assert torch.equal(staged.head.branches[0].fc6.weight, base.head.branches[0].fc6.weight)
    trainable = {n for n, p in staged.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in staged.named_parameters() if n.startswith(("head.msc.", "head.branches.0.fc8."))}
    groups = {g["name"]: g["lr"] for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups == {"new": pytest.approx(0.001), "new_bias": pytest.approx(0.002)}  # MSc prototxt: lr_mult 1 / 2
    info = summarize(spec, [65])
    msc = sum(p.numel() for n, p in staged.named_parameters() if n.startswith("head.msc."))
    assert info["trainable_parameters"] == msc + fc8.weight.numel() + fc8.bias.numel()
    assert info["parameters"] == sum(p.numel() for p in staged.parameters())


def test_every_experiment_reports_trainable_and_total_parameters():
    info = summarize(resolve_experiment("v2_r101", ["model.backbone=resnet50"]), [65])
    frozen_bn = sum(p.numel() for n, p in network("v2_r101", "model.backbone=resnet50", classes=21).named_parameters()
                    if "bn" in n or "downsample.1" in n)
    assert info["parameters"] - info["trainable_parameters"] == frozen_bn > 0


def test_caffe_msc_sizes():
    assert scaled_size(321, 321, 0.75, "caffe") == (241, 241) and scaled_size(321, 321, 0.5, "caffe") == (161, 161)
    assert scaled_size(321, 321, 0.75) == (240, 240)  # floor(n * s)
    assert scaled_size(513, 385, 0.75, "caffe") == (385, 289)  # ((n - 1) // 4) * 3 + 1


# --- v3 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride, strides, dilations", [
    (64, {"block5": 2, "block6": 1, "block7": 1}, {"block5": 1, "block6": 2, "block7": 4}),
    (128, {"block5": 2, "block6": 2, "block7": 1}, {"block5": 1, "block6": 1, "block7": 2}),
    (256, {"block5": 2, "block6": 2, "block7": 2}, {"block5": 1, "block6": 1, "block7": 1}),
])
def test_output_strides_beyond_32_stride_the_cascaded_blocks(output_stride, strides, dilations):
    model = network(f"v3_r50_block7_os{output_stride}")
    backbone = model.backbone
    assert backbone.layer4[0].conv2.stride == (2, 2)
    for name in ("block5", "block6", "block7"):
        block = getattr(backbone, name)
        assert block[0].conv2.stride == (strides[name],) * 2 and all(u.conv2.stride == (1, 1) for u in block[1:])
        assert all(u.conv2.dilation == (dilations[name],) * 2 for u in block)
        shortcut = block[0].downsample
        assert (shortcut is None) == (strides[name] == 1)
        if shortcut is not None:  # the identity, subsampled (TF's resnet_utils.subsample)
            assert isinstance(shortcut, nn.MaxPool2d) and (shortcut.kernel_size, shortcut.stride) == (1, 2)
    model.eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 97, 97))["out"]
    assert out.shape[-1] == -(-97 // output_stride)
    with pytest.raises(UserError,
                       match=r"model.backbone=resnet50 cannot give model.output_stride=64: with 0 cascaded blocks"):
        load_experiment("v3_r50_block7_os64", ["model.cascade_blocks=0"])


def test_decoder_variants_of_v3plus_table_2():
    narrow = network("v3plus_1conv_128").head
    assert [c[0].out_channels for c in narrow.fuse] == [128] and narrow.classifier.in_channels == 128
    one_by_one = network("v3plus_1conv_1x1").head
    assert [c[0].kernel_size for c in one_by_one.fuse] == [(1, 1)]
    both = network("v3plus_conv2_conv3")
    head = both.head
    assert len(head.coarse) == 1 and head.coarse[0].low_level[0].in_channels == 512  # Conv3 = layer2
    assert head.low_level[0].in_channels == 256 and head.logits_stride == 4
    both.eval()
    with torch.no_grad():
        out = both(torch.randn(1, 3, 67, 53))
    assert out["out"].shape == (1, CLASSES, 67, 53) and out["logits"].shape[-2:] == (17, 14)


def test_without_bn_fine_tuning_statistics_stay_and_affine_trains():
    module_spec = resolve_experiment("v3_no_bn_finetune", ["model.pretrained=none", "model.backbone=resnet50"])
    module = build_module(dataclasses.replace(module_spec, dataset=DatasetInfo("t", CLASSES, tuple("abcde"))))
    bns = module.batchnorm_layers()
    stats = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    affine = [b.weight.detach().clone() for b in bns]
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    assert not any(b.training for b in bns)
    loss = module.compute_loss(module(torch.randn(2, 3, 65, 65)), torch.randint(0, CLASSES, (2, 65, 65)))
    loss.backward()
    optimizer.step()
    assert all(torch.equal(b.running_mean, m) and torch.equal(b.running_var, v) for b, (m, v) in zip(bns, stats))
    assert all(b.weight.requires_grad for b in bns) and any(not torch.equal(b.weight, w) for b, w in zip(bns, affine))


def test_the_loss_can_move_to_the_logits_resolution():
    spec = resolve_experiment("v3_downsample_gt", ["model.pretrained=none", "model.backbone=resnet50"])
    module = build_module(dataclasses.replace(spec, dataset=DatasetInfo("t", CLASSES, tuple("abcde")))).train()
    masks = torch.randint(0, CLASSES, (2, 65, 65))
    outputs = module(torch.randn(2, 3, 65, 65))
    expected = F.cross_entropy(outputs["logits"], downsample_labels(masks, outputs["logits"].shape[-2:]))
    assert torch.allclose(module.compute_loss(outputs, masks), expected)


@torch.no_grad()
def test_the_evaluation_canvas_pads_first_and_crops_at_the_end():
    model = network("v3", "model.backbone=resnet50").eval()
    images = torch.randn(1, 3, 45, 61)
    canvas = Protocol(output_stride=16, canvas=(97, 97))
    probs = predict_probs(model, images, canvas)
    padded = F.pad(images, (0, 97 - 61, 0, 97 - 45))
    expected = predict_logits_whole(model, padded, align=False).softmax(1)[..., :45, :61]
    assert probs.shape == (1, CLASSES, 45, 61) and torch.allclose(probs, expected, atol=1e-6)
    plain = predict_probs(model, images, Protocol(output_stride=16))
    assert not torch.allclose(plain, probs, atol=1e-4)  # image pooling sees the canvas, padding included
    assert canvas.describe()["canvas"] == [97, 97]
    spec = resolve_experiment("v3")
    assert spec.protocols[0].canvas == (513, 513) and all(p.canvas == (513, 513) for p in spec.protocols)
    assert resolve_experiment("cityscapes_v3").protocols[0].canvas == (1025, 2049)


def test_discrete_random_scales_as_tf_deeplab(tmp_path):
    from datamodules.transforms import discrete_scales, seed_transform, train_transform

    assert discrete_scales(0.5, 2.0, 0.25) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    # The crop is larger than any scaled image: the unpadded part of the mask is the scaled image.
    transform = train_transform(crop_size=170, scale_range=(0.5, 2.0), flip=False, seed=0, scale_step=0.25)
    image, mask = np.zeros((80, 80, 3), np.uint8), np.zeros((80, 80), np.uint8)
    sides = set()
    for seed in range(60):
        seed_transform(transform, seed)
        sides.add(int((transform(image=image, mask=mask)["mask"][:, 85] != 255).sum()))
    assert sides == {40, 60, 80, 100, 120, 140, 160}


# --- the CRF search protocol -------------------------------------------------------------------------

def test_search_images_spread_over_the_split():
    from deeplab_lit.crf_validation import search_indices

    assert search_indices(1449, 100)[:3] == [0, 15, 29] and search_indices(1449, 100)[-1] == 1448
    assert len(search_indices(1449, 100)) == 100 and search_indices(7, 100) == list(range(7))
    assert search_indices(10, 1) == [0]


def test_coarse_to_fine_finds_the_best_setting_of_a_grid():
    from deeplab_lit.crf_validation import coarse_to_fine, evaluate_settings

    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 3, (6, 8)), 8, 0), 8, 1)
    image = (labels[..., None] * 80 + rng.integers(0, 20, labels.shape + (3,))).astype(np.uint8)
    logits = torch.from_numpy(np.eye(3)[labels].transpose(2, 0, 1) * 1.5 + rng.normal(0, 1.5, (3,) + labels.shape))
    probs = logits.float().softmax(0)
    entries = [{"probs": probs.half(), "rgb": torch.from_numpy(image), "mask": torch.from_numpy(labels)}]
    fixed = {"iterations": 5, "pos_w": 3, "pos_xy_std": 3}
    ranges = {"bi_w": [3, 6], "bi_xy_std": [20, 60], "bi_rgb_std": [3, 10]}
    result = coarse_to_fine(entries, 3, fixed, "cpu", ranges, fine=False)
    scores = evaluate_settings(entries, 3, [dict(fixed, bi_w=w, bi_xy_std=xy, bi_rgb_std=rgb) for w in (3, 6)
                                            for xy in (20, 60) for rgb in (3, 10)], "cpu")
    assert result.best_miou == max(scores) and len(result.rows) == 8
    assert result.best == {k: result.rows[0][k] for k in ("iterations", "pos_w", "pos_xy_std", "bi_w", "bi_xy_std",
                                                           "bi_rgb_std")}
    assert result.best_miou >= result.miou_without_crf
    json.dumps(result.record())  # plain data for the summary record
