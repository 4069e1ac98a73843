"""The SAD training step's loss, as a function of the student's output, the teacher's output and the batch.

`sad_loss` is what `SADTrainer.compute_loss` calls and what benchmarks and custom loops can call without a Trainer:

- the supervised focal + box loss on the labeled images,
- the distillation mode's soft term (`hf_sad.distillation.modes`) between student and teacher logits on the labeled
  images, weighted by `labeled_distill_weight`,
- on the unlabeled images, the soft term weighted by `unlabeled_distill_weight`, plus RetinaNet's loss against the
  teacher's detections above `pseudo_label_threshold` (pseudo-boxes) weighted by `pseudo_box_weight`: the full focal
  + box loss (`pseudo_box_loss="full"`, what the authors' code does) or the box loss only (`"box"`); or, in a mode
  that trains on pseudo-boxes only (`"hard"`, data distillation), the full supervised loss against them instead of
  any soft term. With `drop_unlabeled_without_pseudo_boxes`, unlabeled images on which the teacher detects nothing
  leave the step, as the authors' data loader cannot load them.

Anchors in the ignore band of the ground-truth boxes (labeled images) or of the pseudo-boxes (unlabeled images) are
left out of the distillation, as in the original implementation. Teacher and student must produce logits that line up
anchor by anchor and class by class (`hf_sad.teachers.base.check_teacher_compatible`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torchvision.ops import box_convert

from ..model.detection_loss import assign_anchors, box_loss, detection_loss
from ..model.image_processing_sad import SADImageProcessor
from ..model.modeling_sad import SADObjectDetectionOutput
from .losses import binary_entropy
from .modes import distillation_mode

if TYPE_CHECKING:
    from ..arguments import LossArguments

__all__ = [
    "DISTILL_ENTRIES",
    "DISTILL_NORMALIZERS",
    "NORMALIZER_ANCHORS",
    "PSEUDO_BOX_LOSSES",
    "SADLossOutput",
    "distillation_term",
    "distilled_anchors",
    "hard_pseudo_labels",
    "sad_loss",
    "zero_loss",
]

#: What the distillation sum is divided by: the teacher's soft count of positives, or the positive anchors.
DISTILL_NORMALIZERS = ("adaptive", "positives")
#: Which anchors the adaptive normaliser counts: every anchor of the images (the authors' code), or the distilled ones.
NORMALIZER_ANCHORS = ("all", "distilled")
#: The loss against pseudo-boxes: RetinaNet's focal + box loss, or the box loss only.
PSEUDO_BOX_LOSSES = ("full", "box")
#: Which anchors are distilled: all outside the ignore band, or background ones only.
DISTILL_ENTRIES = ("all", "background")


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
    args: LossArguments,
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
    mode = distillation_mode(args.distill_loss)
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
    if teacher_outputs is None or not mode.needs_teacher:
        return SADLossOutput(loss, metrics)
    if teacher_outputs.logits.shape != outputs.logits.shape:
        raise RuntimeError(
            f"Teacher logits {tuple(teacher_outputs.logits.shape)} do not line up with student logits "
            f"{tuple(outputs.logits.shape)}."
        )

    pseudo = {}
    if unlabeled:
        # A teacher that predicts a set of boxes (a transformers detector) gives its pseudo-boxes from that set.
        source = teacher_outputs.detections()
        rows = SADObjectDetectionOutput(logits=source.logits[unlabeled], pred_boxes=source.pred_boxes[unlabeled])
        pseudo = dict(zip(unlabeled, hard_pseudo_labels(rows, processor, args.pseudo_label_threshold)))
        metrics["pseudo_boxes_per_image"] = torch.tensor(sum(len(p["boxes"]) for p in pseudo.values()) / len(pseudo),
                                                         device=loss.device)
        if args.drop_unlabeled_without_pseudo_boxes:  # as the released loader, which cannot load them
            kept = [i for i in unlabeled if len(pseudo[i]["boxes"])]
            metrics["unlabeled_dropped"] = torch.tensor(float(len(unlabeled) - len(kept)), device=loss.device)
            unlabeled = kept

    if unlabeled and (mode.pseudo_boxes_only or (args.pseudo_box_loss == "full" and args.pseudo_box_weight)):
        # The teacher's detections as ground truth: RetinaNet's full loss (data distillation; in SAD as the authors'
        # code runs it, on top of the soft targets).
        hard = _rows_detection_loss(config, outputs, unlabeled, [pseudo[i] for i in unlabeled])
        assignment_labels[unlabeled] = hard.assignment.labels
        if mode.pseudo_boxes_only:
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
    if mode.soft_term is None:
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
        if mode.logs_mean_weight:
            metrics[f"adl_mean_weight_{name}"] = stats["mean_weight"]
    return SADLossOutput(loss, metrics)


def distilled_anchors(assignment_labels: torch.Tensor, args: LossArguments) -> torch.Tensor:
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
    args: LossArguments,
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
    args: LossArguments,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The soft term of the mode `args.distill_loss` of (B, N, C) logits over the entries of the (B, N) `mask`."""
    return distillation_mode(args.distill_loss).soft_term(
        student_logits, teacher_logits, args, temperature=args.distill_temperature, normalizer=normalizer,
        power=args.normalizer_power, mask=mask, return_stats=True,
    )


def _rows_detection_loss(config, outputs: SADObjectDetectionOutput, rows: list[int], targets: list[dict]):
    """The supervised loss on a subset of the batch's images (`rows`) against `targets`."""
    return detection_loss(
        outputs.logits[rows], outputs.box_regression[rows], outputs.anchors, targets, outputs.image_sizes[rows], config
    )
