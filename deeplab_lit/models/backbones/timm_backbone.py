"""Any timm model with a dilated output stride as a DeepLab backbone: `model.backbone=timm:<name>`.

`TimmBackbone("resnet50d", output_stride=16)` holds timm's full model (`timm.create_model(name,
output_stride=...)`) with its classifier pruned (`prune_intermediate_layers(prune_head=True)`), so its
state-dict keys are timm's own under `model.` and a timm state dict (`model.state_dict()`, or the
Hugging Face `timm/<name>.<tag>` weights) loads as it is; the parameter count equals timm's
`features_only` model's. Features come from timm's `forward_intermediates` API:
`{"stride4": the last feature at stride 4 (v3+ decoder), "out": the last feature}`.

What a name supports is read from timm itself (`probe`, on the meta device, cached): whether its
constructor takes `output_stride` and reaches 8 / 16 / 32 (timm's dilation: the unit that would stride
keeps its rate, later units double it), whether it has a stride-4 feature, and which output strides it
can be switched to in place for evaluation.

Output stride switching (`set_output_stride`): timm fixes strides and dilations at construction, so
the switch builds timm's model at the target output stride on the meta device (no memory, no
weights) and adopts its layout into the live modules in place: for every module of the same type, the
plain attributes that differ (conv stride, dilation, padding, pooling settings, timm's bookkeeping)
are copied; a parameter-free module whose type differs (e.g. ResNet-D's `AvgPool2d` shortcut pool
becoming `AvgPool2dSame` when dilated, or ResNeSt's average pool disappearing) is replaced by the
reference's. Parameters and buffers are never touched, so optimiser state and weights stay. Backbones
whose layouts differ in modules with parameters (e.g. ConvNeXt's downsampling conv becoming timm's
dynamically padded `Conv2dSame`) are evaluated at their training output stride only; `probe` finds out
and validation says so. The switched network equals timm's own construction at that stride (tested).

Multi-grid (`model.multi_grid` other than (1, 1, 1)): where the last stage consists of exactly three
units with one spatial (k > 1) conv each (ResNet's layer4, ResNeSt), the paper's rule as in
ResNetBackbone: every unit gets block rate x r_i, the block rate being timm's rate of the stage's last
unit (1 / 2 / 4 at output stride 32 / 16 / 8). With (1, 1, 1) the network is exactly timm's.

Inputs: the data pipeline normalises with the ImageNet mean/std; if the weights' `pretrained_cfg` asks
for another normalisation (e.g. 0.5 / 0.5), a fixed per-channel affine map converts before the stem.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from deeplab_lit.errors import UserError
from deeplab_lit.models.backbones.xception import input_renormalisation

OUTPUT_STRIDES = (8, 16, 32)
PLAIN_TYPES = (int, float, bool, str, tuple, list, dict, type(None))


class LayoutMismatch(Exception):
    """The module trees of two output strides differ in something that carries weights."""


def _stateless(module: Optional[nn.Module]) -> bool:
    return module is None or (next(module.parameters(), None) is None and next(module.buffers(), None) is None)


def _children(module: nn.Module) -> dict[str, Optional[nn.Module]]:
    """Registered child modules by name (a child the other layout lacks may be a plain None attribute)."""
    return dict(module._modules)


def adopt_layout(live: nn.Module, reference: nn.Module, path: str = "") -> None:
    """Make `live` compute like `reference` (same weights): copy differing plain attributes, replace
    differing parameter-free submodules; raise LayoutMismatch where a module with weights differs."""
    live_children, ref_children = _children(live), _children(reference)
    for name in {**live_children, **ref_children}:
        mine = live_children.get(name, getattr(live, name, None))
        theirs = ref_children.get(name, getattr(reference, name, None))
        where = f"{path}.{name}".lstrip(".")
        if mine is not None and theirs is not None and type(mine) is type(theirs):
            adopt_layout(mine, theirs, where)
        elif _stateless(mine) and _stateless(theirs):
            if name in live._modules:  # in its place: a Sequential runs its children in order
                live._modules[name] = copy.deepcopy(theirs)
            else:  # a plain None attribute here
                delattr(live, name)
                setattr(live, name, copy.deepcopy(theirs))
        else:
            raise LayoutMismatch(f"{where}: {type(mine).__name__} vs {type(theirs).__name__}")
    for key, value in vars(reference).items():
        if key.startswith("_") or key == "training" or key in ref_children or key in live_children:
            continue
        if vars(live).get(key, _MISSING) != value:
            if not isinstance(value, PLAIN_TYPES):
                raise LayoutMismatch(f"{path}.{key}: {type(value).__name__} attribute differs")
            setattr(live, key, copy.deepcopy(value))


_MISSING = object()


# ---------------------------------------------------------------------------------------------------
# What a timm name supports (validation reads this; nothing is computed, the models live on meta)


@dataclass(frozen=True)
class TimmInfo:
    name: str
    output_strides: tuple[int, ...]  # strides timm can build it at (last feature at that stride)
    refusals: dict = field(default_factory=dict)  # output stride -> why not
    low_level: dict = field(default_factory=dict)  # output stride -> has a stride-4 feature
    switchable: dict = field(default_factory=dict)  # output stride -> strides it can be switched to
    multi_grid_units: Optional[str] = None  # the last stage's name when multi-grid applies
    multi_grid_refusal: str = ""


def _create(name: str, output_stride: int, **kwargs) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, output_stride=output_stride, **kwargs)
    model.prune_intermediate_layers(indices=None, prune_head=True, prune_norm=False)
    return model


@functools.lru_cache(maxsize=None)
def meta_model(name: str, output_stride: int) -> nn.Module:
    with torch.device("meta"):
        return _create(name, output_stride)


def _feature_reductions(model: nn.Module) -> list[int]:
    return [int(info["reduction"]) for info in model.feature_info]


def _spatial_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]


def last_stage_units(model: nn.Module) -> tuple[Optional[str], list[nn.Module], str]:
    """(stage name, its units, why not) for multi-grid: three units with one spatial conv each."""
    stage_name = model.feature_info[-1]["module"]
    stage = model.get_submodule(stage_name)
    units = [child for child in stage.children() if _spatial_convs(child)]
    if len(units) != 3 or any(len(_spatial_convs(unit)) != 1 for unit in units):
        return None, [], (f"its last stage {stage_name} has {len(units)} units with spatial convs, not three with "
                          "one each")
    return stage_name, units, ""


@functools.lru_cache(maxsize=None)
def probe(name: str) -> TimmInfo:
    """What timm's `name` supports; a name timm does not know is a UserError naming model.backbone."""
    import timm

    if not timm.is_model(name):
        import difflib

        hint = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise UserError(f"model.backbone='timm:{name}' is not a model of timm {timm.__version__}"
                        + (f" (did you mean 'timm:{hint[0]}'?)" if hint else "") + "; see timm.list_models()")
    strides, refusals, low_level, models = [], {}, {}, {}
    for output_stride in OUTPUT_STRIDES:
        try:
            model = meta_model(name, output_stride)
        except Exception as error:  # TypeError (no output_stride argument), AssertionError, ...
            refusals[output_stride] = f"{type(error).__name__}: {error}".split("\n")[0].rstrip(": ")
            continue
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            refusals[output_stride] = "no forward_intermediates/feature_info (timm's features API)"
            continue
        reductions = _feature_reductions(model)
        if reductions[-1] != output_stride:
            refusals[output_stride] = f"its last feature is at stride {reductions[-1]}"
            continue
        strides.append(output_stride)
        low_level[output_stride] = 4 in reductions
        models[output_stride] = model
    switchable = {}
    for train in strides:
        switchable[train] = tuple(s for s in strides if s == train or _switches(name, train, s))
    stage, refusal = None, "no output stride is supported"
    if strides:
        stage, _, refusal = last_stage_units(models[strides[0]])
    return TimmInfo(name, tuple(strides), refusals, low_level, switchable, stage, refusal)


