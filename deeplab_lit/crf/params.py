"""CRF parameters: the five kernel parameters and the number of mean-field iterations.

`CRFParams` is the one parameter type: the configuration's `crf` section (`CRFConfig`) extends it with
`enabled` and `backend`, so these defaults are the configuration's too. `resolve_params` accepts a
`CRFParams` (or a subclass), a plain dict with the six keys, any object with the six attributes, or
None for the DeepLab v2 ResNet-101 values (v2 paper, section 4.1: w1 = 4, sigma_alpha = 67, sigma_beta = 3,
w2 = 3, sigma_gamma = 1, 10 iterations).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from deeplab_lit.crf.errors import CRFInputError


@dataclass(frozen=True)
class CRFParams:
    """Krähenbühl & Koltun's two kernels with Potts compatibility.

    bi_w, bi_xy_std, bi_rgb_std: appearance kernel w1 exp(-|p_i-p_j|^2/2 sa^2 - |I_i-I_j|^2/2 sb^2)
    pos_w, pos_xy_std: smoothness kernel w2 exp(-|p_i-p_j|^2/2 sg^2)
    iterations: mean-field iterations (0 returns the clipped, renormalised input)
    """

    iterations: int = field(default=10, metadata={"doc": "mean-field iterations"})
    bi_w: float = field(default=4.0, metadata={"doc": "w1: weight of the appearance (bilateral) kernel"})
    bi_xy_std: float = field(default=67.0, metadata={"doc": "sigma_alpha: appearance kernel's spatial std, pixels"})
    bi_rgb_std: float = field(default=3.0, metadata={"doc": "sigma_beta: appearance kernel's colour std"})
    pos_w: float = field(default=3.0, metadata={"doc": "w2: weight of the smoothness (Gaussian) kernel"})
    pos_xy_std: float = field(default=1.0, metadata={"doc": "sigma_gamma: smoothness kernel's spatial std, pixels"})

    def __post_init__(self):
        iterations = self.iterations
        if not isinstance(iterations, numbers.Integral) or isinstance(iterations, bool) or iterations < 0:
            raise CRFInputError(f"crf.iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("bi_w", "pos_w"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise CRFInputError(f"crf.{name} must be a finite number, got {value!r}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise CRFInputError(f"crf.{name} must be a positive number, got {value!r}")

    @property
    def bilateral_key(self) -> tuple[float, float]:
        """What the appearance kernel's lattice depends on (rebuilt when it changes)."""
        return (float(self.bi_xy_std), float(self.bi_rgb_std))


PARAM_NAMES = tuple(f.name for f in fields(CRFParams))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def resolve_params(params: Any = None) -> CRFParams:
    """CRFParams from None (v2 ResNet defaults), a CRFParams, a mapping or any object with the attributes."""
    if params is None:
        return CRFParams()
    if type(params) is CRFParams:
        return params
    values = {}
    for name in PARAM_NAMES:
        if isinstance(params, Mapping):
            if name not in params:
                raise CRFInputError(f"CRF parameters lack '{name}': give all of {', '.join(PARAM_NAMES)}")
            values[name] = params[name]
        else:
            if not hasattr(params, name):
                raise CRFInputError(
                    f"CRF parameters ({type(params).__name__}) lack attribute '{name}': give all of "
                    f"{', '.join(PARAM_NAMES)}")
            values[name] = getattr(params, name)
    # Plain Python numbers (numpy scalars from a sweep, ints from YAML); anything else is rejected below.
    for name, value in values.items():
        if name == "iterations" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            values[name] = int(value)
        elif name != "iterations" and _is_real(value):
            values[name] = float(value)
    return CRFParams(**values)
