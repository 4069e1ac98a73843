"""Teachers beyond one frozen detector: an ensemble of detectors, and a mean teacher (an average of the student).

Both give `sad_loss` what one teacher gives: logits and boxes on the student's anchors, so ADL, KL, pseudo-boxes and
the ignore band work unchanged.

- `SADTeacherEnsemble`: several compatible hf-sad detectors run one after another; per anchor and class their sigmoid
  probabilities are averaged (`"mean"`), or averaged and sharpened (`"era"`, the entropy reduction averaging of
  distillation-based semi-supervised federated learning, DS-FL). Their box deltas are averaged.
- `EMATeacher`: an exponential moving average of the student's weights and BatchNorm statistics
  (`torch.optim.swa_utils.AveragedModel`), updated at the end of every optimizer step by `EMATeacherCallback`, as in
  mean teacher / self-ensembling methods.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import TrainerCallback

from .callbacks import broadcast_buffers, checkpoint_folder
from .detection_loss import detection_loss
from .distillation import renormalize
from .modeling_sad import SADForObjectDetection, SADObjectDetectionOutput, predicted_boxes, valid_sizes
from .training_args import TEACHER_AGGREGATIONS

__all__ = [
    "EMA_TEACHER_FILE",
    "TEACHER_AGGREGATIONS",
    "EMATeacher",
    "EMATeacherCallback",
    "SADEnsembleOutput",
    "SADTeacherEnsemble",
    "aggregate_logits",
    "teacher_disagreement",
]

#: The mean teacher's state (weights, BatchNorm statistics, update count) in each checkpoint folder.
EMA_TEACHER_FILE = "ema_teacher.safetensors"


def aggregate_logits(logits: torch.Tensor, aggregation: str = "mean", temperature: float = 1.0) -> torch.Tensor:
    """
    One logit per entry from several teachers' logits, computed in float32 from the logits (finite for saturated
    probabilities).

    With p_t = sigmoid(z_t) the teachers' probabilities of an (anchor, class) entry and p = mean_t p_t:

    - `"mean"`: logit(p). It is computed as logsumexp_t log sigmoid(z_t) - logsumexp_t log sigmoid(-z_t), the
      1/T factors of the two means cancelling.
    - `"era"`: logit(p) / `temperature`, i.e. the probability p^(1/tau) / (p^(1/tau) + (1 - p)^(1/tau)). This is
      DS-FL's entropy reduction averaging (average, then sharpen with a temperature tau < 1) for the per-class
      Bernoulli outputs of a sigmoid detector: each entry moves away from 0.5 on its own side, so background stays
      background. (DS-FL's softmax of the averaged probabilities divided by tau, applied to (p, 1 - p), would be
      sigmoid((2p - 1) / tau), which raises p = 0.01 to 0.12 at tau = 0.5: it sharpens only where p is near 0.5.)

    Args:
        logits: (T, ...) the teachers' raw logits, T >= 1.
        aggregation: `"mean"` or `"era"`.
        temperature: ERA's tau > 0 (ignored by `"mean"`).

    Returns:
        (...) float32 logits.
    """
    if aggregation not in TEACHER_AGGREGATIONS:
        raise ValueError(f"Unknown teacher aggregation {aggregation!r}: expected one of {TEACHER_AGGREGATIONS}.")
    logits = logits.float()
    mean_logit = torch.logsumexp(F.logsigmoid(logits), 0) - torch.logsumexp(F.logsigmoid(-logits), 0)
    return mean_logit / temperature if aggregation == "era" else mean_logit


def teacher_disagreement(logits: torch.Tensor) -> torch.Tensor:
    """How much T teachers disagree: the standard deviation over teachers of the probability sigmoid(z_t) of each
    entry, averaged over the entries of (T, ...) `logits`; 0 when they agree. A detached float32 scalar."""
    return torch.sigmoid(logits.detach().float()).std(0, correction=0).mean()


@dataclass
class SADEnsembleOutput(SADObjectDetectionOutput):
    """Output of [`SADTeacherEnsemble`]: a detector's output with the aggregated logits and the averaged boxes.

    Attributes:
        teacher_disagreement: `teacher_disagreement` of the members' logits on this batch (float32 scalar).
    """

    teacher_disagreement: torch.FloatTensor | None = None


class SADTeacherEnsemble(nn.Module):
    """
    Several hf-sad detectors with the same levels, anchors and classes as one teacher.

    Args:
        teachers: the members (`SADForObjectDetection`, compatible with each other and with the student).
        aggregation: `"mean"` or `"era"` (see `aggregate_logits`).
        temperature: ERA's sharpening temperature.
        input_transforms: per member, `(scale, shift)` turning the given pixel values into the member's own
            normalisation (`hf_sad.distillation.teacher_input_transform`), or None to use them as they are.

    Its forward takes a detector's inputs and returns a `SADEnsembleOutput`: `logits` aggregated, `box_regression` the
    members' mean deltas on the shared anchors and `pred_boxes` decoded from them; with `labels`, the supervised loss
    of that output (for evaluation).
    """

    def __init__(
        self,
        teachers: Sequence[SADForObjectDetection],
        aggregation: str = "mean",
        temperature: float = 1.0,
        input_transforms: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ):
        super().__init__()
        if len(teachers) < 2:
            raise ValueError(f"An ensemble needs at least two teachers, got {len(teachers)}.")
        if aggregation not in TEACHER_AGGREGATIONS:
            raise ValueError(f"Unknown teacher aggregation {aggregation!r}: expected one of {TEACHER_AGGREGATIONS}.")
        if not temperature > 0:
            raise ValueError(f"The ERA temperature must be positive, got {temperature}.")
        self.members = nn.ModuleList(teachers)
        self.aggregation, self.temperature = aggregation, temperature
        self.input_transforms = list(input_transforms or [None] * len(teachers))

    @property
    def config(self):
        """The members' shared detection settings (levels, anchors, classes), as the first member's config."""
        return self.members[0].config

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
    ) -> SADEnsembleOutput:
        # The members' own supervised losses are not needed: only the ensemble's output is scored.
        outputs = [
            member(pixel_values=renormalize(pixel_values, transform), pixel_mask=pixel_mask)
            for member, transform in zip(self.members, self.input_transforms)
        ]
        member_logits = torch.stack([o.logits for o in outputs])
        logits = aggregate_logits(member_logits, self.aggregation, self.temperature)
        box_regression = torch.stack([o.box_regression.float() for o in outputs]).mean(0)
        anchors = outputs[0].anchors
        image_sizes = valid_sizes(pixel_values, pixel_mask, labels)
        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict, _ = detection_loss(logits, box_regression, anchors, labels, image_sizes, self.config)
        return SADEnsembleOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=predicted_boxes(box_regression, anchors, image_sizes),
            box_regression=box_regression,
            anchors=anchors,
            spatial_shapes=outputs[0].spatial_shapes,
            image_sizes=image_sizes,
            teacher_disagreement=teacher_disagreement(member_logits),
        )


class EMATeacher(AveragedModel):
    """
    The mean teacher: an exponential moving average of `student`'s parameters and buffers (BatchNorm statistics),
    w_ema <- decay * w_ema + (1 - decay) * w_student at every `update_parameters(student)`; the first update copies
    the student. `teacher` is the averaged detector (frozen, in eval mode) that produces the soft targets.
    """

    def __init__(self, student: SADForObjectDetection, decay: float):
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}.")
        # AveragedModel deep-copies the module it is given: a frozen copy, never in the optimizer.
        frozen = copy.deepcopy(student).requires_grad_(False).eval()
        super().__init__(frozen, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    @property
    def teacher(self) -> SADForObjectDetection:
        return self.module

    def train(self, mode: bool = True):
        """Always in eval mode: the teacher's BatchNorm uses the averaged statistics."""
        return super().train(False)

    def save(self, folder: str | Path) -> Path:
        """Write the average and its update count to `folder/EMA_TEACHER_FILE` (safetensors)."""
        path = Path(folder) / EMA_TEACHER_FILE
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))
        return path

    def load(self, folder: str | Path) -> None:
        """Restore what `save` wrote into `folder`; a ValueError naming the folder when it is not there."""
        path = Path(folder) / EMA_TEACHER_FILE
        if not path.is_file():
            raise ValueError(
                f"{folder} has no {EMA_TEACHER_FILE}: it was not written by a run with ema_teacher=True, so the mean "
                "teacher cannot resume exactly. Resume from a checkpoint of an EMA run, or start a new run."
            )
        device = next(self.parameters()).device
        self.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()})


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
        self.ema.update_parameters(self.student)
        broadcast_buffers(self.ema)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.ema.save(checkpoint_folder(args, state))
