"""The supervised loss of the SAD detector: anchor matching, sigmoid focal loss and box regression loss.

As transformers keeps `loss/loss_for_object_detection.py` beside its detection models, the detector's training
targets live here: `SADForObjectDetection.forward` calls `detection_loss` when given labels, and distillation calls the
same functions for pseudo-boxes. Labels use the transformers detection format: per image `{"class_labels": (M,) int64,
"boxes": (M, 4) normalised cxcywh}` relative to the image's valid (unpadded) region, optionally with `"iscrowd"` (M,):
crowd boxes are no targets; anchors inside them are ignored (see `box_ops.ignore_crowd_regions`).

This file is copied next to saved weights for `trust_remote_code` loading: it imports only torch, torchvision and its
flat siblings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss

from .box_ops import (
    AnchorAssignment,
    absolute_xyxy,
    decode_boxes,
    encode_boxes,
    ignore_crowd_regions,
    match_anchors,
    pad_boxes,
)
from .configuration_sad import SADConfig

__all__ = [
    "DetectionLossOutput",
    "assign_anchors",
    "box_loss",
    "check_labels",
    "detection_loss",
    "num_positives",
    "sigmoid_focal_loss_sum",
]


class DetectionLossOutput(NamedTuple):
    """Result of `detection_loss`.

    Attributes:
        loss: scalar fp32, focal loss + `box_loss_weight` x box loss.
        loss_dict: `{"loss_cls", "loss_box", "num_positives"}`, detached scalars.
        assignment: the anchor assignment the loss used (for ignore masks and pseudo-box losses).
    """

    loss: torch.Tensor
    loss_dict: dict[str, torch.Tensor]
    assignment: AnchorAssignment


def assign_anchors(
    anchors: torch.Tensor, labels: list[dict[str, torch.Tensor]], image_sizes: torch.Tensor, config: SADConfig
) -> AnchorAssignment:
    """Match anchors ((N, 4) xyxy absolute pixels) to the boxes of `labels` (normalised cxcywh, images of valid
    (height, width) `image_sizes`), with the config's IoU thresholds; anchors inside crowd boxes are ignored.
    `matched_idx` indexes each image's non-crowd boxes, in order.

    Used for the supervised loss and by distillation to mask anchors in the ignore band, for ground-truth and pseudo
    boxes alike.
    """
    assignment = match_anchors(
        anchors,
        [absolute_xyxy(t["boxes"], size) for t, size in zip(_objects(labels), image_sizes)],
        config.fg_iou_threshold,
        config.bg_iou_threshold,
        config.allow_low_quality_matches,
        config.low_quality_match_min_iou,
    )
    crowd = [absolute_xyxy(t["boxes"][_crowd(t)], size) for t, size in zip(labels, image_sizes)]
    if any(len(boxes) for boxes in crowd):
        ignored = ignore_crowd_regions(assignment.labels, anchors, crowd, config.crowd_ioa_threshold)
        assignment = assignment._replace(labels=ignored)
    return assignment


def detection_loss(
    logits: torch.Tensor,
    box_regression: torch.Tensor,
    anchors: torch.Tensor,
    labels: list[dict[str, torch.Tensor]],
    image_sizes: torch.Tensor,
    config: SADConfig,
) -> DetectionLossOutput:
    """Sigmoid focal loss + box loss, each summed and divided by the number of positive anchors.

    Args:
        logits: (B, N, C) classification logits.
        box_regression: (B, N, 4) predicted deltas.
        anchors: (N, 4) xyxy absolute pixels.
        labels: per image `{"class_labels": (M,) int64, "boxes": (M, 4) normalised cxcywh}`.
        image_sizes: (B, 2) valid (height, width) of each image in pixels.
        config: the detector's config (IoU thresholds, focal and box loss settings).
    """
    check_labels(labels, config.num_labels)
    assignment = assign_anchors(anchors, labels, image_sizes, config)
    positive = assignment.labels == 1
    divisor = num_positives(assignment, config.sync_num_positives)

    objects = _objects(labels)
    _, padded_classes = pad_boxes([t["boxes"] for t in objects], [t["class_labels"].long() for t in objects])
    target_classes = padded_classes.gather(1, assignment.matched_idx).masked_fill(~positive, -1)
    loss_cls = sigmoid_focal_loss_sum(
        _loss_dtype(logits), target_classes, assignment.labels >= 0, config.focal_alpha, config.focal_gamma
    ) / divisor
    loss_box = box_loss(box_regression, anchors, labels, image_sizes, assignment, config, divisor)

    loss = loss_cls + config.box_loss_weight * loss_box
    loss_dict = {"loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "num_positives": divisor}
    return DetectionLossOutput(loss, loss_dict, assignment)


def sigmoid_focal_loss_sum(
    logits: torch.Tensor, target_classes: torch.Tensor, valid: torch.Tensor, alpha: float, gamma: float
) -> torch.Tensor:
    """Sum over valid anchors and all classes of the sigmoid focal loss against one-hot targets: the value of
    `torchvision.ops.sigmoid_focal_loss(logits, one_hot(target_classes), alpha, gamma, reduction="none")`
    summed over the anchors where `valid`, and its gradient, finite for any finite logits.

    Args:
        logits: (B, N, C) classification logits, fp32 (or fp64); computed in their dtype.
        target_classes: (B, N) int64, each anchor's class, -1 for background.
        valid: (B, N) bool, False for ignored anchors (no loss, no gradient).
        alpha: weight of the positive entries (negatives get 1 - alpha); -1 weights both 1, as in torchvision.
        gamma: focusing exponent.

    Written by hand because through autograd torchvision's version makes about thirty passes over the (B, N, C)
    tensor, most of them in its backward; at COCO scale (80 classes, 49k anchors) that was 4% of a ResNet-50
    training step (bench B1). This one computes the loss and its gradient together in about ten passes; the tests
    compare both with torchvision's.
    """
    with torch.autocast(logits.device.type, enabled=False):  # the dtype of `logits`, whatever the caller's autocast
        return _SigmoidFocalLossSum.apply(logits, target_classes, valid, alpha, gamma)


class _SigmoidFocalLossSum(torch.autograd.Function):
    """Every entry is first treated as a negative (target 0), which needs no one-hot tensor; the few positive
    entries are then overwritten. With q = sigmoid(x) the negative's loss is q^g softplus(x), its derivative
    q^g (g (1 - q) softplus(x) + q); a positive's is the same with x -> -x."""

    @staticmethod
    def forward(ctx, logits, target_classes, valid, alpha, gamma):
        neg_weight, pos_weight = (1.0, 1.0) if alpha < 0 else (1.0 - alpha, alpha)
        valid = valid.to(logits.dtype)
        q = torch.sigmoid(logits)
        softplus = F.softplus(logits)
        q_gamma = q.pow(gamma)
        loss_neg = q_gamma * softplus
        batch_idx, anchor_idx = (target_classes >= 0).nonzero(as_tuple=True)
        cls_idx = target_classes[batch_idx, anchor_idx]
        pos_logits = logits[batch_idx, anchor_idx, cls_idx]
        pos_w = valid[batch_idx, anchor_idx]
        p_neg = torch.sigmoid(-pos_logits)  # 1 - p of the positive entries
        softplus_pos = F.softplus(-pos_logits)
        loss_pos = p_neg.pow(gamma) * softplus_pos
        loss_neg[batch_idx, anchor_idx, cls_idx] = 0.0
        total = neg_weight * (loss_neg.sum(-1) * valid).sum() + pos_weight * (loss_pos * pos_w).sum()
        del loss_neg  # each (B, N, C) temporary is freed once used: they set the peak memory of a step (bench B7)
        if ctx.needs_input_grad[0]:
            grad = torch.addcmul(q, torch.sub(1.0, q), softplus, value=gamma)
            del softplus, q
            grad.mul_(q_gamma)
            grad.mul_(valid.unsqueeze(-1) * neg_weight)
            pos_grad = -p_neg.pow(gamma) * torch.addcmul(p_neg, 1.0 - p_neg, softplus_pos, value=gamma)
            grad[batch_idx, anchor_idx, cls_idx] = pos_weight * pos_grad * pos_w
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None


