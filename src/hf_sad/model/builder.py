"""Detectors to train: fresh ones (a model and its matching image processor, optionally starting from pretrained
weights) and saved ones (`load_detector`, with errors that say what is wrong).

Pretrained weights are loaded here and never in `SADForObjectDetection.__init__`, because `from_pretrained`
constructs the model on the meta device and must not download or overwrite anything. Two starts are offered: timm's
ImageNet weights for the backbone (`pretrained_backbone`, needs the Hub or timm's cache), or the backbone and
pyramid of a saved detector (`init_from`, any local checkpoint of a compatible network; its heads are not taken).
"""

from __future__ import annotations

from pathlib import Path

import timm
from safetensors.torch import load_file
from transformers import AutoModelForObjectDetection

from .configuration_sad import SADConfig
from .image_processing_sad import SADImageProcessor
from .modeling_sad import SADForObjectDetection

__all__ = ["create_detector", "load_detector"]

#: The parts of a detector that `init_from` copies: everything but the task-specific heads.
TRANSFERRED_PARTS = ("backbone.", "pyramid.")


def create_detector(
    backbone: str,
    id2label: dict[int, str],
    *,
    pretrained_backbone: bool = False,
    init_from: str | Path | None = None,
    image_size: int | dict[str, int] = 512,
    **config_kwargs,
) -> tuple[SADForObjectDetection, SADImageProcessor]:
    """Build a new detector and the image processor that feeds it.

    Args:
        backbone: timm model name, e.g. `"resnet50"`, `"convnext_tiny"`, `"vit_small_patch16_224"`.
        id2label: class id (0..C-1) -> class name.
        pretrained_backbone: load timm's pretrained weights into the backbone (needs the Hub or timm's cache).
        init_from: a saved detector (folder with `model.safetensors`) whose backbone and pyramid initialise this one;
            the heads start fresh, so the classes may differ. Its network must match (same backbone, widths, levels).
        image_size: an int is the shortest edge (longest edge capped at 5/3 of it); a dict is passed to the
            processor's `size` as is (e.g. `{"height": 320, "width": 320}`).
        **config_kwargs: any other `SADConfig` field (`fpn_channels`, `head_channels`, `min_level`, ...).
            `freeze_batchnorm` defaults to True with a pretrained or `init_from` start (statistics learned on
            large batches are kept rather than re-estimated from small ones), else False.

    Returns:
        `(model, image_processor)`; the processor normalises with the backbone's mean/std and holds the
        post-processing settings (`score_threshold`, `nms_iou_threshold`, `pre_nms_top_k`, `max_detections`).
    """
    if pretrained_backbone and init_from is not None:
        raise ValueError("Pass either pretrained_backbone=True or init_from, not both: they both set the backbone.")
    id2label = {int(k): v for k, v in id2label.items()}
    config_kwargs.setdefault("freeze_batchnorm", bool(pretrained_backbone or init_from))
    config = SADConfig(
        backbone=backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **config_kwargs
    )
    model = SADForObjectDetection(config)
    if pretrained_backbone:
        load_pretrained_backbone(model)
    if init_from is not None:
        load_backbone_and_pyramid(model, init_from)
    pretrained_cfg = model.backbone.body.pretrained_cfg
    size = image_size if isinstance(image_size, dict) else {
        "shortest_edge": image_size, "longest_edge": (image_size * 5) // 3
    }
    processor = SADImageProcessor(
        size=size,
        # What the network needs: the stride of the backbone's coarsest map (the levels above it round up).
        pad_size_divisor=2 ** max(model.backbone.levels),
        image_mean=list(pretrained_cfg.get("mean", SADImageProcessor.image_mean)),
        image_std=list(pretrained_cfg.get("std", SADImageProcessor.image_std)),
    )
    return model, processor


def load_pretrained_backbone(model: SADForObjectDetection) -> SADForObjectDetection:
    """Copy timm's pretrained weights (Hub or local timm cache) into `model.backbone` in place."""
    config = model.config
    try:
        source = timm.create_model(config.backbone, pretrained=True, features_only=True, **config.backbone_kwargs)
    except (OSError, RuntimeError) as error:  # no network and not in timm's cache; no weights for this name
        raise ValueError(
            f"Could not load timm's pretrained weights for {config.backbone!r} (they come from the Hugging Face Hub "
            f"or timm's cache): {type(error).__name__}: {error}. Train from scratch (no --pretrained_backbone) or "
            "start from a saved detector with --init_from."
        ) from error
    target = model.backbone.body.state_dict()
    # Frozen BatchNorm layers keep no `num_batches_tracked`; every other tensor must be there.
    weights = {k: v for k, v in source.state_dict().items() if k in target or not k.endswith("num_batches_tracked")}
    model.backbone.body.load_state_dict(weights)
    return model


def load_backbone_and_pyramid(model: SADForObjectDetection, checkpoint: str | Path) -> SADForObjectDetection:
    """Copy the backbone and pyramid of the detector saved in `checkpoint` into `model`, in place.

    Raises FileNotFoundError without `model.safetensors` there, and ValueError, listing them, when tensors of these
    parts are missing or have other shapes (another backbone or width).
    """
    weights_file = Path(checkpoint) / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"init_from: {weights_file} does not exist; pass the folder of a saved detector.")
    saved = {k: v for k, v in load_file(str(weights_file)).items() if k.startswith(TRANSFERRED_PARTS)}
    target = {k: v for k, v in model.state_dict().items() if k.startswith(TRANSFERRED_PARTS)}
    # Frozen BatchNorm layers keep no `num_batches_tracked`: a checkpoint may have them or not.
    saved = {k: v for k, v in saved.items() if k in target or not k.endswith("num_batches_tracked")}
    missing = [k for k in target if k not in saved and not k.endswith("num_batches_tracked")]
    wrong = [f"{k}: {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
             if k in saved and saved[k].shape != v.shape]
    unexpected = [k for k in saved if k not in target]
    if missing or wrong or unexpected:
        problems = [f"{len(missing)} missing (e.g. {missing[:3]})"] * bool(missing)
        problems += [f"{len(wrong)} of other shapes (e.g. {wrong[:3]})"] * bool(wrong)
        problems += [f"{len(unexpected)} unknown (e.g. {unexpected[:3]})"] * bool(unexpected)
        raise ValueError(
            f"init_from {checkpoint}: its backbone/pyramid do not fit this detector ({model.config.backbone}, "
            f"fpn_channels={model.config.fpn_channels}): tensors {'; '.join(problems)}."
        )
    model.load_state_dict(saved, strict=False)
    return model


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
