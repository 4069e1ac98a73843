"""SAD detector: a RetinaNet-style single-stage detector on any timm backbone, as a transformers model.

timm backbone -> feature pyramid P`min_level`..P`max_level` -> shared classification and box heads. Anchors, box
coding and matching live in `box_ops.py`, the supervised loss in `detection_loss.py`. Anchors are computed in `forward`
(cached per feature size) rather than stored as buffers, so that `from_pretrained`'s meta-device construction never
leaves them uninitialised.

This file is copied next to saved weights for `trust_remote_code` loading: it imports only torch, torchvision, timm,
transformers and its flat siblings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.ops import box_convert
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .box_ops import decode_boxes, make_anchors, make_cell_anchors
from .configuration_sad import SADConfig
from .detection_loss import detection_loss

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
        if config.freeze_batchnorm:
            self.body = freeze_batch_norm_2d(self.body)
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

    def detections(self) -> SADObjectDetectionOutput:
        """What post-processing turns into detections (`logits` and `pred_boxes`): this output itself. A teacher that
        predicts its own set of boxes (`hf_sad.teachers`) gives that set instead."""
        return self


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
        if torch.compiler.is_compiling():  # traced shapes may be symbolic: the anchors become part of the graph
            return self._make_anchors(spatial_shapes, device)
        key = (tuple(spatial_shapes), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 16:  # multi-scale training: keep the cache small
                self._anchor_cache.clear()
            self._anchor_cache[key] = self._make_anchors(spatial_shapes, device)
        return self._anchor_cache[key]

    def _make_anchors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        # Built on demand, not in __init__: from_pretrained constructs the model on the meta device.
        scales = [2 ** (i / self.config.scales_per_octave) for i in range(self.config.scales_per_octave)]
        cells = [make_cell_anchors(self.config.anchor_scale * s, scales, self.config.aspect_ratios)
                 for s in self.strides]
        return make_anchors(spatial_shapes, self.strides, cells, device)

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
    ) -> SADObjectDetectionOutput:
        r"""
        Args:
            pixel_values: (B, 3, H, W) normalised images, padded bottom/right (see `SADImageProcessor`).
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding. Without it, each image's valid region is the
                `size` of its labels when they have one (as `SADImageProcessor` writes them), else the whole input.
            labels: per image `{"class_labels": (M,) int64, "boxes": (M, 4) float}` with boxes normalised cx, cy, w, h
                relative to the image's valid region, and optionally `size` (2,) = its (height, width) in pixels
                before padding. An image with no boxes is a valid negative.
        """
        pyramid = self.pyramid(self.backbone(pixel_values))
        logits = self.class_head(pyramid)
        box_regression = self.box_head(pyramid)

        spatial_shapes = [tuple(f.shape[-2:]) for f in pyramid]
        anchors = self.anchors_for(spatial_shapes, pixel_values.device)
        return detection_outputs(
            logits, box_regression, anchors, valid_sizes(pixel_values, pixel_mask, labels), self.config, labels,
            spatial_shapes=torch.tensor(spatial_shapes, dtype=torch.long, device=pixel_values.device),
        )


def detection_outputs(
    logits: torch.Tensor,
    box_regression: torch.Tensor,
    anchors: torch.Tensor,
    image_sizes: torch.Tensor,
    config: SADConfig,
    labels: list[dict[str, torch.Tensor]] | None = None,
    output_class: type[SADObjectDetectionOutput] = SADObjectDetectionOutput,
    **fields,
) -> SADObjectDetectionOutput:
    """A detector's output (`output_class`, with any of its other `fields`) from its dense predictions: (B, N, C)
    `logits` and (B, N, 4) `box_regression` on (N, 4) xyxy `anchors`, for images whose valid regions are the (B, 2)
    (height, width) `image_sizes`; with `labels`, the supervised loss of `config`'s matching and losses. The model and
    every teacher (`hf_sad.teachers`) build their outputs here."""
    loss = loss_dict = None
    if labels is not None:
        loss, loss_dict, _ = detection_loss(logits, box_regression, anchors, labels, image_sizes, config)
    return output_class(
        loss=loss,
        loss_dict=loss_dict,
        logits=logits,
        pred_boxes=predicted_boxes(box_regression, anchors, image_sizes),
        box_regression=box_regression,
        anchors=anchors,
        image_sizes=image_sizes,
        **fields,
    )


def predicted_boxes(box_regression: torch.Tensor, anchors: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
    """(B, N, 4) float32 boxes, normalised cx, cy, w, h relative to each image's valid region, from (B, N, 4) deltas
    on (N, 4) xyxy absolute `anchors` and (B, 2) (height, width) `image_sizes` in pixels."""
    boxes = box_convert(decode_boxes(box_regression.float(), anchors), "xyxy", "cxcywh")
    return boxes / image_sizes.flip(-1).repeat(1, 2)[:, None, :]


def valid_sizes(
    pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, labels: list[dict[str, torch.Tensor]] | None = None
) -> torch.Tensor:
    """(B, 2) float (height, width) in pixels of each image's unpadded region (padding is at the bottom/right).

    From `pixel_mask` when given; else from the labels' `size` (the processor's size before padding), so that boxes
    and training targets are the same whether or not a caller drops the mask (as transformers' object-detection
    example does); else the whole input.
    """
    batch, _, height, width = pixel_values.shape
    if pixel_mask is not None:
        heights = pixel_mask[:, :, 0].sum(dim=1)
        widths = pixel_mask[:, 0, :].sum(dim=1)
        return torch.stack([heights, widths], dim=1).float()
    if labels is not None and all("size" in target for target in labels):
        return torch.stack([torch.as_tensor(t["size"], device=pixel_values.device) for t in labels]).float()
    return pixel_values.new_tensor([height, width], dtype=torch.float32).expand(batch, 2)


__all__ = ["SADForObjectDetection", "SADObjectDetectionOutput", "SADPreTrainedModel", "detection_outputs"]
