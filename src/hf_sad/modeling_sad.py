"""SAD detector: a RetinaNet-style single-stage detector on any timm backbone, as a transformers model.

timm backbone -> feature pyramid P`min_level`..P`max_level` -> shared classification and box heads, with anchors,
box coding and anchor matching as small separately testable functions. Anchors are computed in `forward` (cached per
feature size) rather than stored as buffers, so that `from_pretrained`'s meta-device construction never leaves them
uninitialised.

This file is copied next to saved weights for `trust_remote_code` loading: it imports only torch, torchvision, timm,
transformers and the flat sibling `configuration_sad`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_sad import SADConfig

# Largest box-delta exponent, as in torchvision/Detectron: keeps exp() finite for wild early predictions.
_MAX_DELTA_LOG = math.log(1000.0 / 16)


# ----------------------------------------------------------------------------------------------------------------------
# Anchors, box coding and matching
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
        is_best = (padded == best_per_box) & (best_per_box > 0)
        labels[is_best.any(dim=1)] = 1
    matched_idx = torch.where(labels == 1, matched_idx, torch.zeros_like(matched_idx))
    return AnchorAssignment(labels, matched_idx)


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
# Network
# ----------------------------------------------------------------------------------------------------------------------


class SADConv2d(nn.Conv2d):
    """A convolution of the pyramid or the heads, carrying its own initialisation rule for `_init_weights`.

    transformers initialises custom models module by module, only modules that own parameters, so the rule has to
    live on the convolution itself rather than on its container. `init_std=None` means kaiming-uniform (a=1).
    """

    def __init__(self, *args, init_std: float | None = None, init_bias: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_std = init_std
        self.init_bias = init_bias


def _stride_level(stride: int) -> int:
    level = round(math.log2(stride))
    if 2**level != stride:
        raise ValueError(f"Backbone feature stride {stride} is not a power of two.")
    return level


class SADBackbone(nn.Module):
    """A timm model with `features_only=True`; returns the feature maps that feed the pyramid.

    For a hierarchical backbone these are its maps at strides 2**min_level .. 2**top_level (top_level <= max_level);
    for a plain ViT (every map at one stride) it is its last map only.
    """

    def __init__(self, config: SADConfig):
        super().__init__()
        # pretrained=False always: weights come from `from_pretrained` or from the builder for fresh models.
        self.body = timm.create_model(config.backbone, pretrained=False, features_only=True, **config.backbone_kwargs)
        levels = [_stride_level(r) for r in self.body.feature_info.reduction()]
        channels = self.body.feature_info.channels()
        self.is_plain = len(set(levels)) == 1
        if self.is_plain:
            self.feature_indices = [len(levels) - 1]
        else:
            if config.min_level not in levels:
                raise ValueError(
                    f"Backbone {config.backbone!r} has feature strides {[2**lv for lv in levels]} but min_level="
                    f"{config.min_level} needs stride {2**config.min_level}."
                )
            self.feature_indices = [i for i, lv in enumerate(levels) if config.min_level <= lv <= config.max_level]
        self.levels = [levels[i] for i in self.feature_indices]
        self.channels = [channels[i] for i in self.feature_indices]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        features = self.body(pixel_values)
        return [features[i] for i in self.feature_indices]


class SADExtraLevels(nn.Module):
    """Levels above the backbone's coarsest: stride-2 3x3 convolutions, ReLU between them (RetinaNet's P6/P7)."""

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.convs = nn.ModuleList(SADConv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_levels))

    def forward(self, top: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, conv in enumerate(self.convs):
            top = conv(F.relu(top) if i > 0 else top)
            outputs.append(top)
        return outputs


class SADFeaturePyramid(nn.Module):
    """FPN (lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs) over a hierarchical backbone."""

    def __init__(self, in_channels: list[int], channels: int, num_extra_levels: int):
        super().__init__()
        self.lateral = nn.ModuleList(SADConv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(SADConv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.extra = SADExtraLevels(channels, num_extra_levels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        outputs = [conv(x) for conv, x in zip(self.output, laterals)]
        return outputs + self.extra(outputs[-1])


class SADSimpleFeaturePyramid(nn.Module):
    """ViTDet-style pyramid from one feature map: 2x transposed convs up, identity, or 2x max-pool down per level."""

    def __init__(self, in_channels: int, in_level: int, levels: list[int], channels: int, num_extra_levels: int):
        super().__init__()
        self.stages = nn.ModuleList()
        for level in levels:
            layers: list[nn.Module] = []
            width = in_channels
            for step in range(in_level - level):
                if step > 0:
                    layers.append(nn.GELU())
                layers.append(nn.ConvTranspose2d(width, max(width // 2, channels // 2), 2, stride=2))
                width = max(width // 2, channels // 2)
            if level == in_level + 1:
                layers.append(nn.MaxPool2d(2))
            layers += [SADConv2d(width, channels, 1), SADConv2d(channels, channels, 3, padding=1)]
            self.stages.append(nn.Sequential(*layers))
        self.extra = SADExtraLevels(channels, num_extra_levels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = [stage(features[-1]) for stage in self.stages]
        return outputs + self.extra(outputs[-1])


class SADHead(nn.Module):
    """A RetinaNet subnet shared across levels: `num_convs` x (3x3 conv + ReLU), then a 3x3 conv to A * K outputs."""

    def __init__(
        self, in_channels: int, channels: int, num_convs: int, num_anchors: int, out_per_anchor: int,
        predictor_bias: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_convs):
            conv = SADConv2d(in_channels if i == 0 else channels, channels, 3, padding=1, init_std=0.01)
            layers += [conv, nn.ReLU(inplace=True)]
        self.tower = nn.Sequential(*layers)
        self.predictor = SADConv2d(
            channels if num_convs else in_channels, num_anchors * out_per_anchor, 3, padding=1,
            init_std=0.01, init_bias=predictor_bias,
        )
        self.out_per_anchor = out_per_anchor

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Returns (B, N, K): per level (B, A*K, H, W) -> (B, H*W*A, K), levels concatenated (anchor order)."""
        outputs = []
        for x in features:
            x = self.predictor(self.tower(x))
            batch, _, height, width = x.shape
            x = x.view(batch, -1, self.out_per_anchor, height, width).permute(0, 3, 4, 1, 2)
            outputs.append(x.reshape(batch, -1, self.out_per_anchor))
        return torch.cat(outputs, dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# transformers model
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SADObjectDetectionOutput(ModelOutput):
    """Output of [`SADForObjectDetection`].

    Attributes:
        loss: scalar supervised loss (focal + weighted box loss), when `labels` were given.
        loss_dict: `{"loss_cls", "loss_box", "num_positives"}` (detached scalars), when `labels` were given.
        logits: (B, N, C) raw sigmoid classification logits over all anchors of all levels.
        pred_boxes: (B, N, 4) predicted boxes, normalised cx, cy, w, h relative to each image's valid (unpadded) size.
        box_regression: (B, N, 4) raw box deltas (dx, dy, dw, dh) relative to `anchors`.
        anchors: (N, 4) xyxy absolute pixel anchors on the padded input, shared by the batch.
        spatial_shapes: (L, 2) int64 (height, width) of each pyramid level's feature map.
        image_sizes: (B, 2) float (height, width) in pixels of each image's valid region.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    box_regression: torch.FloatTensor | None = None
    anchors: torch.FloatTensor | None = None
    spatial_shapes: torch.LongTensor | None = None
    image_sizes: torch.FloatTensor | None = None


class SADPreTrainedModel(PreTrainedModel):
    config_class = SADConfig
    base_model_prefix = "sad"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # The Trainer must not hand `num_items_in_batch` to forward: the loss is a per-batch mean over positive anchors.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The timm backbone initialised itself in its constructor (or is loaded from a checkpoint); only its
        # non-persistent buffers must be rebuilt after meta-device construction.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        elif isinstance(module, SADConv2d):
            if module.init_std is None:
                init.kaiming_uniform_(module.weight, a=1)
            else:
                init.normal_(module.weight, std=module.init_std)
            init.constant_(module.bias, module.init_bias)


class SADForObjectDetection(SADPreTrainedModel):
    """RetinaNet-style detector: timm backbone -> feature pyramid -> shared classification and box heads.

    Trained with the sigmoid focal loss and a smooth-L1 or GIoU box loss; distilled by `hf_sad.SADTrainer`.
    """

    def __init__(self, config: SADConfig):
        super().__init__(config)
        self.backbone = SADBackbone(config)
        if self.backbone.is_plain:
            in_level = self.backbone.levels[0]
            own_levels = list(range(config.min_level, min(config.max_level, in_level + 1) + 1))
            self.pyramid = SADSimpleFeaturePyramid(
                self.backbone.channels[0], in_level, own_levels, config.fpn_channels,
                config.max_level - own_levels[-1],
            )
        else:
            self.pyramid = SADFeaturePyramid(
                self.backbone.channels, config.fpn_channels, config.max_level - self.backbone.levels[-1]
            )
        num_anchors = config.num_anchors_per_location
        args = (config.fpn_channels, config.head_channels, config.head_num_convs, num_anchors)
        # The classification head starts at the prior foreground probability, so the early focal loss is not
        # swamped by the ~100k easy negatives.
        prior_bias = -math.log((1 - config.prior_prob) / config.prior_prob)
        self.class_head = SADHead(*args, out_per_anchor=config.num_labels, predictor_bias=prior_bias)
        self.box_head = SADHead(*args, out_per_anchor=4)

        self.strides = [2**level for level in range(config.min_level, config.max_level + 1)]
        self._anchor_cache: dict[tuple, torch.Tensor] = {}
        self.post_init()

    def anchors_for(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """(N, 4) xyxy absolute pixel anchors for pyramid feature maps of the given sizes (cached)."""
        key = (tuple(spatial_shapes), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 16:  # multi-scale training: keep the cache small
                self._anchor_cache.clear()
            # Built here, not in __init__: from_pretrained constructs the model on the meta device.
            scales = [2 ** (i / self.config.scales_per_octave) for i in range(self.config.scales_per_octave)]
            ratios = self.config.aspect_ratios
            cells = [make_cell_anchors(self.config.anchor_scale * s, scales, ratios) for s in self.strides]
            self._anchor_cache[key] = make_anchors(spatial_shapes, self.strides, cells, device)
        return self._anchor_cache[key]

    def assign_anchors(
        self, anchors: torch.Tensor, labels: list[dict[str, torch.Tensor]], image_sizes: torch.Tensor
    ) -> AnchorAssignment:
        """Match anchors to the boxes of `labels` (the transformers detection format, normalised cxcywh).

        Used for the supervised loss and by distillation to mask anchors in the ignore band, for ground-truth and
        pseudo boxes alike.
        """
        return match_anchors(
            anchors,
            [_absolute_xyxy(t["boxes"], size) for t, size in zip(labels, image_sizes)],
            self.config.fg_iou_threshold,
            self.config.bg_iou_threshold,
            self.config.allow_low_quality_matches,
        )

    def detection_loss(
        self,
        logits: torch.Tensor,
        box_regression: torch.Tensor,
        anchors: torch.Tensor,
        labels: list[dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], AnchorAssignment]:
        """Sigmoid focal loss + box loss, each summed and divided by the number of positive anchors.

        Args:
            logits: (B, N, C) classification logits.
            box_regression: (B, N, 4) predicted deltas.
            anchors: (N, 4) xyxy absolute pixels.
            labels: per image `{"class_labels": (M,) int64, "boxes": (M, 4) normalised cxcywh}`.
            image_sizes: (B, 2) valid (height, width) of each image in pixels.

        Returns:
            The loss, `{"loss_cls", "loss_box", "num_positives"}` detached, and the anchor assignment.
        """
        _check_labels(labels, self.config.num_labels)
        assignment = self.assign_anchors(anchors, labels, image_sizes)
        positive = assignment.labels == 1
        num_positives = _num_positives(assignment, self.config.sync_num_positives)

        _, padded_classes = pad_boxes([t["boxes"] for t in labels], [t["class_labels"].long() for t in labels])
        matched_classes = padded_classes.gather(1, assignment.matched_idx)
        logits = logits.float()
        cls_targets = torch.zeros_like(logits)
        cls_targets[positive] = F.one_hot(matched_classes[positive], logits.shape[-1]).to(logits.dtype)
        focal = sigmoid_focal_loss(
            logits, cls_targets, alpha=self.config.focal_alpha, gamma=self.config.focal_gamma, reduction="none"
        )
        loss_cls = (focal * (assignment.labels >= 0).unsqueeze(-1)).sum() / num_positives
        loss_box = self.box_loss(box_regression, anchors, labels, image_sizes, assignment, num_positives)

        loss = loss_cls + self.config.box_loss_weight * loss_box
        loss_dict = {"loss_cls": loss_cls.detach(), "loss_box": loss_box.detach(), "num_positives": num_positives}
        return loss, loss_dict, assignment

    def box_loss(
        self,
        box_regression: torch.Tensor,
        anchors: torch.Tensor,
        labels: list[dict[str, torch.Tensor]],
        image_sizes: torch.Tensor,
        assignment: AnchorAssignment,
        num_positives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Box loss of the positive anchors of `assignment` against their matched boxes, summed and divided by
        `num_positives` (default: the batch's positives). Arguments as in `detection_loss`; `assignment` comes from
        `assign_anchors`."""
        gt_boxes = [_absolute_xyxy(t["boxes"], size) for t, size in zip(labels, image_sizes)]
        padded_boxes, _ = pad_boxes(gt_boxes, [t["class_labels"].long() for t in labels])
        batch_idx, anchor_idx = (assignment.labels == 1).nonzero(as_tuple=True)
        matched_boxes = padded_boxes[batch_idx, assignment.matched_idx[batch_idx, anchor_idx]]
        pos_anchors, pos_deltas = anchors[anchor_idx], box_regression[batch_idx, anchor_idx].float()
        if self.config.box_loss == "giou":
            loss_box = generalized_box_iou_loss(decode_boxes(pos_deltas, pos_anchors), matched_boxes, reduction="sum")
        else:
            target = encode_boxes(matched_boxes, pos_anchors)
            loss_box = F.smooth_l1_loss(pos_deltas, target, beta=self.config.smooth_l1_beta, reduction="sum")
        if num_positives is None:
            num_positives = _num_positives(assignment, self.config.sync_num_positives)
        return loss_box / num_positives

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
    ) -> SADObjectDetectionOutput:
        r"""
        Args:
            pixel_values: (B, 3, H, W) normalised images, padded bottom/right (see `SADImageProcessor`).
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding. Without it every pixel is real.
            labels: per image `{"class_labels": (M,) int64, "boxes": (M, 4) float}` with boxes normalised cx, cy, w, h
                relative to the image's valid region. An image with no boxes is a valid negative.
        """
        pyramid = self.pyramid(self.backbone(pixel_values))
        logits = self.class_head(pyramid)
        box_regression = self.box_head(pyramid)

        spatial_shapes = [tuple(f.shape[-2:]) for f in pyramid]
        anchors = self.anchors_for(spatial_shapes, pixel_values.device)
        image_sizes = _valid_sizes(pixel_values, pixel_mask)
        boxes = box_convert(decode_boxes(box_regression.float(), anchors), "xyxy", "cxcywh")
        pred_boxes = boxes / image_sizes.flip(-1).repeat(1, 2)[:, None, :]

        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict, _ = self.detection_loss(logits, box_regression, anchors, labels, image_sizes)
        return SADObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            box_regression=box_regression,
            anchors=anchors,
            spatial_shapes=torch.tensor(spatial_shapes, dtype=torch.long, device=pixel_values.device),
            image_sizes=image_sizes,
        )


