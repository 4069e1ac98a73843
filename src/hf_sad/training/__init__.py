"""Training: `SADTrainer` (`trainer.py`) and the callbacks that keep a run safe (`callbacks.py`)."""
