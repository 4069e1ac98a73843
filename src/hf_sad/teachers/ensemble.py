"""An ensemble of hf-sad detectors as one teacher.

Several compatible detectors run one after another on the student's pixels (each in its own normalisation); per
anchor and class their sigmoid probabilities are averaged (`"mean"`), or averaged and sharpened (`"era"`, the entropy
reduction averaging of distillation-based semi-supervised federated learning, DS-FL). Their box deltas are averaged,
so `sad_loss` gets what one teacher gives: ADL, KL, pseudo-boxes and the ignore band work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arguments import TEACHER_AGGREGATIONS
from ..model.configuration_sad import SADConfig
from ..model.modeling_sad import SADForObjectDetection, detection_outputs, valid_sizes
from .base import DetectorTeacher, Teacher, TeacherOutput

__all__ = ["SADTeacherEnsemble", "aggregate_logits", "teacher_disagreement"]


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


class SADTeacherEnsemble(Teacher):
    """
    Several hf-sad detectors with the same levels, anchors and classes as one teacher.

    Args:
        teachers: the members (`SADForObjectDetection`, compatible with each other and with the student).
        aggregation: `"mean"` or `"era"` (see `aggregate_logits`).
        temperature: ERA's sharpening temperature.
        input_transforms: per member, `(scale, shift)` turning the given pixel values into the member's own
            normalisation (`hf_sad.teachers.base.teacher_input_transform`), or None to use them as they are.
        sources: per member, where it comes from (default: the folders or Hub ids they were loaded from).

    Its forward returns a `TeacherOutput`: `logits` aggregated, `box_regression` the members' mean deltas on the
    shared anchors and `pred_boxes` decoded from them, `teacher_disagreement`; with `labels`, the supervised loss of
    that output (for evaluation).
    """

    def __init__(
        self,
        teachers: Sequence[SADForObjectDetection],
        aggregation: str = "mean",
        temperature: float = 1.0,
        input_transforms: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        sources: Sequence[str] | None = None,
    ):
        if len(teachers) < 2:
            raise ValueError(f"An ensemble needs at least two teachers, got {len(teachers)}.")
        if aggregation not in TEACHER_AGGREGATIONS:
            raise ValueError(f"Unknown teacher aggregation {aggregation!r}: expected one of {TEACHER_AGGREGATIONS}.")
        if not temperature > 0:
            raise ValueError(f"The ERA temperature must be positive, got {temperature}.")
        members = [DetectorTeacher(member, transform, source) for member, transform, source in zip(
            teachers, input_transforms or [None] * len(teachers), sources or [None] * len(teachers))]
        super().__init__([member.source for member in members], ", ".join(member.backbone for member in members))
        self.members = nn.ModuleList(members)
        self.aggregation, self.temperature = aggregation, temperature

    @property
    def config(self) -> SADConfig:
        """The members' shared detection settings (levels, anchors, classes), as the first member's config."""
        return self.members[0].config

    def forward(self, pixel_values, pixel_mask=None, labels=None, *, anchors=None, image_sizes=None) -> TeacherOutput:
        # The members' own supervised losses are not needed: only the ensemble's output is scored.
        outputs = [member(pixel_values, pixel_mask) for member in self.members]
        member_logits = torch.stack([o.logits for o in outputs])
        return detection_outputs(
            aggregate_logits(member_logits, self.aggregation, self.temperature),
            torch.stack([o.box_regression.float() for o in outputs]).mean(0),
            outputs[0].anchors,
            valid_sizes(pixel_values, pixel_mask, labels),
            self.config,
            labels,
            output_class=TeacherOutput,
            spatial_shapes=outputs[0].spatial_shapes,
            teacher_disagreement=teacher_disagreement(member_logits),
        )
