"""hf-sad: small, fast object detectors by Semi-supervised Adaptive Distillation."""

__version__ = "0.1.0"
