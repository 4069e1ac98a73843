"""`load_teacher`: the one place that builds a teacher of the right kind from what a user gives.

- nothing: no teacher (supervised training), or the mean teacher with `ema_teacher=True`;
- a saved hf-sad detector (path / Hub id) or one in memory: `DetectorTeacher`;
- a list of them: `SADTeacherEnsemble`;
- any other transformers detector (DETR family, OWL-ViT / OWLv2), path or model: `TransformersDetectorTeacher`.

hf-sad teachers are checked against the student first (levels, anchors, classes); a teacher normalising its inputs
otherwise (e.g. a CLIP tower's mean and std) gets the student's pixels renormalised to its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..model.builder import load_detector
from ..model.image_processing_sad import SADImageProcessor
from ..model.modeling_sad import SADForObjectDetection
from .base import DetectorTeacher, Teacher, check_teacher_compatible, saved_image_processor, teacher_input_transform
from .ema import EMATeacher
from .ensemble import SADTeacherEnsemble
from .transformers_detector import TransformersDetectorTeacher, is_sad_source, load_transformers_teacher

if TYPE_CHECKING:
    from ..arguments import DistillationArguments

__all__ = ["load_teacher"]


def load_teacher(
    teacher_model,
    student: SADForObjectDetection,
    args: DistillationArguments,
    student_processor: SADImageProcessor,
    teacher_processor=None,
) -> Teacher | None:
    """The teacher of a run, or None when the distillation mode needs none.

    Args:
        teacher_model: a `SADForObjectDetection` or a path / Hub id of one; a list of them (an ensemble, combined as
            `args.teacher_aggregation` says); any transformers object detector or a path / Hub id of one; or None
            (supervised training, or the mean teacher with `args.ema_teacher`).
        student: the student (the teacher's anchors and classes must be its own; the mean teacher averages it).
        args: the run's settings (`DistillationArguments` or `SADTrainingArguments`).
        student_processor: the student's image processor (how its pixels are normalised).
        teacher_processor: the teacher's processor where it is not saved with the teacher (see `SADTrainer`).
    """
    args.check_teacher(given=teacher_model is not None)
    if args.ema_teacher:
        return EMATeacher(student, args.ema_decay)
    if not args.mode.needs_teacher:
        return None
    if isinstance(teacher_model, (list, tuple)):
        members = [load_detector(t, f"teacher {i}") for i, t in enumerate(teacher_model)]
        for i, member in enumerate(members):
            try:
                check_teacher_compatible(member, student)
            except ValueError as error:
                name = teacher_model[i] if isinstance(teacher_model[i], str) else member.name_or_path
                raise ValueError(f"Teacher {i} ({name or 'a model object'}): {error}") from error
        transforms = [teacher_input_transform(student_processor, saved_image_processor(t)) for t in teacher_model]
        return SADTeacherEnsemble(members, args.teacher_aggregation, args.era_temperature, transforms,
                                  sources=[_source(given, member) for given, member in zip(teacher_model, members)])
    if not is_sad_source(teacher_model):
        model = load_transformers_teacher(teacher_model) if isinstance(teacher_model, str) else teacher_model
        return TransformersDetectorTeacher(model, teacher_processor, student.config, student_processor,
                                           label_map=args.resolved_teacher_label_map,
                                           source=_source(teacher_model, model))
    detector = load_detector(teacher_model, "teacher")
    check_teacher_compatible(detector, student)
    transform = teacher_input_transform(student_processor, teacher_processor or saved_image_processor(teacher_model))
    return DetectorTeacher(detector, transform, source=_source(teacher_model, detector))


def _source(given, model) -> str:
    """What a teacher was loaded from, for the card and the resume check: a local folder by its absolute path."""
    source = given if isinstance(given, str) else model.name_or_path
    if source and Path(source).exists():  # one spelling of a local folder
        source = str(Path(source).resolve())
    return source