def _switches(name: str, train: int, target: int) -> bool:
    with torch.device("meta"):
        live = _create(name, train)
    try:
        adopt_layout(live, meta_model(name, target))
    except LayoutMismatch:
        return False
    return True


# ---------------------------------------------------------------------------------------------------


class TimmBackbone(nn.Module):
    """timm's `name` (classifier pruned) returning `{"stride4", "out"}` (see the module docstring)."""

    pretrained_prefixes = ("model",)
    timm_state_prefix = "model."  # our state-dict keys are timm's under model.

    def __init__(self, name: str, *, output_stride: int = 16, multi_grid: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        import timm

        self.name = name
        self.model = _create(name, output_stride)
        reductions = _feature_reductions(self.model)
        self.out_channels = int(self.model.feature_info[-1]["num_chs"])
        self.indices = [len(reductions) - 1]
        self.low_level_feature: Optional[str] = None
        self.feature_channels: dict[str, int] = {}  # what a v3+ decoder may take, and its stride
        self.feature_strides: dict[str, int] = {}
        if 4 in reductions:
            low = max(i for i, r in enumerate(reductions) if r == 4)
            self.indices.insert(0, low)
            self.low_level_feature = "stride4"
            self.feature_channels = {"stride4": int(self.model.feature_info[low]["num_chs"])}
            self.feature_strides = {"stride4": 4}
        self.multi_grid = tuple(int(r) for r in multi_grid)
        pretrained_cfg = timm.models.get_pretrained_cfg(name)  # the default (or named) tag's, None if none
        mean = tuple(getattr(pretrained_cfg, "mean", None) or (0.485, 0.456, 0.406))
        std = tuple(getattr(pretrained_cfg, "std", None) or (0.229, 0.224, 0.225))
        scale, shift = input_renormalisation(mean, std)
        self.renormalise = (mean, std) != ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        self.output_stride = output_stride
        self._apply_multi_grid()

    def set_output_stride(self, output_stride: int) -> None:
        """Adopt timm's layout at `output_stride` in place (see the module docstring)."""
        if output_stride == self.output_stride:
            return
        try:
            adopt_layout(self.model, meta_model(self.name, output_stride))
        except LayoutMismatch as error:
            raise UserError(f"timm:{self.name} cannot be switched from output stride {self.output_stride} to "
                            f"{output_stride} in place ({error}); evaluate at the training output stride") from None
        self.output_stride = output_stride
        self._apply_multi_grid()

    def _apply_multi_grid(self) -> None:
        if self.multi_grid == (1, 1, 1):
            return
        from timm.layers import Conv2dSame, get_padding

        stage, units, why = last_stage_units(self.model)
        if stage is None:
            raise UserError(f"model.multi_grid={list(self.multi_grid)}: timm:{self.name} has no units to apply it "
                            f"to ({why}); leave it [1, 1, 1]")
        convs = [_spatial_convs(unit)[0] for unit in units]
        block_rate = convs[-1].dilation[0]
        for conv, unit_rate in zip(convs, self.multi_grid):
            rate = block_rate * unit_rate
            conv.dilation = (rate, rate)
            if not isinstance(conv, Conv2dSame):  # timm's dynamic "same" padding follows the dilation
                conv.padding = tuple(get_padding(k, s, rate) for k, s in zip(conv.kernel_size, conv.stride))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.renormalise:
            x = x * self.input_scale + self.input_shift
        taken = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        features = {"out": taken[-1]}
        if self.low_level_feature:
            features[self.low_level_feature] = taken[0]
        return features

    def atrous_rates(self) -> dict[str, list[int]]:
        """Dilation of every spatial conv, per feature stage (timm's feature_info modules)."""
        rates, seen = {}, set()
        for info in self.model.feature_info:
            module = self.model.get_submodule(info["module"])
            convs = [c for c in _spatial_convs(module) if id(c) not in seen]
            seen.update(id(c) for c in convs)
            rates[info["module"]] = [c.dilation[0] for c in convs]
        return rates
