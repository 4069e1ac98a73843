# Copyright 2025 The hf-sad authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor of the SAD detector: resize, normalise and pad images, convert COCO annotations, post-process.

This file is copied next to saved weights and loaded with `trust_remote_code=True` where `hf_sad` is not installed, so
it imports only torch, torchvision, numpy, PIL, transformers and its flat sibling `box_ops`.
"""

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torchvision.ops import box_convert
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio, group_images_by_shape, reorder_images
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageInput,
    PILImageResampling,
    SizeDict,
    get_image_size_for_max_height_width,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

from .box_ops import select_detections

logger = logging.get_logger(__name__)

__all__ = ["SADImageProcessor"]

# Mutation testing (`make mutation`) covers this file's post-processing only, from the end of this range.
# pragma: no mutate start


class SADImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    pad_size_divisor (`int`, *optional*, defaults to `self.pad_size_divisor`):
        When padding, the padded height and width are rounded up to a multiple of this (the stride of the
        backbone's coarsest feature map, what the network needs). Ignored when `pad_size` is given.
    do_convert_annotations (`bool`, *optional*, defaults to `self.do_convert_annotations`):
        Whether to return `labels["boxes"]` as normalised cx,cy,w,h (relative to the image's own extent) instead of
        absolute x1,y1,x2,y2 in resized pixels.
    """

    pad_size_divisor: int | None
    do_convert_annotations: bool | None


def get_resize_output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """
    Output `(height, width)` of resizing an image of `(height, width)` with `size`.

    Supported `size` keys: `{"height", "width"}` (fixed, aspect ratio not kept), `{"shortest_edge", "longest_edge"}`
    (shortest edge to `shortest_edge` unless that makes the longest edge exceed `longest_edge`, in which case the
    longest edge becomes `longest_edge`), `{"longest_edge"}`, `{"shortest_edge"}`, `{"max_height", "max_width"}`.
    """
    if size.height and size.width:
        return size.height, size.width
    # Every side at least 1 pixel: transformers' helpers round the short side of extreme shapes (1 x 2000) to 0.
    if size.shortest_edge and size.longest_edge:
        new_height, new_width = get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
        return max(1, new_height), max(1, new_width)
    if size.max_height and size.max_width:
        new_height, new_width = get_image_size_for_max_height_width((height, width), size.max_height, size.max_width)
        return max(1, new_height), max(1, new_width)
    if size.longest_edge:
        scale = size.longest_edge / max(height, width)
    elif size.shortest_edge:
        scale = size.shortest_edge / min(height, width)
    else:
        raise ValueError(
            "`size` must contain {'height', 'width'}, {'shortest_edge', 'longest_edge'}, {'longest_edge'}, "
            f"{{'shortest_edge'}} or {{'max_height', 'max_width'}}; got {dict(size)}."
        )
    return max(1, round(height * scale)), max(1, round(width * scale))


def _ceil_to_multiple(value: int, divisor: int | None) -> int:
    if not divisor:
        return value
    return math.ceil(value / divisor) * divisor


def _add_channel_axis(image: Any) -> Any:
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2:
        return image[None]
    return image