def box_loss(
    box_regression: torch.Tensor,
    anchors: torch.Tensor,
    labels: list[dict[str, torch.Tensor]],
    image_sizes: torch.Tensor,
    assignment: AnchorAssignment,
    config: SADConfig,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Box loss (smooth-L1 on deltas or GIoU on decoded boxes) of the positive anchors of `assignment` against their
    matched boxes, summed and divided by `divisor` (default: the batch's positives). Arguments as in
    `detection_loss`; `assignment` comes from `assign_anchors`."""
    objects = _objects(labels)
    gt_boxes = [absolute_xyxy(t["boxes"], size) for t, size in zip(objects, image_sizes)]
    padded_boxes, _ = pad_boxes(gt_boxes, [t["class_labels"].long() for t in objects])
    batch_idx, anchor_idx = (assignment.labels == 1).nonzero(as_tuple=True)
    matched_boxes = padded_boxes[batch_idx, assignment.matched_idx[batch_idx, anchor_idx]]
    pos_anchors, pos_deltas = anchors[anchor_idx], _loss_dtype(box_regression[batch_idx, anchor_idx])
    matched_boxes = matched_boxes.to(pos_deltas.dtype)
    if config.box_loss == "giou":
        loss = generalized_box_iou_loss(decode_boxes(pos_deltas, pos_anchors), matched_boxes, reduction="sum")
    else:
        target = encode_boxes(matched_boxes, pos_anchors)
        loss = F.smooth_l1_loss(pos_deltas, target, beta=config.smooth_l1_beta, reduction="sum")
    if divisor is None:
        divisor = num_positives(assignment, config.sync_num_positives)
    return loss / divisor


def _loss_dtype(x: torch.Tensor) -> torch.Tensor:
    """`x` in the losses' dtype: float32 (from bf16/fp16 outputs too), or float64 for float64 inputs (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _crowd(target: dict[str, torch.Tensor]) -> torch.Tensor:
    """(M,) bool: which boxes of an image's labels are crowd regions."""
    crowd = target.get("iscrowd")
    if crowd is None:
        return torch.zeros(len(target["boxes"]), dtype=torch.bool, device=target["boxes"].device)
    return torch.as_tensor(crowd, device=target["boxes"].device).bool()


def _objects(labels: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each image's labels without its crowd boxes: the boxes that are training targets."""
    result = []
    for target in labels:
        real = ~_crowd(target)
        result.append(target if real.all() else {"boxes": target["boxes"][real],
                                                 "class_labels": target["class_labels"][real]})
    return result


def num_positives(assignment: AnchorAssignment, sync: bool) -> torch.Tensor:
    """Positive anchors of the batch (averaged over processes when `sync`), at least 1: the losses' divisor."""
    count = (assignment.labels == 1).sum().float()
    if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
        count = count.clone()
        torch.distributed.all_reduce(count)
        count = count / torch.distributed.get_world_size()
    return count.clamp(min=1.0)


def check_labels(labels: list[dict[str, torch.Tensor]], num_labels: int) -> None:
    """Raise a ValueError naming the image (its index in the batch) whose labels are malformed."""
    for i, target in enumerate(labels):
        missing = {"class_labels", "boxes"} - set(target)
        if missing:
            raise ValueError(f"labels[{i}] lacks {sorted(missing)}; expected keys 'class_labels' and 'boxes'.")
        boxes, classes = target["boxes"], target["class_labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or classes.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"labels[{i}]: boxes must be (M, 4) and class_labels (M,), got {tuple(boxes.shape)} and "
                f"{tuple(classes.shape)}."
            )
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_labels):
            raise ValueError(
                f"labels[{i}]: class id {classes.max().item() if classes.max() >= num_labels else classes.min().item()}"
                f" is outside the model's {num_labels} classes (0..{num_labels - 1})."
            )
        if not torch.isfinite(boxes).all():
            raise ValueError(f"labels[{i}]: boxes contain NaN or inf coordinates.")
        if "iscrowd" in target and len(target["iscrowd"]) != boxes.shape[0]:
            raise ValueError(f"labels[{i}]: iscrowd has {len(target['iscrowd'])} entries for {boxes.shape[0]} boxes.")