def _valid_sizes(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 2) float (height, width) of each image's unpadded region (padding is at the bottom/right)."""
    batch, _, height, width = pixel_values.shape
    if pixel_mask is None:
        return pixel_values.new_tensor([height, width], dtype=torch.float32).expand(batch, 2)
    heights = pixel_mask[:, :, 0].sum(dim=1)
    widths = pixel_mask[:, 0, :].sum(dim=1)
    return torch.stack([heights, widths], dim=1).float()


def _absolute_xyxy(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """(M, 4) normalised cxcywh -> (M, 4) xyxy absolute pixels, for an image of `size` = (height, width)."""
    scale = size.flip(-1).repeat(2).to(boxes.device)
    return box_convert(boxes.float() * scale, "cxcywh", "xyxy")


def _check_labels(labels: list[dict[str, torch.Tensor]], num_labels: int) -> None:
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


def _num_positives(assignment: AnchorAssignment, sync: bool) -> torch.Tensor:
    """Positive anchors of the batch (averaged over processes when `sync`), at least 1: the losses' divisor."""
    return _mean_across_processes((assignment.labels == 1).sum().float(), sync).clamp(min=1.0)


def _mean_across_processes(value: torch.Tensor, enabled: bool) -> torch.Tensor:
    if enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


__all__ = [
    "AnchorAssignment",
    "SADForObjectDetection",
    "SADObjectDetectionOutput",
    "SADPreTrainedModel",
    "decode_boxes",
    "encode_boxes",
    "make_anchors",
    "make_cell_anchors",
    "match_anchors",
]
