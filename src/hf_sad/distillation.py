"""The SAD training step's loss, as a function of the student's output, the teacher's output and the batch.

`sad_loss` is what `SADTrainer.compute_loss` calls and what benchmarks and custom loops can call without a Trainer:

- the supervised focal + box loss on the labeled images,
- a distillation term (`distill_loss`) between student and teacher logits on the labeled images, weighted by
  `labeled_distill_weight`,
- on the unlabeled images, a distillation term weighted by `unlabeled_distill_weight`, plus RetinaNet's loss against
  the teacher's detections above `pseudo_label_threshold` (pseudo-boxes) weighted by `pseudo_box_weight`: the full
  focal + box loss (`pseudo_box_loss="full"`, what the authors' code does) or the box loss only (`"box"`); or, with
  `distill_loss="hard"`, the full supervised loss against the pseudo-boxes instead of any soft term (data
  distillation). With `drop_unlabeled_without_pseudo_boxes`, unlabeled images on which the teacher detects nothing
  leave the step, as the authors' data loader cannot load them.

Anchors in the ignore band of the ground-truth boxes (labeled images) or of the pseudo-boxes (unlabeled images) are
left out of the distillation, as in the original implementation. Teacher and student must produce logits that line up
anchor by anchor and class by class (`check_teacher_compatible`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.ops import box_convert
from transformers import AutoModelForObjectDetection

from .detection_loss import assign_anchors, box_loss, detection_loss
from .image_processing_sad import SADImageProcessor
from .losses import adaptive_distillation_loss, binary_entropy, focal_distillation_loss, kl_distillation_loss
from .modeling_sad import SADForObjectDetection, SADObjectDetectionOutput
from .training_args import DistillationArguments

__all__ = [
    "SADLossOutput",
    "check_teacher_compatible",
    "hard_pseudo_labels",
    "load_detector",
    "normalization_affine",
    "renormalize",
    "sad_loss",
    "saved_image_processor",
    "teacher_input_transform",
    "zero_loss",
]


@dataclass
class SADLossOutput:
    """Result of `sad_loss`.

    Attributes:
        loss: scalar fp32 loss of the step.
        metrics: detached scalars to log, by name: `loss_gt`, `loss_cls`, `loss_box` (supervised, labeled images),
            `loss_distill_labeled`, `loss_distill_unlabeled`, `distill_normalizer_*`, `adl_mean_weight_*`,
            `loss_box_pseudo`, `pseudo_boxes_per_image`, as far as the batch and the settings produce them.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def load_detector(model: SADForObjectDetection | str, role: str) -> SADForObjectDetection:
    """`model` itself, or the SAD detector saved at the path / Hub id `model`; errors name the `role` ("teacher")."""
    if isinstance(model, str):
        if Path(model).is_file():
            raise ValueError(
                f"The {role} {model!r} is a file; pass the folder that holds the saved model (config.json and "
                f"model.safetensors), e.g. {str(Path(model).parent)!r}."
            )
        try:
            model = AutoModelForObjectDetection.from_pretrained(model)
        except (OSError, ValueError) as err:  # missing/unreadable files; ValueError: a folder without a SAD config
            raise ValueError(f"Could not load the {role} from {model!r}: {err}") from err
    if not isinstance(model, SADForObjectDetection):
        raise TypeError(f"The {role} must be a SADForObjectDetection, got {type(model).__name__}.")
    return model


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


def hard_pseudo_labels(
    teacher_outputs: SADObjectDetectionOutput, processor: SADImageProcessor, threshold: float
) -> list[dict[str, torch.Tensor]]:
    """The teacher's detections with a score above `threshold` as hard targets ("data distillation").

    Detections come from `processor.post_process_object_detection`, so NMS, top-k and detections per image are the
    processor's settings, as at inference.

    Returns:
        Per image `{"class_labels": (k,) int64, "boxes": (k, 4) normalised cxcywh, "scores": (k,)}`, the label
        format of `SADForObjectDetection`.
    """
    detections = processor.post_process_object_detection(teacher_outputs, threshold=threshold)
    return [
        {"class_labels": d["labels"], "boxes": box_convert(d["boxes"], "xyxy", "cxcywh"), "scores": d["scores"]}
        for d in detections
    ]


