"""What the trainer needs from any teacher (`Teacher`), what every teacher gives (`TeacherOutput`), and what the kinds
share: checking a detector against the student and renormalising the student's pixels to a teacher's own.

A teacher gives, for a batch of the student's pixels, outputs on the student's anchors (logits and box deltas that
line up with the student's, entry by entry), the detections its pseudo-boxes come from, and for the model card and the
resume check its source and backbone. The trainer calls it; only `hf_sad.teachers.loading.load_teacher` knows the
kinds (`DetectorTeacher`, `SADTeacherEnsemble`, `EMATeacher`, `TransformersDetectorTeacher`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from ..model.configuration_sad import SADConfig
from ..model.image_processing_sad import SADImageProcessor
from ..model.modeling_sad import SADForObjectDetection, SADObjectDetectionOutput

__all__ = [
    "DetectorTeacher",
    "Teacher",
    "TeacherOutput",
    "check_teacher_compatible",
    "normalization_affine",
    "renormalize",
    "saved_image_processor",
    "teacher_input_transform",
]


@dataclass
class TeacherOutput(SADObjectDetectionOutput):
    """A teacher's output on the student's anchors (`logits`, `box_regression`, `pred_boxes`, as a detector gives
    them), and optionally what only some teachers have.

    Attributes:
        detection_logits: (B, Q, C) logits of the teacher's own set of Q boxes, when it predicts one (a transformers
            detector); its pseudo-boxes then come from that set.
        detection_boxes: (B, Q, 4) those boxes, normalised cx, cy, w, h relative to each image's valid region.
        teacher_disagreement: an ensemble's disagreement on the batch (float32 scalar; see
            `hf_sad.teachers.ensemble.teacher_disagreement`), logged.
    """

    detection_logits: torch.FloatTensor | None = None
    detection_boxes: torch.FloatTensor | None = None
    teacher_disagreement: torch.FloatTensor | None = None

    def detections(self) -> SADObjectDetectionOutput:
        """What the pseudo-boxes are made of: the teacher's own set of boxes when it has one, else its dense output."""
        if self.detection_logits is None:
            return self
        return SADObjectDetectionOutput(logits=self.detection_logits, pred_boxes=self.detection_boxes)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """What the trainer logs about the teacher on this batch."""
        return {} if self.teacher_disagreement is None else {"teacher_disagreement": self.teacher_disagreement}


class Teacher(nn.Module):
    """What a SAD student learns from: frozen (or, for the mean teacher, updated by its own callback), never a
    submodule of the student, never saved with it.

    Every kind implements `forward(pixel_values, pixel_mask=None, labels=None, *, anchors=None, image_sizes=None)`:
    the student's pixels (normalised by the student's processor; the teacher renormalises them as it needs) and the
    student's (N, 4) xyxy anchors and (B, 2) valid image sizes -> a `TeacherOutput` whose logits line up with the
    student's; with `labels`, its supervised loss (for evaluating the teacher).

    Attributes:
        source: what the teacher is, for the model card and the resume check: a path / Hub id (absolute for a local
            folder), a list of them for an ensemble, or a description.
        backbone: its backbone's name(s), for the model card.
        compilable: whether `--torch_compile` compiles its forward (not a transformers detector, whose forward runs
            its image processor in Python).
    """

    compilable = True

    def __init__(self, source: str | list[str], backbone: str | None):
        super().__init__()
        self.source, self.backbone = source, backbone

    def prepare(self, device: torch.device, dtype: torch.dtype) -> Teacher:
        """Frozen, in evaluation mode, on `device` with weights of `dtype`."""
        return self.requires_grad_(False).eval().to(device=device, dtype=dtype)

    def train(self, mode: bool = True) -> Teacher:
        """Always in evaluation mode: a teacher's BatchNorm uses its running statistics."""
        return super().train(False)

    def callbacks(self, student: nn.Module) -> list[TrainerCallback]:
        """The `TrainerCallback`s the teacher needs during training (the mean teacher's update)."""
        return []

    def resume(self, checkpoint: str) -> None:
        """Restore what the teacher keeps in a checkpoint (the mean teacher's average) before resuming from it."""


