"""Anchors, box coding, anchor matching and detection selection of the SAD detector: small functions of tensors.

Coordinates: `xyxy` is x1, y1, x2, y2 and `cxcywh` is centre x, centre y, width, height; "absolute" means pixels of
the (padded) network input, "normalised" means a fraction of an image's valid (unpadded) width and height.

This file is copied next to saved weights for `trust_remote_code` loading: it imports only torch and torchvision.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torchvision.ops import batched_nms, box_convert, box_iou

# Largest box-delta exponent, as in torchvision/Detectron: keeps exp() finite for wild early predictions.
_MAX_DELTA_LOG = math.log(1000.0 / 16)

__all__ = [
    "AnchorAssignment",
    "absolute_xyxy",
    "decode_boxes",
    "encode_boxes",
    "ignore_crowd_regions",
    "make_anchors",
    "make_cell_anchors",
    "match_anchors",
    "pad_boxes",
    "select_detections",
]


# ----------------------------------------------------------------------------------------------------------------------
# Anchors and box coding
# ----------------------------------------------------------------------------------------------------------------------


def make_cell_anchors(base_size: float, scales: list[float], aspect_ratios: list[float]) -> torch.Tensor:
    """Anchors of one location, centred on (0, 0).

    Returns:
        (A, 4) xyxy in pixels, A = len(scales) * len(aspect_ratios), ordered scale-major.
    """
    sizes = torch.tensor([base_size * s for s in scales], dtype=torch.float64)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)  # height / width
    widths = (sizes[:, None] / ratios.sqrt()[None, :]).reshape(-1)
    heights = (sizes[:, None] * ratios.sqrt()[None, :]).reshape(-1)
    return torch.stack([-widths, -heights, widths, heights], dim=1).div(2).float()


def make_anchors(
    spatial_shapes: list[tuple[int, int]],
    strides: list[int],
    cell_anchors: list[torch.Tensor],
    device: torch.device | None = None,
) -> torch.Tensor:
    """All anchors of all pyramid levels, in the order the heads emit their predictions.

    Args:
        spatial_shapes: (height, width) of each level's feature map.
        strides: stride in pixels of each level.
        cell_anchors: per level, (A, 4) xyxy anchors of one location centred on (0, 0).

    Returns:
        (N, 4) xyxy absolute pixel coordinates on the (padded) input, N = sum_l H_l * W_l * A, ordered by level, then
        row, column, anchor. Anchor centres sit at the centres of the feature cells, ((x + 0.5) * stride, ...).
    """
    anchors = []
    for (height, width), stride, cell in zip(spatial_shapes, strides, cell_anchors):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
        anchors.append((centres + cell.to(device)[None]).reshape(-1, 4))
    return torch.cat(anchors)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """RetinaNet box deltas (dx, dy, dw, dh) of `boxes` relative to `anchors` (both (..., 4) xyxy, same units)."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_ctr = anchors[..., :2] + 0.5 * anchor_wh
    box_wh = boxes[..., 2:] - boxes[..., :2]
    box_ctr = boxes[..., :2] + 0.5 * box_wh
    return torch.cat([(box_ctr - anchor_ctr) / anchor_wh, torch.log(box_wh / anchor_wh)], dim=-1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_boxes`: (..., 4) deltas and (..., 4) xyxy anchors -> (..., 4) xyxy boxes."""
    anchor_wh = anchors[..., 2:] - anchors[..., :2]
    anchor_ctr = anchors[..., :2] + 0.5 * anchor_wh
    ctr = anchor_ctr + deltas[..., :2] * anchor_wh
    wh = anchor_wh * torch.exp(deltas[..., 2:].clamp(max=_MAX_DELTA_LOG))
    return torch.cat([ctr - 0.5 * wh, ctr + 0.5 * wh], dim=-1)


def absolute_xyxy(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(M, 4) normalised cxcywh -> (M, 4) xyxy absolute pixels, for an image whose valid region is `size` =
    (height, width) pixels."""
    scale = size.flip(-1).repeat(2).to(boxes.device)
    return box_convert(boxes.float() * scale, "cxcywh", "xyxy")


# ----------------------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------------------


class AnchorAssignment(NamedTuple):
    """Result of `match_anchors` for a batch.

    Attributes:
        labels: (B, N) int64; 1 = positive, 0 = negative (background), -1 = ignored (IoU between the thresholds).
        matched_idx: (B, N) int64 index of the matched box in that image's box list (0 where not positive).
    """

    labels: torch.Tensor
    matched_idx: torch.Tensor


def match_anchors(
    anchors: torch.Tensor,
    boxes: list[torch.Tensor],
    fg_iou_threshold: float = 0.5,
    bg_iou_threshold: float = 0.4,
    allow_low_quality_matches: bool = True,
    low_quality_min_iou: float = 0.0,
) -> AnchorAssignment:
    """Assign each anchor to at most one box, for the whole batch at once.

    One `box_iou` over all images' boxes against the anchors replaces torchvision's per-image loop; the IoU rows are
    then scattered into a (B, M_max, N) matrix padded with -1, so images with fewer (or no) boxes need no special case.

    Args:
        anchors: (N, 4) xyxy absolute pixels.
        boxes: per image, (M_i, 4) xyxy absolute pixels (M_i may be 0).
        fg_iou_threshold: IoU >= this makes a positive.
        bg_iou_threshold: IoU < this to every box makes a negative; IoU in between is ignored.
        allow_low_quality_matches: also make positive every anchor that is a box's best match (ties included), so
            small or oddly shaped boxes are never left without a positive anchor.
        low_quality_min_iou: such a best match counts only with at least this IoU (Detectron: `bg_iou_threshold`;
            below it the anchor stays background).
    """
    batch_size, num_anchors, device = len(boxes), anchors.shape[0], anchors.device
    counts = [b.shape[0] for b in boxes]
    max_boxes = max(counts, default=0)
    if max_boxes == 0:
        zeros = torch.zeros(batch_size, num_anchors, dtype=torch.long, device=device)
        return AnchorAssignment(zeros, zeros.clone())

    iou = box_iou(torch.cat(boxes).to(anchors), anchors)  # (sum M_i, N)
    rows = torch.cat([i * max_boxes + torch.arange(m, device=device) for i, m in enumerate(counts)])
    padded = iou.new_full((batch_size * max_boxes, num_anchors), -1.0)
    padded[rows] = iou
    padded = padded.view(batch_size, max_boxes, num_anchors)

    best_iou, matched_idx = padded.max(dim=1)  # (B, N)
    labels = torch.full_like(matched_idx, -1)
    labels[best_iou < bg_iou_threshold] = 0
    labels[best_iou >= fg_iou_threshold] = 1
    if allow_low_quality_matches:
        best_per_box = padded.max(dim=2, keepdim=True).values  # (B, M, 1)
        is_best = (padded == best_per_box) & (best_per_box > 0) & (best_per_box >= low_quality_min_iou)
        labels[is_best.any(dim=1)] = 1
    matched_idx = torch.where(labels == 1, matched_idx, torch.zeros_like(matched_idx))
    return AnchorAssignment(labels, matched_idx)


def ignore_crowd_regions(
    labels: torch.Tensor, anchors: torch.Tensor, crowd_boxes: list[torch.Tensor], ioa_threshold: float
) -> torch.Tensor:
    """Anchor labels (as `AnchorAssignment.labels`, (B, N)) with every anchor that is not a positive and lies at least
    `ioa_threshold` of its area inside a crowd box of its image set to -1 (ignored: neither positive nor negative).

    COCO's `iscrowd` boxes cover groups of objects that were not labeled one by one: an anchor inside one may well
    sit on an object, so it must not be taught "background". Args: `anchors` (N, 4) and `crowd_boxes` per image
    (K_i, 4), xyxy absolute pixels. Returns a new tensor.
    """
    labels = labels.clone()
    anchor_area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    for image, crowd in enumerate(crowd_boxes):
        if crowd.numel() == 0:
            continue
        crowd = crowd.to(anchors)
        top_left = torch.maximum(anchors[:, None, :2], crowd[None, :, :2])
        bottom_right = torch.minimum(anchors[:, None, 2:], crowd[None, :, 2:])
        inside = (bottom_right - top_left).clamp(min=0).prod(dim=-1) / anchor_area[:, None]  # (N, K) IoA
        covered = (inside >= ioa_threshold).any(dim=1)
        labels[image, covered & (labels[image] != 1)] = -1
    return labels


def pad_boxes(boxes: list[torch.Tensor], classes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image boxes (M_i, 4) and classes (M_i,) into zero-padded (B, M, 4) and (B, M), M = max(1, max M_i)."""
    max_boxes = max(1, max((b.shape[0] for b in boxes), default=0))
    padded_boxes = boxes[0].new_zeros(len(boxes), max_boxes, 4)
    padded_classes = torch.zeros(len(boxes), max_boxes, dtype=torch.long, device=boxes[0].device)
    for i, (b, c) in enumerate(zip(boxes, classes)):
        padded_boxes[i, : b.shape[0]] = b
        padded_classes[i, : c.shape[0]] = c
    return padded_boxes, padded_classes


# ----------------------------------------------------------------------------------------------------------------------
# Detection selection (post-processing and pseudo-labels)
# ----------------------------------------------------------------------------------------------------------------------


def top_candidates(
    scores: torch.Tensor, boxes: torch.Tensor, k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The `k` highest (anchor, class) scores of each image, the candidates of NMS.

    Args:
        scores: `(batch_size, num_anchors, num_classes)` probabilities.
        boxes: `(batch_size, num_anchors, 4)` x1,y1,x2,y2 boxes of the anchors, in any units.
        k: candidates per image (fewer when there are fewer (anchor, class) pairs); `None` for all of them.

    Returns:
        `scores` `(batch_size, k)` in decreasing order, `labels` int64 `(batch_size, k)` (class index) and `boxes`
        `(batch_size, k, 4)` (units of `boxes`).
    """
    num_anchors, num_classes = scores.shape[1:]
    if k is None:
        k = num_anchors * num_classes
    else:
        # The k best (anchor, class) scores lie on the k anchors with the best top-class scores, so a top-k over
        # anchors shrinks the top-k below from N * C to k * C scores (at 512 px with 80 classes, 3.9M to 80k).
        # No branch on num_anchors: with fewer anchors than k this selects them all, and a traced graph stays one.
        num_best = min(k, num_anchors)
        _, best_anchors = scores.amax(dim=2).topk(num_best, dim=1)
        scores = scores.gather(1, best_anchors.unsqueeze(-1).expand(-1, -1, num_classes))
        boxes = boxes.gather(1, best_anchors.unsqueeze(-1).expand(-1, -1, 4))
        k = min(k, num_best * num_classes)
    top_scores, flat_index = scores.flatten(1).topk(k, dim=1)
    top_boxes = boxes.gather(1, (flat_index // num_classes).unsqueeze(-1).expand(-1, -1, 4))
    return top_scores, flat_index % num_classes, top_boxes


def select_detections(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    *,
    score_threshold: float = 0.05,
    nms_iou_threshold: float = 0.5,
    pre_nms_top_k: int | None = 1000,
    max_detections: int | None = 100,
) -> list[dict[str, torch.Tensor]]:
    """
    Select detections from dense per-anchor, per-class scores, for a whole batch at once.

    Per image, the `pre_nms_top_k` highest (anchor, class) scores are taken (a `torch.topk` over anchors by their best
    class, then one over the flattened scores of those anchors, batched over images), those above `score_threshold`
    are kept, then one `torchvision.ops.batched_nms` runs over the whole batch with group
    `image_index * num_classes + label`, so that neither different images nor different classes suppress each other.
    Finally the `max_detections` highest-scoring survivors of each image are kept. As in torchvision's RetinaNet an
    anchor may yield several detections, one per class whose score qualifies.

    Args:
        scores (`torch.Tensor` of shape `(batch_size, num_anchors, num_classes)`):
            Probabilities (e.g. sigmoid of the logits).
        boxes (`torch.Tensor` of shape `(batch_size, num_anchors, 4)`):
            x1,y1,x2,y2 boxes of the anchors, in any units (normalised or absolute); returned in the same units.
        score_threshold (`float`):
            Candidates need a score strictly greater than this.
        nms_iou_threshold (`float`):
            A candidate is suppressed by a higher-scoring one of the same image and class with IoU above this.
        pre_nms_top_k (`int`, *optional*):
            Candidates per image entering NMS; `None` for all.
        max_detections (`int`, *optional*):
            Detections kept per image; `None` for all.

    Returns:
        `list[dict[str, torch.Tensor]]`: one dict per image, sorted by decreasing score: `scores` `(k,)` (dtype of
        `scores`), `labels` int64 `(k,)` (class index), `boxes` `(k, 4)` x1,y1,x2,y2 (dtype and units of `boxes`).
    """
    if scores.ndim != 3 or boxes.shape != (*scores.shape[:2], 4):
        raise ValueError(
            "`scores` must be (batch_size, num_anchors, num_classes) and `boxes` (batch_size, num_anchors, 4); got "
            f"{tuple(scores.shape)} and {tuple(boxes.shape)}."
        )
    batch_size, _, num_classes = scores.shape
    top_scores, top_labels, top_boxes = top_candidates(scores, boxes, pre_nms_top_k)
    # Mutation testing: devices are tested on a GPU (test_select_detections_on_cuda_matches_cpu).
    top_images = torch.arange(batch_size, device=scores.device).unsqueeze(1).expand_as(top_labels)  # pragma: no mutate

    above = top_scores > score_threshold
    cand_scores, cand_labels, cand_boxes, cand_images = (
        top_scores[above],
        top_labels[above],
        top_boxes[above],
        top_images[above],
    )
    nms_boxes = _boxes_for_nms(cand_boxes)
    kept = batched_nms(
        nms_boxes, cand_scores.to(nms_boxes.dtype), cand_images * num_classes + cand_labels, nms_iou_threshold
    )

    # `kept` is sorted by decreasing score over the whole batch; a stable sort by image keeps that order per image.
    kept_images, order = torch.sort(cand_images[kept], stable=True)
    kept = kept[order]
    counts = torch.bincount(kept_images, minlength=batch_size)
    if max_detections is not None:
        first_of_image = (counts.cumsum(0) - counts)[kept_images]
        # Mutation testing: devices are tested on a GPU (test_select_detections_on_cuda_matches_cpu).
        rank_in_image = torch.arange(len(kept), device=kept.device) - first_of_image  # pragma: no mutate
        kept = kept[rank_in_image < max_detections]
        counts = counts.clamp(max=max_detections)

    counts = counts.tolist()
    return [
        {"scores": image_scores, "labels": image_labels, "boxes": image_boxes}
        for image_scores, image_labels, image_boxes in zip(
            cand_scores[kept].split(counts), cand_labels[kept].split(counts), cand_boxes[kept].split(counts)
        )
    ]


def _boxes_for_nms(boxes: torch.Tensor) -> torch.Tensor:
    """
    Copy of `boxes` safe for `batched_nms`'s coordinate trick, which offsets each group by `group * (max + 1)`.

    With thousands of groups that offset makes fp32 coordinates lose precision, and a negative coordinate would let
    groups overlap; float64 (where the device has it) and a shift to non-negative coordinates (IoU is shift-invariant)
    avoid both.
    """
    dtype = torch.float32 if boxes.device.type == "mps" else torch.float64  # pragma: no mutate (MPS only)
    boxes = boxes.to(dtype)
    if boxes.numel():
        boxes = boxes - boxes.min().clamp(max=0)
    return boxes