def zero_loss(outputs: SADObjectDetectionOutput) -> torch.Tensor:
    """A zero connected to every student output, so that DDP sees a gradient for every parameter on any batch."""
    return outputs.logits.sum() * 0.0 + outputs.box_regression.sum() * 0.0


def sad_loss(
    config,
    outputs: SADObjectDetectionOutput,
    teacher_outputs: SADObjectDetectionOutput | None,
    labels: list[dict[str, torch.Tensor]],
    is_labeled: torch.Tensor,
    args: DistillationArguments,
    processor: SADImageProcessor,
) -> SADLossOutput:
    """The loss of one SAD training step (see the module docstring).

    Args:
        config: the student's `SADConfig` (IoU thresholds, focal and box loss settings).
        outputs: the student's output on the batch.
        teacher_outputs: the teacher's output on the same pixels (`None`: supervised loss only).
        labels: per image `{"class_labels", "boxes" (normalised cxcywh)}`; ignored for unlabeled images.
        is_labeled: (B,) bool, which images have labels.
        args: the distillation settings (`DistillationArguments` or `SADTrainingArguments`).
        processor: the student's image processor; its post-processing settings make the pseudo-boxes.
    """
    labeled = is_labeled.nonzero().flatten().tolist()
    unlabeled = (~is_labeled).nonzero().flatten().tolist()
    loss, metrics = zero_loss(outputs), {}
    assignment_labels = torch.zeros(outputs.logits.shape[:2], dtype=torch.long, device=outputs.logits.device)
    if labeled:
        supervised = _rows_detection_loss(config, outputs, labeled, [labels[i] for i in labeled])
        loss = loss + supervised.loss
        assignment_labels[labeled] = supervised.assignment.labels
        metrics.update(loss_gt=supervised.loss.detach(), loss_cls=supervised.loss_dict["loss_cls"],
                       loss_box=supervised.loss_dict["loss_box"])
    if teacher_outputs is None or args.distill_loss == "none":
        return SADLossOutput(loss, metrics)
    if teacher_outputs.logits.shape != outputs.logits.shape:
        raise RuntimeError(
            f"Teacher logits {tuple(teacher_outputs.logits.shape)} do not line up with student logits "
            f"{tuple(outputs.logits.shape)}."
        )
    if getattr(teacher_outputs, "teacher_disagreement", None) is not None:  # an ensemble of teachers
        metrics["teacher_disagreement"] = teacher_outputs.teacher_disagreement

    pseudo = {}
    if unlabeled:
        # A teacher that predicts a set of boxes (a transformers detector) gives its pseudo-boxes from that set.
        source = teacher_outputs.detections() if hasattr(teacher_outputs, "detections") else teacher_outputs
        rows = SADObjectDetectionOutput(logits=source.logits[unlabeled], pred_boxes=source.pred_boxes[unlabeled])
        pseudo = dict(zip(unlabeled, hard_pseudo_labels(rows, processor, args.pseudo_label_threshold)))
        metrics["pseudo_boxes_per_image"] = torch.tensor(sum(len(p["boxes"]) for p in pseudo.values()) / len(pseudo))
        if args.drop_unlabeled_without_pseudo_boxes:  # as the released loader, which cannot load them
            kept = [i for i in unlabeled if len(pseudo[i]["boxes"])]
            metrics["unlabeled_dropped"] = torch.tensor(float(len(unlabeled) - len(kept)))
            unlabeled = kept

    if unlabeled and (args.distill_loss == "hard" or (args.pseudo_box_loss == "full" and args.pseudo_box_weight)):
        # The teacher's detections as ground truth: RetinaNet's full loss ("hard" data distillation; in SAD as the
        # authors' code runs it, on top of the soft targets).
        hard = _rows_detection_loss(config, outputs, unlabeled, [pseudo[i] for i in unlabeled])
        assignment_labels[unlabeled] = hard.assignment.labels
        if args.distill_loss == "hard":
            loss = loss + args.unlabeled_distill_weight * hard.loss
            metrics["loss_distill_unlabeled"] = hard.loss.detach()
            return SADLossOutput(loss, metrics)
        loss = loss + args.pseudo_box_weight * hard.loss
        metrics.update(loss_pseudo=hard.loss.detach(), loss_cls_pseudo=hard.loss_dict["loss_cls"],
                       loss_box_pseudo=hard.loss_dict["loss_box"])
    elif unlabeled:
        # Box regression only against the teacher's detections; classification is left to the soft targets.
        targets, sizes = [pseudo[i] for i in unlabeled], outputs.image_sizes[unlabeled]
        assignment = assign_anchors(outputs.anchors, targets, sizes, config)
        assignment_labels[unlabeled] = assignment.labels
        if args.pseudo_box_weight:
            loss_box = box_loss(outputs.box_regression[unlabeled], outputs.anchors, targets, sizes, assignment, config)
            loss = loss + args.pseudo_box_weight * loss_box
            metrics["loss_box_pseudo"] = loss_box.detach()
    if args.distill_loss == "hard":
        return SADLossOutput(loss, metrics)

    keep = distilled_anchors(assignment_labels, args)
    if args.teacher_confidence_mask is not None:  # uncertainty-aware: only where the teacher is sure of every class
        certain = binary_entropy(teacher_outputs.logits).amax(-1) < args.teacher_confidence_mask
        metrics["teacher_certain_fraction"] = certain.float().mean()
        keep = keep & certain
    for rows, weight, name in ((labeled, args.labeled_distill_weight, "labeled"),
                               (unlabeled, args.unlabeled_distill_weight, "unlabeled")):
        if not rows or weight == 0:
            continue
        in_rows = torch.zeros_like(keep)
        in_rows[rows] = True
        mask = keep & in_rows
        normalizer = _normalizer(teacher_outputs.logits, assignment_labels, mask, in_rows, args)
        term, stats = distillation_term(outputs.logits, teacher_outputs.logits, mask, normalizer, args)
        loss = loss + weight * term
        metrics[f"loss_distill_{name}"] = term.detach()
        metrics[f"distill_normalizer_{name}"] = stats["normalizer"]
        if args.distill_loss == "adl":
            metrics[f"adl_mean_weight_{name}"] = stats["mean_weight"]
    return SADLossOutput(loss, metrics)