def _to_int(value: Any, image_id: Any, field: str) -> int:
    """`int(value)` for integral numbers (Python, NumPy or 0-d tensors); a ValueError naming `image_id` otherwise."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
        # Integral floats such as 3.0 (JSON round trips) are accepted too.
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = math.nan
        if as_float.is_integer():
            return int(as_float)
    raise ValueError(f"Annotation of image_id={image_id}: `{field}` must be an integer, got {value!r}.")


def _parse_coco_objects(objects: Any, image_id: Any) -> tuple[list[list[float]], list[int], list[float], list[int]]:
    """
    Validate the COCO objects of one image and split them into columns.

    Returns:
        `(bboxes, category_ids, areas, iscrowd)`: bboxes as `[x, y, w, h]` absolute pixels, area NaN where the
        annotation gives none (computed later from the clipped box).
    """
    if not isinstance(objects, Sequence) or isinstance(objects, (str, bytes)):
        # ValueError, not TypeError: every malformed annotation raises the same exception type for callers.
        raise ValueError(  # noqa: TRY004
            f"Annotation of image_id={image_id}: `annotations` must be a list, got {type(objects)}."
        )
    bboxes, category_ids, areas, iscrowd = [], [], [], []
    for index, obj in enumerate(objects):
        where = f"annotations[{index}]"
        if not isinstance(obj, Mapping):
            raise ValueError(f"Annotation of image_id={image_id}: {where} must be a dict, got {type(obj)}.")  # noqa: TRY004
        for key in ("bbox", "category_id"):
            if key not in obj:
                raise ValueError(f"Annotation of image_id={image_id}: {where} is missing the field '{key}'.")
        bbox = obj["bbox"]
        if isinstance(bbox, (str, bytes)) or not hasattr(bbox, "__len__") or len(bbox) != 4:
            raise ValueError(
                f"Annotation of image_id={image_id}: {where}['bbox'] must be [x, y, w, h] (4 numbers), got {bbox!r}."
            )
        try:
            bboxes.append([float(v) for v in bbox])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Annotation of image_id={image_id}: {where}['bbox'] must hold numbers, got {bbox!r}."
            ) from error
        category_ids.append(_to_int(obj["category_id"], image_id, f"{where}['category_id']"))
        areas.append(float(obj["area"]) if obj.get("area") is not None else math.nan)
        iscrowd.append(_to_int(obj.get("iscrowd", 0), image_id, f"{where}['iscrowd']"))
    return bboxes, category_ids, areas, iscrowd


def prepare_coco_detection_target(
    annotation: Mapping[str, Any], image_size: tuple[int, int], device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """
    Convert one image's COCO detection annotation into tensors, in the coordinates of the input image.

    Args:
        annotation (`Mapping`):
            `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int, "area"?: float,
            "iscrowd"?: int}, ...]}` with bboxes in absolute pixels of the input image.
        image_size (`tuple[int, int]`):
            `(height, width)` of the input image.

    Returns:
        `dict[str, torch.Tensor]`: `image_id` int64 scalar, `class_labels` int64 `(n,)`, `boxes` float64 `(n, 4)`
        absolute x1,y1,x2,y2 clipped to the image, `area` float64 `(n,)` in input pixels, `iscrowd` int64 `(n,)`,
        `orig_size` int64 `(2,)` = `(height, width)`. Boxes with zero area after clipping are dropped.
    """
    if not isinstance(annotation, Mapping) or "annotations" not in annotation or "image_id" not in annotation:
        raise ValueError(
            "Each annotation must be a dict {'image_id': int, 'annotations': [{'bbox': [x, y, w, h], "
            f"'category_id': int}}, ...]}} (COCO detection format); got {annotation!r:.200}."
        )
    image_id = annotation["image_id"]
    bboxes, category_ids, areas, iscrowd = _parse_coco_objects(annotation["annotations"], image_id)
    height, width = image_size

    # float64 so that the normalised boxes are the exactly rounded float32 of the true ratios.
    boxes = torch.tensor(bboxes, dtype=torch.float64, device=device).reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    if not finite.all():
        index = int((~finite).nonzero()[0])
        raise ValueError(
            f"Annotation of image_id={image_id}: annotations[{index}]['bbox'] has a NaN or infinite coordinate: "
            f"{bboxes[index]}."
        )
    area = torch.tensor(areas, dtype=torch.float64, device=device)
    if not torch.isfinite(area[~area.isnan()]).all():
        raise ValueError(f"Annotation of image_id={image_id}: an 'area' is infinite.")

    boxes = box_convert(boxes, "xywh", "xyxy")
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        logger.warning_once(
            "Some annotation boxes have zero area once clipped to their image (outside the image, or width/height "
            "<= 0); they are dropped."
        )
    clipped_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = torch.where(area.isnan(), clipped_area, area)

    return {
        "image_id": torch.tensor(_to_int(image_id, image_id, "image_id"), dtype=torch.int64, device=device),
        "class_labels": torch.tensor(category_ids, dtype=torch.int64, device=device)[keep],
        "boxes": boxes[keep],
        "area": area[keep],
        "iscrowd": torch.tensor(iscrowd, dtype=torch.int64, device=device)[keep],
        "orig_size": torch.tensor([height, width], dtype=torch.int64, device=device),
    }


def finalize_target(
    target: dict[str, torch.Tensor], resized_size: tuple[int, int], do_convert_annotations: bool
) -> dict[str, torch.Tensor]:
    """
    Express a target of [`prepare_coco_detection_target`] for the resized image; see [`SADImageProcessor`] for the
    returned fields.
    """
    orig_height, orig_width = target["orig_size"].tolist()
    new_height, new_width = resized_size
    boxes = target["boxes"]
    if do_convert_annotations:
        # Relative to the image's own extent: the same before and after resizing, and unaffected by padding.
        scale = boxes.new_tensor([orig_width, orig_height, orig_width, orig_height])
        boxes = box_convert(boxes, "xyxy", "cxcywh") / scale
    else:
        boxes = boxes * boxes.new_tensor([new_width / orig_width, new_height / orig_height] * 2)
    area_scale = (new_height / orig_height) * (new_width / orig_width)
    return {
        "class_labels": target["class_labels"],
        "boxes": boxes.to(torch.float32),
        "image_id": target["image_id"],
        "orig_size": target["orig_size"],
        "size": torch.tensor(resized_size, dtype=torch.int64, device=boxes.device),
        "area": (target["area"] * area_scale).to(torch.float32),
        "iscrowd": target["iscrowd"],
    }


class SADImageProcessor(TorchvisionBackend):
    r"""
    Image processor of [`SADForObjectDetection`]: resizes, rescales, normalises and pads images into a batch, converts
    COCO detection annotations into training targets, and turns model outputs into detections.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the images.
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 512, "longest_edge": 853}`):
            Output size. `{"shortest_edge", "longest_edge"}`: aspect ratio kept, shortest edge to `shortest_edge`
            unless the longest edge would exceed `longest_edge`; `{"longest_edge"}`: aspect ratio kept, longest edge
            to `longest_edge`; `{"height", "width"}`: fixed size, aspect ratio not kept.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BILINEAR`):
            Resampling filter of the resize.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply pixel values by `rescale_factor`. Inputs (uint8 or float) are expected in [0, 255];
            pass `do_rescale=False` for float images already in [0, 1].
        rescale_factor (`float`, *optional*, defaults to `1 / 255`):
            Factor of the rescale.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise each channel with `image_mean` and `image_std`.
        image_mean (`list[float]`, *optional*, defaults to the ImageNet mean):
            Per-channel mean, in the rescaled range. The model builder passes the timm backbone's.
        image_std (`list[float]`, *optional*, defaults to the ImageNet std):
            Per-channel standard deviation, in the rescaled range.
        do_pad (`bool`, *optional*, defaults to `True`):
            Whether to pad images bottom/right with zeros to the largest height and width in the batch, rounded up to
            a multiple of `pad_size_divisor` (or to `pad_size` when given).
        pad_size_divisor (`int`, *optional*, defaults to 32):
            Padded sizes are multiples of this: what the network needs, the stride of the backbone's coarsest feature
            map (32 for a ResNet; `create_detector` sets the backbone's). Levels above it (P6, P7) round up.
        do_convert_annotations (`bool`, *optional*, defaults to `True`):
            Whether to return label boxes as normalised cx,cy,w,h instead of absolute x1,y1,x2,y2 in resized pixels.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert grayscale and RGBA inputs to RGB.
        score_threshold (`float`, *optional*, defaults to 0.05):
            Post-processing: minimum score of a detection when `post_process_object_detection(threshold=None)`.
        nms_iou_threshold (`float`, *optional*, defaults to 0.5):
            Post-processing: detections of the same class whose IoU exceeds this are suppressed.
        pre_nms_top_k (`int`, *optional*, defaults to 1000):
            Post-processing: number of highest-scoring (anchor, class) candidates per image that enter NMS.
        max_detections (`int`, *optional*, defaults to 100):
            Post-processing: maximum number of detections kept per image.

    Outputs of `__call__` / `preprocess` (a [`BatchFeature`]):
        - `pixel_values` float32 `(batch_size, 3, height, width)`: the processed, padded images.
        - `pixel_mask` int64 `(batch_size, height, width)`: 1 on real pixels, 0 on padding (bottom and right).
        - `labels` (only when `annotations` are given): one dict per image with `class_labels` int64 `(n,)` (the
          COCO `category_id`s), `boxes` float32 `(n, 4)` (normalised cx,cy,w,h relative to the image's own extent,
          so the same before and after resizing and padding), `image_id` int64 `()`, `orig_size` int64 `(2,)` =
          (height, width) of the input image, `size` int64 `(2,)` = (height, width) after resizing and before
          padding, `area` float32 `(n,)` in resized pixels, `iscrowd` int64 `(n,)`. Boxes are clipped to the image,
          boxes of zero area after clipping are dropped, crowd boxes are kept (flagged by `iscrowd`).
    """

    valid_kwargs = SADImageProcessorKwargs
    model_input_names: ClassVar[list[str]] = ["pixel_values", "pixel_mask"]

    do_resize = True
    size = SizeDict(shortest_edge=512, longest_edge=853)
    default_to_square = False
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_pad = True
    pad_size_divisor = 32
    do_convert_annotations = True
    do_convert_rgb = True

    score_threshold = 0.05
    nms_iou_threshold = 0.5
    pre_nms_top_k = 1000
    max_detections = 100

    def __init__(
        self,
        score_threshold: float = 0.05,
        nms_iou_threshold: float = 0.5,
        pre_nms_top_k: int = 1000,
        max_detections: int = 100,
        **kwargs: Unpack[SADImageProcessorKwargs],
    ) -> None:
        super().__init__(**kwargs)
        # Post-processing settings are not preprocessing kwargs; instance attributes so that they are saved.
        self.score_threshold = score_threshold
        self.nms_iou_threshold = nms_iou_threshold
        self.pre_nms_top_k = pre_nms_top_k
        self.max_detections = max_detections

    def preprocess(
        self,
        images: ImageInput,
        annotations: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
        return_tensors: str | TensorType | None = "pt",
        **kwargs: Unpack[SADImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Preprocess an image or a batch of images, and optionally their COCO detection annotations.

        Args:
            images (`ImageInput`):
                PIL images, NumPy arrays or torch tensors (HWC or CHW, uint8 or float in [0, 255]); a single image or
                a list.
            annotations (`dict` or `list[dict]`, *optional*):
                One COCO detection annotation per image: `{"image_id": int, "annotations": [{"bbox": [x, y, w, h]
                (absolute pixels of the input image), "category_id": int, "area"?: float, "iscrowd"?: int}, ...]}`.
            return_tensors (`str` or `TensorType`, *optional*, defaults to `"pt"`):
                Type of the returned arrays.
            kwargs:
                Overrides of the processor's attributes for this call (`size`, `do_pad`, ...).

        Returns:
            [`BatchFeature`]: `pixel_values`, `pixel_mask` and, with annotations, `labels`; see the class docstring.
        """
        return super().preprocess(images, annotations, return_tensors=return_tensors, **kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        # transformers wants a channel axis on arrays; give one to bare (height, width) grayscale arrays.
        images = self.fetch_images(images)
        if isinstance(images, (list, tuple)):
            images = [_add_channel_axis(image) for image in images]
        else:
            images = _add_channel_axis(images)
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)

    def resize(
        self,
        image: torch.Tensor,
        size: SizeDict,
        resample: "PILImageResampling | int | None" = None,
        **kwargs,
    ) -> torch.Tensor:
        """
        Resize `image` (`(..., channels, height, width)`) according to `size`; see [`get_resize_output_size`].
        """
        new_height, new_width = get_resize_output_size(*image.shape[-2:], size)
        return super().resize(image, SizeDict(height=new_height, width=new_width), resample=resample, **kwargs)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        annotations: Mapping[str, Any] | list[Mapping[str, Any]] | None,
        do_resize: bool,
        size: SizeDict,
        resample: "PILImageResampling | int | None",
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        do_pad: bool,
        pad_size: SizeDict | None,
        pad_size_divisor: int | None,
        do_convert_annotations: bool,
        disable_grouping: bool | None,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        """Process a list of channels-first image tensors (and their annotations) into a batch."""
        if not images:
            raise ValueError("No images were given: pass one image or a list of at least one.")
        targets = self._prepare_targets(images, annotations)
        if do_rescale and any(image.is_floating_point() and image.numel() and image.max() <= 1 for image in images):
            logger.warning_once(
                "A float image has all its values in [0, 1] but `do_rescale=True` divides it by 255 again. "
                "Pass `do_rescale=False` if the images are already rescaled."
            )

        # Same-shape images are processed as one stacked tensor (grouping is off by default on CPU, on for GPU).
        grouped, grouped_index = group_images_by_shape(images, disable_grouping=disable_grouping)
        for shape, stacked in grouped.items():
            if do_resize:
                stacked = self.resize(stacked, size=size, resample=resample)
            stacked = self.rescale_and_normalize(
                stacked, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            grouped[shape] = stacked.to(torch.float32)
        processed = reorder_images(grouped, grouped_index)
        resized_sizes = [tuple(image.shape[-2:]) for image in processed]

        pixel_values, pixel_mask = self._pad_batch(processed, do_pad, pad_size, pad_size_divisor, disable_grouping)
        encoded = BatchFeature({"pixel_values": pixel_values, "pixel_mask": pixel_mask}, tensor_type=return_tensors)
        if targets is not None:
            labels = [
                finalize_target(target, resized, do_convert_annotations)
                for target, resized in zip(targets, resized_sizes)
            ]
            if return_tensors is not None and TensorType(return_tensors) == TensorType.NUMPY:
                labels = [{key: value.cpu().numpy() for key, value in label.items()} for label in labels]
            encoded["labels"] = labels
        return encoded

    @staticmethod
    def _prepare_targets(
        images: list[torch.Tensor], annotations: Mapping[str, Any] | list[Mapping[str, Any]] | None
    ) -> list[dict[str, torch.Tensor]] | None:
        if annotations is None:
            return None
        if isinstance(annotations, Mapping):
            annotations = [annotations]
        if len(annotations) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(annotations)} annotations; give one per image.")
        return [
            prepare_coco_detection_target(annotation, tuple(image.shape[-2:]), device=image.device)
            for image, annotation in zip(images, annotations)
        ]

    def _pad_batch(
        self,
        images: list[torch.Tensor],
        do_pad: bool,
        pad_size: SizeDict | None,
        pad_size_divisor: int | None,
        disable_grouping: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack `(3, h, w)` images into `(B, 3, H, W)` pixel values and the `(B, H, W)` int64 mask of real pixels."""
        if not do_pad:
            if len({tuple(image.shape) for image in images}) > 1:
                raise ValueError(
                    "Images of different sizes cannot be batched with `do_pad=False`; use `do_pad=True` or a fixed "
                    "`size={'height': ..., 'width': ...}`."
                )
            pixel_values = torch.stack(images)
            pixel_mask = torch.ones(
                (len(images), *pixel_values.shape[-2:]), dtype=torch.int64, device=pixel_values.device
            )
            return pixel_values, pixel_mask
        if pad_size is None:
            max_height = max(image.shape[-2] for image in images)
            max_width = max(image.shape[-1] for image in images)
            pad_size = SizeDict(
                height=_ceil_to_multiple(max_height, pad_size_divisor),
                width=_ceil_to_multiple(max_width, pad_size_divisor),
            )
        padded, masks = self.pad(images, pad_size=pad_size, return_mask=True, disable_grouping=disable_grouping)
        return torch.stack(padded), torch.stack(masks)

    # pragma: no mutate end
    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float | None = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int | None = None,
        nms_iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """
        Turn raw model outputs into per-image detections: sigmoid scores, top-k candidates, class-wise NMS.

        Args:
            outputs (`SADObjectDetectionOutput`, or any object or mapping with `logits` and `pred_boxes`):
                Model outputs with `logits` `(batch_size, num_anchors, num_classes)` (raw sigmoid logits) and
                `pred_boxes` `(batch_size, num_anchors, 4)` (normalised cx,cy,w,h relative to each image's valid,
                unpadded region). A dataclass of its own with these two attributes works too, as in transformers'
                object-detection example.
            threshold (`float`, *optional*, defaults to 0.5):
                Minimum score of a detection (strictly greater), as in `pipeline("object-detection")`. `None` uses
                `self.score_threshold` (0.05 by default, the usual value for mAP evaluation).
            target_sizes (`torch.Tensor` or `list[tuple[int, int]]`, *optional*):
                `(height, width)` of each ORIGINAL image, `(batch_size, 2)`. Without it boxes stay normalised.
            top_k (`int`, *optional*):
                Candidates per image before NMS; defaults to `self.pre_nms_top_k`.
            nms_iou_threshold (`float`, *optional*):
                IoU above which same-class detections are suppressed; defaults to `self.nms_iou_threshold`.
            max_detections (`int`, *optional*):
                Detections kept per image; defaults to `self.max_detections`.

        Returns:
            `list[dict[str, torch.Tensor]]`: per image, sorted by decreasing score, `scores` float32 `(k,)`, `labels`
            int64 `(k,)` and `boxes` float32 `(k, 4)` x1,y1,x2,y2: absolute pixels clipped to `[0, width] x [0,
            height]` with `target_sizes`, else normalised and clipped to `[0, 1]`.
        """
        if isinstance(outputs, Mapping):
            logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        else:
            logits, pred_boxes = outputs.logits, outputs.pred_boxes
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(
                f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} images; give one (height, width) "
                "per image."
            )
        # fp32: sigmoid and box arithmetic of a bf16/fp16 model would round scores and coordinates coarsely.
        scores = logits.float().sigmoid()
        # Clipping to the image before NMS, as torchvision's RetinaNet does: boxes are then in [0, 1], which also keeps
        # clipping in pixels exact after scaling.
        boxes = box_convert(pred_boxes.float(), "cxcywh", "xyxy").clamp(0.0, 1.0)
        detections = select_detections(
            scores,
            boxes,
            score_threshold=self.score_threshold if threshold is None else threshold,
            nms_iou_threshold=self.nms_iou_threshold if nms_iou_threshold is None else nms_iou_threshold,
            pre_nms_top_k=self.pre_nms_top_k if top_k is None else top_k,
            max_detections=self.max_detections if max_detections is None else max_detections,
        )
        if target_sizes is not None:
            sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=boxes.device).reshape(-1, 2)
            for detection, (height, width) in zip(detections, sizes):
                detection["boxes"] = detection["boxes"] * torch.stack([width, height, width, height])
        return detections
