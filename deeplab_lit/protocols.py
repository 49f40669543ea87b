"""Evaluation protocols and the names of their metrics, encoded and decoded here only.

A `Protocol` is one way of evaluating the same weights: output stride, input scales, flip, whole
image or sliding window, and whether the dense CRF refines the probabilities. An experiment has a
main protocol (`eval.*`, `crf.enabled`) and named extra ones (`eval.protocols`); each protocol yields
one metric without the CRF and, if the CRF is on, one with it:

    MetricKey("", crf=False)     -> "mIoU"            logged as val/mIoU, val/pixel_acc
    MetricKey("", crf=True)      -> "mIoU_crf"        logged as val/mIoU_crf, val/pixel_acc_crf
    MetricKey("os8", crf=False)  -> "mIoU_os8"        logged as val/mIoU_os8, val/pixel_acc_os8

`MetricKey.parse` is the inverse, for readers that only have a metric name (W&B summaries).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

CRF_SUFFIX = "crf"
NAME_PATTERN = re.compile(r"[a-z0-9]+(_[a-z0-9]+)*")


@dataclass(frozen=True)
class MetricKey:
    protocol: str = ""  # the protocol's name; "" = the main protocol
    crf: bool = False

    @property
    def suffix(self) -> str:
        parts = [part for part in (self.protocol, CRF_SUFFIX if self.crf else "") if part]
        return "".join(f"_{part}" for part in parts)

    @property
    def text(self) -> str:
        return f"mIoU{self.suffix}"

    def logged(self, metric: str = "mIoU", stage: str = "val") -> str:
        """The logged name of `metric` (mIoU or pixel_acc) under this key, e.g. val/pixel_acc_os8."""
        return f"{stage}/{metric}{self.suffix}"

    @classmethod
    def parse(cls, text: str) -> "MetricKey":
        """"val/mIoU_os8_crf" or "mIoU_os8_crf" -> MetricKey("os8", crf=True); ValueError otherwise."""
        name = text.rsplit("/", 1)[-1]
        if not name.startswith("mIoU"):
            raise ValueError(f"{text!r} is not an mIoU metric name")
        rest = name[len("mIoU"):]
        crf = rest == f"_{CRF_SUFFIX}" or rest.endswith(f"_{CRF_SUFFIX}")
        rest = rest[: -len(CRF_SUFFIX) - 1] if crf else rest
        if rest and not (rest.startswith("_") and NAME_PATTERN.fullmatch(rest[1:])):
            raise ValueError(f"{text!r} is not an mIoU metric name")
        return cls(rest[1:], crf)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol; `name` is the suffix of its metrics ("" for the main protocol)."""

    name: str = ""
    output_stride: Optional[int] = None  # None = the model's current (training) output stride
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    mode: str = "whole"  # whole | slide
    slide_crop: int = 769
    slide_stride: int = 513
    canvas: tuple[int, ...] = ()  # (height, width) the image is padded to at least; () = none
    crf: bool = False

    def metric_keys(self) -> list[MetricKey]:
        return [MetricKey(self.name, False), *([MetricKey(self.name, True)] if self.crf else [])]

    def describe(self, crf: Optional[bool] = None) -> dict:
        """Plain values for records and dashboards; `crf` overrides the flag for the key's own variant."""
        return {
            "output_stride": self.output_stride,
            "scales": list(self.scales),
            "flip": self.flip,
            "mode": self.mode,
            **({"slide_crop": self.slide_crop, "slide_stride": self.slide_stride} if self.mode == "slide" else {}),
            **({"canvas": list(self.canvas)} if self.canvas else {}),
            "crf": self.crf if crf is None else crf,
        }


def check_protocol_name(name: str) -> Optional[str]:
    """Why `name` cannot name an extra protocol (None if it can)."""
    if not NAME_PATTERN.fullmatch(name):
        return "must be lower-case letters, digits and single underscores, e.g. os8_ms_flip"
    if name == CRF_SUFFIX or name.endswith(f"_{CRF_SUFFIX}"):
        return f"must not end in '{CRF_SUFFIX}' (that suffix marks the CRF variant of a metric)"
    return None
