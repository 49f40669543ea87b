"""deeplab_lit: the DeepLab papers (v1, v2, v3, v3+) as PyTorch Lightning experiments.

    from deeplab_lit import load_checkpoint
    seg = load_checkpoint("runs/demo/default-seed0/checkpoints/model.pt", device="cpu")
    labels = seg.predict(rgb_uint8_hwc)      # H x W class indices; seg.model, seg.class_names

`load_checkpoint` is imported on first use (deeplab_lit/api.py), so `import deeplab_lit` stays light.
"""

__version__ = "0.1.0"
__all__ = ["load_checkpoint", "Segmenter"]


def __getattr__(name: str):
    if name in __all__:
        from deeplab_lit import api

        return getattr(api, name)
    raise AttributeError(f"module 'deeplab_lit' has no attribute {name!r}")
