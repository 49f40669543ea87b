"""deeplab_lit: the DeepLab papers (v1, v2, v3, v3+) as PyTorch Lightning experiments."""

__version__ = "0.1.0"