class DetectorTeacher(Teacher):
    """One saved hf-sad detector with the student's levels, anchors and classes.

    Args:
        detector: the teacher network.
        input_transform: `(scale, shift)` turning the student's pixel values into the detector's own normalisation
            (`teacher_input_transform`), or None when they normalise alike.
        source: where it comes from (default: the folder or Hub id it was loaded from).
    """

    def __init__(
        self,
        detector: SADForObjectDetection,
        input_transform: tuple[torch.Tensor, torch.Tensor] | None = None,
        source: str | None = None,
    ):
        super().__init__(source if source is not None else detector.name_or_path, detector.config.backbone)
        self.detector = detector
        self.input_transform = input_transform

    @property
    def config(self) -> SADConfig:
        return self.detector.config

    def state_dict(self, *args, **kwargs):
        """The detector's weights: the teacher adds none of its own."""
        return self.detector.state_dict(*args, **kwargs)

    def forward(self, pixel_values, pixel_mask=None, labels=None, *, anchors=None, image_sizes=None) -> TeacherOutput:
        pixel_values = renormalize(pixel_values, self.input_transform).to(self.detector.dtype)
        return TeacherOutput(**self.detector(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels))


def check_teacher_compatible(teacher: SADForObjectDetection, student: SADForObjectDetection) -> None:
    """Raise a ValueError listing every difference that would misalign teacher and student logits.

    Distillation compares the two models anchor by anchor and class by class, so they need the same pyramid levels,
    the same anchors per location and the same classes in the same order; backbones and widths may differ.
    """
    fields = ("min_level", "max_level", "anchor_scale", "scales_per_octave", "aspect_ratios")
    diffs = [
        f"{name}: teacher {getattr(teacher.config, name)!r} vs student {getattr(student.config, name)!r}"
        for name in fields
        if getattr(teacher.config, name) != getattr(student.config, name)
    ]
    teacher_labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    student_labels = [student.config.id2label[i] for i in range(student.config.num_labels)]
    if teacher_labels != student_labels:
        diffs.append(f"classes (by id): teacher {teacher_labels} vs student {student_labels}")
    if diffs:
        raise ValueError(
            "Teacher and student are not compatible for distillation (their logits would not line up):\n  - "
            + "\n  - ".join(diffs)
            + "\nBuild the student with the teacher's levels, anchors and id2label."
        )


def normalization_affine(processor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(a, b)`, each (3,) float64, with `pixel_values = raw * a + b` per channel for the raw 0-255 pixels `processor`
    rescales (`rescale_factor`, when `do_rescale`) and normalises (`image_mean`, `image_std`, when `do_normalize`)."""
    rescale = processor.rescale_factor if processor.do_rescale else 1.0
    mean = torch.tensor(processor.image_mean if processor.do_normalize else [0.0] * 3, dtype=torch.float64)
    std = torch.tensor(processor.image_std if processor.do_normalize else [1.0] * 3, dtype=torch.float64)
    return rescale / std, -mean / std


def teacher_input_transform(student_processor, teacher_processor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(scale, shift)`, each (3, 1, 1) float32, that turn pixel values normalised by `student_processor` into those
    `teacher_processor` would give for the same image (`x_teacher = x_student * scale + shift`); None when the two
    rescale and normalise alike (or either is unknown), e.g. an ImageNet-normalised student and a CLIP teacher."""
    if student_processor is None or teacher_processor is None:
        return None
    a_student, b_student = normalization_affine(student_processor)
    a_teacher, b_teacher = normalization_affine(teacher_processor)
    scale = a_teacher / a_student
    shift = b_teacher - b_student * scale
    if torch.allclose(scale, torch.ones_like(scale)) and torch.allclose(shift, torch.zeros_like(shift)):
        return None
    return scale.float()[:, None, None], shift.float()[:, None, None]


def renormalize(pixel_values: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(B, 3, H, W) pixel values through `teacher_input_transform`'s `(scale, shift)`; unchanged for None."""
    if transform is None:
        return pixel_values
    scale, shift = transform
    return pixel_values * scale.to(pixel_values) + shift.to(pixel_values)


def saved_image_processor(teacher) -> SADImageProcessor | None:
    """The image processor saved with a teacher (given as a path / Hub id, or a model loaded from one); None when
    there is none, e.g. a model built in memory (its inputs are then assumed normalised as the student's)."""
    source = teacher if isinstance(teacher, str) else getattr(teacher, "name_or_path", "")
    if not source:
        return None
    try:
        return SADImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None