def distilled_anchors(assignment_labels: torch.Tensor, args: DistillationArguments) -> torch.Tensor:
    """(B, N) bool: the anchors distilled, given their (B, N) assignment (1 foreground, 0 background, -1 ignore band
    of the real or pseudo boxes): every anchor outside the ignore band, or background only
    (`args.distill_entries == "background"`)."""
    if args.distill_entries == "background":
        return assignment_labels == 0
    return assignment_labels >= 0


def _normalizer(
    teacher_logits: torch.Tensor,
    assignment_labels: torch.Tensor,
    mask: torch.Tensor,
    in_rows: torch.Tensor,
    args: DistillationArguments,
) -> str | torch.Tensor:
    """What the distillation sum of some rows is divided by (see `DistillationArguments.distill_normalizer`)."""
    if args.distill_normalizer == "positives":
        return ((assignment_labels == 1) & mask).sum().clamp(min=1).float()
    if args.distill_normalizer_anchors == "distilled":
        return "adaptive"  # the loss sums q ** power over the entries it distils
    # Over every anchor of the rows, ignore band included, as the authors' code counts.
    q = torch.sigmoid(teacher_logits[in_rows].float() / args.distill_temperature)
    return q.pow(args.normalizer_power).sum().clamp(min=1.0)


def distillation_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    normalizer: str | torch.Tensor,
    args: DistillationArguments,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The `args.distill_loss` ("adl", "kl" or "fdl") of (B, N, C) logits over the entries of the (B, N) `mask`."""
    common = dict(
        temperature=args.distill_temperature,
        normalizer=normalizer,
        power=args.normalizer_power,
        mask=mask,
        return_stats=True,
    )
    if args.distill_loss == "adl":
        return adaptive_distillation_loss(
            student_logits, teacher_logits, beta=args.adl_beta, gamma=args.adl_gamma, variant=args.adl_variant,
            **common,
        )
    if args.distill_loss == "fdl":
        return focal_distillation_loss(student_logits, teacher_logits, gamma=args.adl_gamma, **common)
    return kl_distillation_loss(student_logits, teacher_logits, **common)


def _rows_detection_loss(config, outputs: SADObjectDetectionOutput, rows: list[int], targets: list[dict]):
    """The supervised loss on a subset of the batch's images (`rows`) against `targets`."""
    return detection_loss(
        outputs.logits[rows], outputs.box_regression[rows], outputs.anchors, targets, outputs.image_sizes[rows], config
    )
