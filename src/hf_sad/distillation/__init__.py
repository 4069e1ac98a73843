"""Distillation: the modes a run trains with (`modes.py`, chosen by `--distill_loss`), their kernels (`losses.py`:
ADL, KL, focal distillation) and the loss of a SAD training step (`sad_loss.py`)."""
