"""Configuration of the SAD detector: a RetinaNet-style single-stage detector on any timm backbone."""

from __future__ import annotations

from transformers import PreTrainedConfig

_BOX_LOSSES = ("smooth_l1", "giou")
_MOVED_TO_PROCESSOR = ("score_threshold", "nms_iou_threshold", "pre_nms_top_k", "max_detections")


class SADConfig(PreTrainedConfig):
    r"""
    Configuration of [`SADForObjectDetection`]: timm backbone -> feature pyramid (P`min_level`..P`max_level`) -> shared
    RetinaNet classification and box heads. `SADConfig(backbone="resnet18", id2label=..., label2id=...)` alone builds a
    working model. It describes the network and its training targets only; post-processing settings (score threshold,
    NMS, top-k, detections per image) belong to [`SADImageProcessor`].

    Args:
        backbone (`str`, *optional*, defaults to `"resnet18"`):
            Name of a timm model. Hierarchical CNNs (ResNet, ConvNeXt, EfficientNet, MobileNet, ...) are used through
            `features_only`; a plain ViT (all features at one stride) goes through a simple feature pyramid built from
            its last feature map.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"dynamic_img_size": True}` for a ViT).
        freeze_batchnorm (`bool`, *optional*, defaults to `False`):
            Turn the backbone's BatchNorm layers into frozen ones (timm's `FrozenBatchNorm2d`: fixed statistics and
            affine parameters, as Detectron's affine-channel layers), the usual choice for a pretrained backbone
            trained with small batches. `create_detector` turns it on for pretrained or `init_from` backbones.
        fpn_channels (`int`, *optional*, defaults to 256):
            Channels of every pyramid level.
        head_channels (`int`, *optional*, defaults to 256):
            Channels of the convolutions inside the classification and box heads.
        head_num_convs (`int`, *optional*, defaults to 4):
            Number of 3x3 conv + ReLU blocks before each head's output convolution.
        min_level (`int`, *optional*, defaults to 3):
            Finest pyramid level; level `l` has stride `2**l` pixels.
        max_level (`int`, *optional*, defaults to 7):
            Coarsest pyramid level. Levels the backbone does not provide are made by stride-2 convolutions.
        anchor_scale (`float`, *optional*, defaults to 4.0):
            Base anchor side of level `l` is `anchor_scale * 2**l` pixels.
        scales_per_octave (`int`, *optional*, defaults to 3):
            Anchor sizes per level: `base * 2**(i / scales_per_octave)` for `i` in `range(scales_per_octave)`.
        aspect_ratios (`list[float]`, *optional*, defaults to `[0.5, 1.0, 2.0]`):
            Anchor aspect ratios, height / width.
        fg_iou_threshold (`float`, *optional*, defaults to 0.5):
            Anchors with IoU >= this to a box are positives.
        bg_iou_threshold (`float`, *optional*, defaults to 0.4):
            Anchors with IoU < this to every box are negatives; those in between are ignored.
        allow_low_quality_matches (`bool`, *optional*, defaults to `True`):
            Also make each box's best-overlapping anchors positive, so that no box goes unmatched.
        low_quality_match_min_iou (`float`, *optional*, defaults to 0.0):
            Those best-overlap matches count only with at least this IoU: 0 keeps them all (torchvision); Detectron's
            RetinaNet resets the ones below `bg_iou_threshold` (0.4) to background. The default keeps them so that
            boxes too small or thin for any anchor still get a positive.
        crowd_ioa_threshold (`float`, *optional*, defaults to 0.7):
            An anchor (not a positive) whose area lies at least this much inside a crowd box (COCO `iscrowd: 1`) is
            ignored in training rather than taught background (Detectron's crowd filter uses 0.7 too).
        focal_alpha (`float`, *optional*, defaults to 0.25):
            Weight of positives in the sigmoid focal loss.
        focal_gamma (`float`, *optional*, defaults to 2.0):
            Focusing exponent of the sigmoid focal loss.
        box_loss (`str`, *optional*, defaults to `"smooth_l1"`):
            `"smooth_l1"` on the encoded box deltas, or `"giou"` on the decoded boxes.
        smooth_l1_beta (`float`, *optional*, defaults to 1/9):
            Transition point of the smooth-L1 loss (in box-delta units).
        box_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the box loss relative to the focal loss.
        sync_num_positives (`bool`, *optional*, defaults to `True`):
            Under torch.distributed, normalise the supervised losses by the number of positive anchors averaged across
            processes (so every process weighs a positive the same), instead of the local count.
        prior_prob (`float`, *optional*, defaults to 0.01):
            Initial foreground probability of the classification head (sets its bias).
    """

    model_type = "sad"

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict | None = None,
        freeze_batchnorm: bool = False,
        fpn_channels: int = 256,
        head_channels: int = 256,
        head_num_convs: int = 4,
        min_level: int = 3,
        max_level: int = 7,
        anchor_scale: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0),
        fg_iou_threshold: float = 0.5,
        bg_iou_threshold: float = 0.4,
        allow_low_quality_matches: bool = True,
        low_quality_match_min_iou: float = 0.0,
        crowd_ioa_threshold: float = 0.7,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        box_loss: str = "smooth_l1",
        smooth_l1_beta: float = 1.0 / 9.0,
        box_loss_weight: float = 1.0,
        sync_num_positives: bool = True,
        prior_prob: float = 0.01,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.freeze_batchnorm = freeze_batchnorm
        self.fpn_channels = fpn_channels
        self.head_channels = head_channels
        self.head_num_convs = head_num_convs
        self.min_level = min_level
        self.max_level = max_level
        self.anchor_scale = anchor_scale
        self.scales_per_octave = scales_per_octave
        self.aspect_ratios = [float(r) for r in aspect_ratios]
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.low_quality_match_min_iou = low_quality_match_min_iou
        self.crowd_ioa_threshold = crowd_ioa_threshold
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.box_loss_weight = box_loss_weight
        self.sync_num_positives = sync_num_positives
        self.prior_prob = prior_prob
        # Post-processing settings live in the image processor; configs saved before that move still carry them.
        for name in _MOVED_TO_PROCESSOR:
            kwargs.pop(name, None)
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_anchors_per_location(self) -> int:
        return self.scales_per_octave * len(self.aspect_ratios)

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    def _validate(self) -> None:
        def fail(field: str, value, expected: str) -> None:
            raise ValueError(f"SADConfig.{field}={value!r} is invalid: expected {expected}.")

        if not isinstance(self.backbone, str) or not self.backbone:
            fail("backbone", self.backbone, "a timm model name")
        if not 1 <= self.min_level <= self.max_level:
            fail("min_level/max_level", (self.min_level, self.max_level), "1 <= min_level <= max_level")
        for field in ("fpn_channels", "head_channels", "scales_per_octave"):
            if getattr(self, field) < 1:
                fail(field, getattr(self, field), "a positive integer")
        if self.head_num_convs < 0:
            fail("head_num_convs", self.head_num_convs, "a non-negative integer")
        if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios):
            fail("aspect_ratios", self.aspect_ratios, "a non-empty list of positive numbers")
        if self.anchor_scale <= 0:
            fail("anchor_scale", self.anchor_scale, "a positive number")
        if not 0 < self.bg_iou_threshold <= self.fg_iou_threshold <= 1:
            fail("bg_iou_threshold/fg_iou_threshold", (self.bg_iou_threshold, self.fg_iou_threshold),
                 "0 < bg_iou_threshold <= fg_iou_threshold <= 1")
        if not 0 <= self.low_quality_match_min_iou <= 1:
            fail("low_quality_match_min_iou", self.low_quality_match_min_iou, "an IoU in [0, 1]")
        if not 0 < self.crowd_ioa_threshold <= 1:
            fail("crowd_ioa_threshold", self.crowd_ioa_threshold, "a fraction in (0, 1]")
        if self.box_loss not in _BOX_LOSSES:
            fail("box_loss", self.box_loss, f"one of {_BOX_LOSSES}")
        if not 0 < self.prior_prob < 1:
            fail("prior_prob", self.prior_prob, "a probability strictly between 0 and 1")
        if not 0 <= self.focal_alpha <= 1 and self.focal_alpha != -1:
            fail("focal_alpha", self.focal_alpha, "a value in [0, 1] (or -1 to disable)")
        if self.focal_gamma < 0:
            fail("focal_gamma", self.focal_gamma, "a non-negative number")
        if self.id2label is not None and len(self.id2label) < 1:
            fail("id2label", self.id2label, "at least one class")


__all__ = ["SADConfig"]
