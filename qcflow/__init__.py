"""qcflow: unsupervised, task-aware MRI quality control (PyTorch Lightning + Hydra)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
