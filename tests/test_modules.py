"""The training recipes: poly per step, parameter groups, the v1/v2 losses, BatchNorm modes, the metric."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dataclasses

from deeplab_lit.config import DatasetInfo, resolve_experiment
from deeplab_lit.modules import MODULES, build_module
from deeplab_lit.modules.base import poly_factor, step_factor
from deeplab_lit.modules.losses import downsample_labels

CLASSES = [f"c{i}" for i in range(5)]


def module_for(name, *overrides):
    spec = resolve_experiment(name, ["model.pretrained=none", *overrides])
    spec = dataclasses.replace(spec, dataset=DatasetInfo("test", len(CLASSES), tuple(CLASSES)))
    torch.manual_seed(0)
    return build_module(spec)


def scheduled_lrs(module, steps):
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return optimizer, seen


def test_poly_schedule_steps_every_iteration():
    module = module_for("v3plus", "model.backbone=resnet50", "trainer.max_steps=10")
    optimizer, seen = scheduled_lrs(module, 10)
    for step, lrs in enumerate(seen):
        expected = 0.007 * (1 - step / 10) ** 0.9
        assert lrs[0] == pytest.approx(expected, rel=1e-12)
    assert poly_factor(10, 10, 0.9) == 0.0 and poly_factor(5, 10, 0.9) == pytest.approx(0.5**0.9)


def test_v1_step_schedule():
    module = module_for("largefov", "trainer.max_steps=6000")
    assert [module.lr_factor(s) for s in (0, 1999, 2000, 3999, 4000, 5999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert step_factor(2000, 2000, 0.1) == pytest.approx(0.1)


def groups_by_name(module):
    optimizer = module.configure_optimizers()["optimizer"]
    return {g["name"]: (g["lr"], g["weight_decay"], sum(p.numel() for p in g["params"])) for g in optimizer.param_groups}


def test_v1_parameter_groups_follow_caffe_multipliers():
    groups = groups_by_name(module_for("largefov"))
    assert {k: v[:2] for k, v in groups.items()} == {
        "pretrained": (pytest.approx(0.001), 0.0005),
        "pretrained_bias": (pytest.approx(0.002), 0.0),
        "new": (pytest.approx(0.01), 0.0005),
        "new_bias": (pytest.approx(0.02), 0.0),
    }
    # "new" in LargeFOV is fc8 only: 1024 -> 5 classes, 1x1; fc6/fc7 come from VGG's fc layers.
    assert groups["new"][2] == 1024 * 5 and groups["new_bias"][2] == 5


def test_v2_resnet_groups_and_frozen_bn_has_no_trainable_parameters():
    module = module_for("v2_r101_aspp", "model.backbone=resnet50")
    groups = groups_by_name(module)
    assert groups["new"][:2] == (pytest.approx(0.0025), 0.0005)
    assert groups["new_bias"][:2] == (pytest.approx(0.005), 0.0)
    assert groups["new"][2] == 4 * (2048 * 5 * 3 * 3) and groups["new_bias"][2] == 4 * 5  # four 3x3 classifiers
    assert "pretrained_bias" not in groups  # ResNet convs have no bias and its BatchNorm is frozen
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert all(id(p) not in trainable for bn in module.batchnorm_layers() for p in bn.parameters())


def test_v3_groups_no_decay_on_biases_and_norms():
    groups = groups_by_name(module_for("v3", "model.backbone=resnet50"))
    assert groups["pretrained"][:2] == (pytest.approx(0.007), 0.0001)
    assert groups["pretrained_bias"][:2] == (pytest.approx(0.007), 0.0)
    assert groups["new"][:2] == (pytest.approx(0.007), 0.0001)
    assert groups["new_bias"][:2] == (pytest.approx(0.007), 0.0)


def test_v2_msc_loss_has_one_term_per_scale_plus_fused():
    module = module_for("v2_r101_msc", "model.backbone=resnet50").train()
    images = torch.randn(2, 3, 65, 65)
    masks = torch.randint(0, 5, (2, 65, 65))
    masks[:, :5] = 255
    outputs = module(images)
    terms = module.loss_terms(outputs, masks)
    assert len(terms) == 4  # fused + scales 1, 0.75, 0.5
    maps = [outputs["logits"], *outputs["scale_logits"]]
    # Caffe's Interp sizes for the 65 input: 0.75 -> ((65 - 1) // 4) * 3 + 1 = 49, 0.5 -> 33; logits ceil(n / 8)
    assert [tuple(m.shape[-2:]) for m in maps] == [(9, 9), (9, 9), (7, 7), (5, 5)]
    for term, logits in zip(terms, maps):
        size = logits.shape[-2:]
        target = downsample_labels(masks, size)
        assert torch.allclose(term, F.cross_entropy(logits, target, ignore_index=255))
    assert torch.allclose(module.compute_loss(outputs, masks), sum(terms))


def test_v1_loss_uses_ground_truth_shrunk_by_8_nearest():
    masks = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]])
    assert downsample_labels(masks, (2, 2)).tolist() == [[[0, 1], [2, 3]]]
    odd = torch.arange(17 * 17).reshape(1, 17, 17)
    assert torch.equal(downsample_labels(odd, (3, 3)), odd[:, ::8, ::8])
    module = module_for("largefov").train()
    images = torch.randn(1, 3, 65, 65)
    full = torch.randint(0, 5, (1, 65, 65))
    outputs = module(images)
    target = full[:, ::8, ::8]  # 65 = 8 * 8 + 1: Caffe's shrink samples exactly every 8th label
    assert outputs["logits"].shape[-2:] == (9, 9)
    expected = F.cross_entropy(outputs["logits"], target, ignore_index=255)
    assert torch.allclose(module.compute_loss(outputs, full), expected)


def test_v3_loss_on_full_resolution_logits():
    module = module_for("v3", "model.backbone=resnet50").train()
    images, masks = torch.randn(2, 3, 65, 65), torch.randint(0, 5, (2, 65, 65))
    outputs = module(images)
    assert torch.allclose(module.compute_loss(outputs, masks), F.cross_entropy(outputs["out"], masks, ignore_index=255))


def one_sgd_step(module):
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    images, masks = torch.randn(2, 3, 65, 65), torch.randint(0, 5, (2, 65, 65))
    loss = module.compute_loss(module(images), masks)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def bn_state(module):
    return [t.clone() for bn in module.batchnorm_layers() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]


def test_frozen_bn_unchanged_after_a_step_finetuned_changes():
    frozen = module_for("v2_r101", "model.backbone=resnet50")
    before = bn_state(frozen)
    one_sgd_step(frozen)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(frozen)))
    assert all(not bn.training for bn in frozen.batchnorm_layers())

    tuned = module_for("v3", "model.backbone=resnet50")
    assert all(bn.momentum == 0.0003 for bn in tuned.batchnorm_layers())
    before = bn_state(tuned)
    one_sgd_step(tuned)
    after = bn_state(tuned)
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    assert all(changed[2::4]) and all(changed[3::4])  # running statistics of every BN moved
    assert any(changed[0::4])  # affine parameters learn


def numpy_miou(predictions, targets, num_classes):
    valid = targets != 255
    matrix = np.bincount(num_classes * targets[valid] + predictions[valid], minlength=num_classes**2)
    matrix = matrix.reshape(num_classes, num_classes)
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    return (np.diag(matrix)[union > 0] / union[union > 0]).mean(), np.diag(matrix).sum() / matrix.sum()


def test_miou_is_dataset_level_and_matches_numpy():
    module = module_for("v3", "model.backbone=resnet50")
    generator = torch.Generator().manual_seed(0)
    all_predictions, all_targets = [], []
    key = "mIoU"
    for batch in range(4):  # batches of different class balance: a per-batch mean would differ
        targets = torch.randint(0, 5 if batch else 2, (2, 17, 19), generator=generator)
        targets[torch.rand(targets.shape, generator=generator) < 0.2] = 255
        predictions = torch.randint(0, 5, (2, 17, 19), generator=generator)
        probs = F.one_hot(predictions, 5).permute(0, 3, 1, 2).float()
        module._update(key, probs, targets)
        all_predictions.append(predictions.numpy().ravel())
        all_targets.append(targets.numpy().ravel())
    module.log = lambda *args, **kwargs: None
    module.on_validation_epoch_end()
    expected_miou, expected_acc = numpy_miou(np.concatenate(all_predictions), np.concatenate(all_targets), 5)
    assert module.last_results[key]["mIoU"] == pytest.approx(expected_miou, abs=1e-6)
    assert module.last_results[key]["pixel_acc"] == pytest.approx(expected_acc, abs=1e-6)


def test_every_generation_has_a_module():
    assert set(MODULES) == {"v1", "v2", "v3", "v3plus"}


def test_reference_crf_in_validation_runs_asynchronously_and_equals_synchronous():
    from deeplab_lit.crf import dense_crf
    from deeplab_lit.inference import Protocol, predict_probs

    module = module_for("largefov", "crf.backend=pydensecrf", "crf.iterations=3").eval()
    module.set_protocols([Protocol(output_stride=8, crf=True)])
    module.log = lambda *args, **kwargs: None
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(5):  # more images than the queue bound of small pools: exercises collection in flight
        rgb = torch.randint(0, 256, (1, 33, 41, 3), dtype=torch.uint8, generator=generator)
        batches.append({"image": torch.randn(1, 3, 33, 41, generator=generator), "rgb": rgb,
                        "mask": torch.randint(0, 5, (1, 33, 41), generator=generator)})
    module.on_validation_epoch_start()
    assert module._crf_pool is not None
    with torch.no_grad():
        for index, batch in enumerate(batches):
            module.validation_step(batch, index)
    module.on_validation_epoch_end()
    asynchronous = module.last_results["mIoU_crf"]

    expected = module_for("largefov", "crf.backend=pydensecrf", "crf.iterations=3").eval()
    predictions, targets = [], []
    with torch.no_grad():
        for batch in batches:
            probs = predict_probs(expected.model, batch["image"], Protocol(output_stride=8))
            refined = dense_crf(probs, batch["rgb"], params=expected.crf, backend="pydensecrf", workers=1)
            predictions.append(refined.argmax(1).numpy().ravel())
            targets.append(batch["mask"].numpy().ravel())
    miou, accuracy = numpy_miou(np.concatenate(predictions), np.concatenate(targets), 5)
    assert asynchronous["mIoU"] == pytest.approx(miou, abs=1e-6)
    assert asynchronous["pixel_acc"] == pytest.approx(accuracy, abs=1e-6)
