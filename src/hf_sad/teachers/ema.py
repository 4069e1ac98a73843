"""The mean teacher: an exponential moving average of the student, as in mean teacher / self-ensembling methods.

No teacher to train first: the average of the student's weights and BatchNorm statistics
(`torch.optim.swa_utils.AveragedModel`) is updated at the end of every optimizer step (`EMATeacherCallback`) and
saved in each checkpoint, so resuming is exact.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import TrainerCallback

from ..model.modeling_sad import SADForObjectDetection
from ..training.callbacks import broadcast_buffers, checkpoint_folder
from .base import DetectorTeacher

__all__ = ["EMA_TEACHER_FILE", "EMATeacher", "EMATeacherCallback"]

#: The mean teacher's state (weights, BatchNorm statistics, update count) in each checkpoint folder.
EMA_TEACHER_FILE = "ema_teacher.safetensors"


class EMATeacher(DetectorTeacher):
    """
    The mean teacher: an exponential moving average of `student`'s parameters and buffers (BatchNorm statistics),
    w_ema <- decay * w_ema + (1 - decay) * w_student at every `update(student)`; the first update copies the student.
    Its detector is the average (frozen, in eval mode, never in the optimizer), kept in float32: an average of small
    updates needs the precision.
    """

    def __init__(self, student: SADForObjectDetection, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        # AveragedModel deep-copies the module it is given: a frozen copy, never in the optimizer.
        frozen = copy.deepcopy(student).requires_grad_(False).eval()
        average = AveragedModel(frozen, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        super().__init__(average.module, source=f"exponential moving average of the student (decay {decay})")
        self.average, self.decay = average, decay

    @property
    def n_averaged(self) -> torch.Tensor:
        """How many student states the average holds (one per optimizer step)."""
        return self.average.n_averaged

    def prepare(self, device: torch.device, dtype: torch.dtype) -> EMATeacher:
        return super().prepare(device, torch.float32)

    def update(self, student: nn.Module) -> None:
        """Fold the student's current weights and buffers into the average."""
        self.average.update_parameters(student)

    def callbacks(self, student: nn.Module) -> list[TrainerCallback]:
        return [EMATeacherCallback(self, student)]

    def resume(self, checkpoint: str) -> None:
        self.load(checkpoint)

    def save(self, folder: str | Path) -> Path:
        """Write the average and its update count to `folder/EMA_TEACHER_FILE` (safetensors)."""
        path = Path(folder) / EMA_TEACHER_FILE
        save_file({k: v.detach().contiguous().cpu() for k, v in self.average.state_dict().items()}, str(path))
        return path

    def load(self, folder: str | Path) -> None:
        """Restore what `save` wrote into `folder`; a ValueError naming the folder when it is not there."""
        path = Path(folder) / EMA_TEACHER_FILE
        if not path.is_file():
            raise ValueError(
                f"{folder} has no {EMA_TEACHER_FILE}: it was not written by a run with ema_teacher=True, so the mean "
                "teacher cannot resume exactly. Resume from a checkpoint of an EMA run, or start a new run."
            )
        device = next(self.average.parameters()).device
        self.average.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()})


class EMATeacherCallback(TrainerCallback):
    """Updates the mean teacher at the end of every optimizer step (once per accumulated step) and writes it into
    each checkpoint before the checkpoint is marked complete.

    Every process updates its own copy: the weights are identical (DDP averages the gradients), but each process's
    BatchNorm statistics come from its own batches, so the average's buffers are then made rank 0's everywhere (the
    statistics DDP gives every process at the next forward, and those of the student that rank 0 saves).
    """

    def __init__(self, ema: EMATeacher, student: nn.Module):
        self.ema, self.student = ema, student

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.update(self.student)
        broadcast_buffers(self.ema.average)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.ema.save(checkpoint_folder(args, state))
