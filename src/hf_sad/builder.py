"""Fresh detectors: a model and its matching image processor, optionally with pretrained timm backbone weights.

Pretrained backbone weights are loaded here and never in `SADForObjectDetection.__init__`, because `from_pretrained`
constructs the model on the meta device and must not download or overwrite anything.
"""

from __future__ import annotations

import timm

from .configuration_sad import SADConfig
from .image_processing_sad import SADImageProcessor
from .modeling_sad import SADForObjectDetection


def create_detector(
    backbone: str,
    id2label: dict[int, str],
    *,
    pretrained_backbone: bool = False,
    image_size: int | dict[str, int] = 512,
    **config_kwargs,
) -> tuple[SADForObjectDetection, SADImageProcessor]:
    """Build a new detector and the image processor that feeds it.

    Args:
        backbone: timm model name, e.g. `"resnet50"`, `"convnext_tiny"`, `"vit_small_patch16_224"`.
        id2label: class id (0..C-1) -> class name.
        pretrained_backbone: load timm's pretrained weights into the backbone (needs the Hub or timm's cache).
        image_size: an int is the shortest edge (longest edge capped at 5/3 of it); a dict is passed to the
            processor's `size` as is (e.g. `{"height": 320, "width": 320}`).
        **config_kwargs: any other `SADConfig` field (`fpn_channels`, `head_channels`, `min_level`, ...).

    Returns:
        `(model, image_processor)`; the processor normalises with the backbone's mean/std and holds the
        post-processing settings (`score_threshold`, `nms_iou_threshold`, `pre_nms_top_k`, `max_detections`).
    """
    id2label = {int(k): v for k, v in id2label.items()}
    config = SADConfig(
        backbone=backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **config_kwargs
    )
    model = SADForObjectDetection(config)
    if pretrained_backbone:
        load_pretrained_backbone(model)
    pretrained_cfg = model.backbone.body.pretrained_cfg
    size = image_size if isinstance(image_size, dict) else {
        "shortest_edge": image_size, "longest_edge": (image_size * 5) // 3
    }
    processor = SADImageProcessor(
        size=size,
        image_mean=list(pretrained_cfg.get("mean", SADImageProcessor.image_mean)),
        image_std=list(pretrained_cfg.get("std", SADImageProcessor.image_std)),
    )
    return model, processor


def load_pretrained_backbone(model: SADForObjectDetection) -> SADForObjectDetection:
    """Copy timm's pretrained weights (Hub or local timm cache) into `model.backbone` in place."""
    config = model.config
    source = timm.create_model(config.backbone, pretrained=True, features_only=True, **config.backbone_kwargs)
    model.backbone.body.load_state_dict(source.state_dict())
    return model
