"""From dataset rows to model inputs: decode images, check and clean boxes, map categories, augment, collate.

`SADDataCollator` turns training-stream rows (`hf_sad.data.build_training_stream`) or plain labeled examples into
`pixel_values`, `pixel_mask` and `labels` through the image processor. Images are decoded here rather than by
`datasets`, so that one corrupt file in an unlabeled pool is counted and skipped instead of killing a DataLoader
worker; augmentation is seeded by each row's `sample_index`, so that a resumed run sees the pixels an uninterrupted
one would have seen.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..arguments import AugmentationArguments, DataMixArguments, RobustnessArguments
from ..model.image_processing_sad import SADImageProcessor, get_resize_output_size

logger = logging.getLogger(__name__)

#: The default augmentation (the collator's defaults are the arguments').
_AUGMENTATION = AugmentationArguments()
#: File suffixes read as images where a folder is searched for them.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

__all__ = [
    "IMAGE_SUFFIXES",
    "CollationStats",
    "SADDataCollator",
    "checked_box",
    "clean_boxes",
    "decode_image",
    "decode_image_with_scale",
    "image_name",
    "map_categories",
    "objects_as_columns",
]


def map_categories(
    categories: Sequence[int],
    mapping: Mapping[int, int] | None,
    id2label: Mapping[int, str] | None = None,
    where: str | None = None,
) -> list[int]:
    """Dataset category ids -> model label ids (identity without a mapping); an unknown id is an error naming it.

    With `id2label` (the model's labels) the error also lists the known labels, and ids outside them are refused even
    without a mapping; `where` (e.g. the image's path) is named in the error.
    """
    ids = [int(c) for c in categories]
    unknown = [c for c in ids if (mapping is not None and c not in mapping) or (
        mapping is None and id2label is not None and c not in id2label)]
    if unknown:
        known = f"the model's labels are {dict(id2label)}" if id2label is not None else "it is not in the label map"
        mapped = f"; dataset category id -> model label id: {dict(mapping)}" if mapping is not None else ""
        raise ValueError(
            f"{where + ': ' if where else ''}category id {unknown[0]} is not a known class: {known}{mapped}. Fix the "
            "annotation, or build the model with the dataset's classes (id2label)."
        )
    return ids if mapping is None else [mapping[c] for c in ids]


def objects_as_columns(objects: Any, where: str = "an image") -> dict[str, list]:
    """One image's `objects` (a dict of lists, as `datasets` stores them, or a list of dicts) as checked columns:
    `{"bbox": [[x, y, w, h] floats], "category": [int], "iscrowd": [0/1], "area": [float]}` (`iscrowd` defaults to
    0; `area`, in pixels^2 of the image as stored, is NaN where the data gives none).

    COCO's `area` is the object's segmentation area, not its box's: COCO's evaluation sorts objects into small,
    medium and large by it, so evaluation keeps it.

    A missing or null `objects`, a missing field, a bbox that is not 4 finite numbers, a category that is not an
    integer, or an area that is not a finite number >= 0 is a ValueError naming `where` (the image) and the object's
    position.
    """
    if objects is None:
        raise ValueError(f"{where}: `objects` is null; an image without boxes needs empty `bbox` and `category` lists.")
    if isinstance(objects, Mapping):
        missing = [key for key in ("bbox", "category") if key not in objects or objects[key] is None]
        if missing:
            raise ValueError(f"{where}: `objects` lacks {missing}; expected `bbox` (COCO x, y, w, h) and `category`.")
        bboxes, categories = list(objects["bbox"]), list(objects["category"])
        crowd = list(objects["iscrowd"]) if objects.get("iscrowd") is not None else [0] * len(bboxes)
        area = list(objects["area"]) if objects.get("area") is not None else [None] * len(bboxes)
    else:
        rows = list(objects)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping) or "bbox" not in row or "category" not in row:
                raise ValueError(f"{where}: objects[{index}] = {row!r:.100} lacks `bbox` or `category`.")
        bboxes, categories = [r["bbox"] for r in rows], [r["category"] for r in rows]
        crowd = [r.get("iscrowd") or 0 for r in rows]
        area = [r.get("area") for r in rows]
    if not len(bboxes) == len(categories) == len(crowd) == len(area):
        raise ValueError(f"{where}: `objects` has {len(bboxes)} bbox, {len(categories)} category, {len(crowd)} "
                         f"iscrowd and {len(area)} area values; they must be equally many.")
    return {
        "bbox": [checked_box(box, f"{where}: objects[{i}]") for i, box in enumerate(bboxes)],
        "category": [_checked_int(c, f"{where}: objects[{i}] category") for i, c in enumerate(categories)],
        "iscrowd": [_checked_int(c, f"{where}: objects[{i}] iscrowd") for i, c in enumerate(crowd)],
        "area": [_checked_area(a, f"{where}: objects[{i}] area") for i, a in enumerate(area)],
    }


def checked_box(box: Any, where: str) -> list[float]:
    """A COCO box [x, y, w, h] as 4 floats; anything else (another length, non-numbers, NaN) is a ValueError naming
    `where`. Numeric strings ("12.5") are read as numbers."""
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h] (4 numbers), got {box!r}.")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: bbox must hold 4 numbers, got {box!r}.") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{where}: bbox {values} has a NaN or infinite coordinate. Fix or remove this box.")
    return values


def _checked_area(value: Any, where: str) -> float:
    """An object's area as a float (NaN for None or NaN: not given); anything else but a finite number >= 0 is a
    ValueError naming `where`."""
    if value is None:
        return math.nan
    try:
        area = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number of pixels, got {value!r}.") from None
    if math.isnan(area):
        return area
    if not math.isfinite(area) or area < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {value!r}.")
    return area


def _checked_int(value: Any, where: str) -> int:
    try:
        valid = not isinstance(value, (bool, str, bytes)) and float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        valid = False
    if not valid:
        raise ValueError(f"{where} must be an integer id, got {value!r}.")
    return int(value)



def decode_image(value: Any, *, min_size: Callable[[int, int], int] | None = None) -> Image.Image:
    """An RGB PIL image from a PIL image or a datasets `{"bytes", "path"}` dict, with EXIF orientation applied.

    Grayscale, RGBA, palette (with or without transparency), CMYK and 16-bit images are converted to RGB. Boxes of an
    EXIF-rotated image are expected in its displayed (rotated) orientation, as annotation tools show it.
    `min_size`: see `decode_image_with_scale` (reduced-scale decoding of large JPEGs).

    Raises `OSError`/`ValueError` (from PIL; other exception types are possible for malformed files) for undecodable
    data.
    """
    return decode_image_with_scale(value, min_size=min_size)[0]


def decode_image_with_scale(
    value: Any, *, min_size: Callable[[int, int], int] | None = None
) -> tuple[Image.Image, float]:
    """`decode_image`, and the factor from the image's full-resolution pixels to the returned image's pixels.

    `min_size(height, width)` (of the stored image) gives the smallest side the caller needs. A JPEG is then decoded
    by libjpeg at 1/2, 1/4 or 1/8 scale (`Image.draft`), as far as both sides stay at least that long, so that a
    8000x6000 photo never exists at full resolution in memory; the factor (1/2, ...) scales boxes given in
    full-resolution pixels. Other formats are decoded in full (factor 1.0).
    """
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            if not data:
                raise ValueError("empty image (0 bytes)")
            image = Image.open(io.BytesIO(data))
        elif path:
            image = Image.open(path)
        else:
            raise ValueError("no image: neither bytes nor a path")
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"Unsupported image value of type {type(value).__name__}.")
    factor = 1.0
    if min_size is not None:
        width, height = image.size
        side = max(1, int(min_size(height, width)))
        drafted = image.draft(None, (side, side))  # None for formats without reduced-scale decoding
        if drafted is not None:
            factor = drafted[1][2] / width
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit, 32-bit or float grayscale: scale to 8 bits rather than letting PIL clip to 0..255.
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(array / max(array.max(), 1.0) * 255, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when converting such a palette straight to RGB
    return image.convert("RGB"), factor


def image_name(value: Any) -> str:
    """The image's path (or file name) for messages, else a placeholder."""
    path = value.get("path") if isinstance(value, Mapping) else getattr(value, "filename", None)
    return repr(str(path)) if path else "(in-memory image)"


def _describe_row(row: Mapping, position: int) -> str:
    """Where a row comes from, for messages: its image path and its index in the stream or its image id."""
    name = image_name(row.get("image"))
    parts = [name] if name != "(in-memory image)" else []
    parts += [f"{key}={row[key]}" for key in ("sample_index", "image_id") if row.get(key) is not None]
    return " ".join(parts) or f"row {position} of the batch"


@dataclass
class CollationStats:
    """What one `SADDataCollator` met so far, in its own process (each DataLoader worker has a copy, invisible to the
    main process: `SADTrainer` counts from the batches' `num_skipped` / `num_dropped_boxes` instead)."""

    images_seen: int = 0
    images_skipped: int = 0
    boxes_dropped: int = 0
    skipped_examples: list[str] = dataclass_field(default_factory=list)

    def skipped(self, where: str) -> None:
        self.images_skipped += 1
        if len(self.skipped_examples) < 10:
            self.skipped_examples.append(where)


def clean_boxes(
    boxes: torch.Tensor, categories: list, width: int, height: int, where: str
) -> tuple[torch.Tensor, list, list[str]]:
    """Validate one image's COCO boxes (x, y, w, h pixels): returns (boxes, categories, descriptions of the dropped
    boxes as annotated).

    `categories` holds one value per box (a class id, or a tuple of per-box fields): those of the kept boxes return.

    A NaN or infinite coordinate is an error naming `where`. Boxes reaching outside the image are clipped to it; boxes
    with zero or negative width/height (degenerate or inverted), or entirely outside the image, are dropped. Duplicate
    boxes are kept. Boxes that need no clipping are returned unchanged (bit for bit).
    """
    finite = torch.isfinite(boxes).all(dim=1)
    if not finite.all():
        bad = boxes[~finite][0].tolist()
        raise ValueError(
            f"Annotation of image {where}: bbox {bad} has a NaN or infinite coordinate. Fix or remove this box."
        )
    corners = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    clipped = corners.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    # A zero or negative width or height leaves x2 <= x1 (or y2 <= y1), and clipping keeps that order.
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    dropped = [f"{where} bbox {[round(v, 2) for v in box]}" for box in boxes[~keep].tolist()]  # as annotated
    changed = (clipped != corners).any(dim=1, keepdim=True)
    boxes = torch.where(changed, torch.cat([clipped[:, :2], clipped[:, 2:] - clipped[:, :2]], dim=1), boxes)
    return boxes[keep], [c for c, k in zip(categories, keep.tolist()) if k], dropped


class SADDataCollator:
    """Turns rows (training-stream rows or plain labeled examples) into model inputs.

    Rows with a `sample_index` (training) get a horizontal flip with probability `hflip_prob` and a scale jitter: the
    processor's target size times a factor drawn from `scale_range`; both are drawn from a generator seeded by
    (`seed`, process, worker, `sample_index`), so augmentation never touches the global RNG. Boxes follow the pixels
    through `torchvision.transforms.v2.functional` with `tv_tensors.BoundingBoxes`. With `student_color_jitter` s > 0,
    the student's copy of each training image also gets brightness, contrast and saturation factors drawn from
    [1 - s, 1 + s] (same generator), and the batch carries the unjittered copies as `teacher_pixel_values`: geometry is
    shared, so anchors line up. Rows without `sample_index` (evaluation) are only resized by the processor.

    Returns a dict with `pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W), `labels` (one dict per row, normalised
    cxcywh boxes; empty for unlabeled rows) and `is_labeled` (B,) bool, plus `num_skipped` (0-d int64: rows dropped
    because their image could not be decoded), `skipped_examples` (their descriptions) and `num_dropped_boxes` (0-d
    int64). The counts travel in the batch so that the trainer sees them even when the collator runs in DataLoader
    workers; `stats` holds this process's totals.

    Bad inputs:
        - An image that cannot be decoded (corrupt, truncated, empty, not an image) is skipped with a warning naming
          it when unlabeled; when labeled it is an error naming it unless `skip_bad_labeled_images`. If every row of a
          batch is skipped, the batch is one black placeholder image with `empty_batch=True`, which `SADTrainer`
          turns into a zero loss (no update). Large training JPEGs are decoded at reduced scale (`decode_image`).
        - Boxes: NaN/inf is an error naming the image; boxes reaching outside the image are clipped; boxes of zero
          or negative width/height or entirely outside are dropped, counted and warned about once (with examples);
          category ids outside `id2label` (the model's labels, when given) are an error naming the id and the labels.
    """

    def __init__(
        self,
        processor: SADImageProcessor,
        *,
        hflip_prob: float = _AUGMENTATION.hflip_prob,
        scale_range: tuple[float, float] = tuple(_AUGMENTATION.scale_jitter),
        seed: int = 42,
        category_map: Mapping[int, int] | None = None,
        id2label: Mapping[int, str] | None = None,
        skip_bad_labeled_images: bool = RobustnessArguments.skip_bad_labeled_images,
        student_color_jitter: float = DataMixArguments.student_color_jitter,
    ):
        self.processor = processor
        self.student_color_jitter = student_color_jitter
        self.hflip_prob = hflip_prob
        self.scale_range = scale_range
        self.seed = seed
        self.category_map = category_map
        self.id2label = {int(k): v for k, v in id2label.items()} if id2label is not None else None
        self.skip_bad_labeled_images = skip_bad_labeled_images
        self.stats = CollationStats()
        self._warned_dropped_boxes = False

    def _draft_side(self, height: int, width: int) -> int:
        """Smallest side a training image must keep for the largest output of the scale jitter (either orientation)."""
        sizes = get_resize_output_size(height, width, self.processor.size), get_resize_output_size(
            width, height, self.processor.size
        )
        return math.ceil(max(max(size) for size in sizes) * max(self.scale_range))

    def _generator(self, sample_index: int) -> torch.Generator:
        worker = torch.utils.data.get_worker_info()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        key = np.random.SeedSequence([self.seed, rank, worker.id if worker else 0, int(sample_index)])
        return torch.Generator().manual_seed(int(key.generate_state(1, dtype=np.uint64)[0] >> 1))

    def _augment(
        self, image: Image.Image, boxes: torch.Tensor, sample_index: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(pixels, boxes) after the flip and scale jitter both networks see, and the student's pixels after its own
        photometric jitter (None when `student_color_jitter` is 0)."""
        generator = self._generator(sample_index)
        pixels = TF.to_image(image)
        height, width = pixels.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(height, width))
        if torch.rand((), generator=generator) < self.hflip_prob:
            pixels, boxes = TF.horizontal_flip(pixels), TF.horizontal_flip(boxes)
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand((), generator=generator).item()
        out_h, out_w = get_resize_output_size(height, width, self.processor.size)
        size = [max(1, round(out_h * scale)), max(1, round(out_w * scale))]
        pixels, boxes = TF.resize(pixels, size, antialias=True), TF.resize(boxes, size)
        student_pixels = None
        if self.student_color_jitter > 0:
            low, high = 1 - self.student_color_jitter, 1 + self.student_color_jitter
            brightness, contrast, saturation = (low + (high - low) * torch.rand(3, generator=generator)).tolist()
            student_pixels = TF.adjust_saturation(
                TF.adjust_contrast(TF.adjust_brightness(pixels, brightness), contrast), saturation
            )
        return pixels, boxes.as_subclass(torch.Tensor), student_pixels

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        training = "sample_index" in rows[0]
        images, annotations, is_labeled = [], [], []
        student_images = []  # with student_color_jitter: what the student sees (`images` then go to the teacher)
        skipped, dropped = [], []
        for i, row in enumerate(rows):
            labeled = bool(row.get("is_labeled", True))
            where = _describe_row(row, i)
            self.stats.images_seen += 1
            try:
                image, factor = decode_image_with_scale(row["image"], min_size=self._draft_side if training else None)
            except Exception as error:  # noqa: BLE001 - PIL raises many types for malformed files; all mean "undecodable"
                if labeled and not self.skip_bad_labeled_images:
                    raise ValueError(
                        f"Could not decode the labeled image {where}: {type(error).__name__}: {error}. Fix or remove "
                        "it, or pass --skip_bad_labeled_images (skip_bad_labeled_images=True) to skip undecodable "
                        "labeled images."
                    ) from error
                logger.warning("Skipping undecodable image %s: %s: %s", where, type(error).__name__, error)
                self.stats.skipped(where)
                skipped.append(where)
                continue
            empty_objects = {"bbox": [], "category": []}
            objects = objects_as_columns(row.get("objects", empty_objects) if labeled else empty_objects,
                                         f"Annotation of image {where}")
            categories = objects["category"]
            if not training:  # training-stream rows were mapped when the stream was built
                categories = map_categories(categories, self.category_map, self.id2label, where=f"image {where}")
            elif self.id2label is not None:
                map_categories(categories, None, self.id2label, where=f"image {where}")
            boxes = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
            if factor != 1.0:  # a large JPEG decoded at reduced scale
                boxes = boxes * factor
            # The data's areas count in evaluation only (COCO's area ranges); in training they would not follow the
            # augmentation, and nothing there reads them.
            areas = [math.nan] * len(categories) if training else objects["area"]
            per_box = list(zip(categories, objects["iscrowd"], areas))
            boxes, per_box, dropped_here = clean_boxes(boxes, per_box, image.width, image.height, where)
            dropped += dropped_here
            if training:
                image, boxes, student_image = self._augment(image, boxes, row["sample_index"])
                if student_image is not None:
                    student_images.append(student_image)
            image_id = int(row.get("sample_index", row.get("image_id", i)))
            annotations.append({
                "image_id": image_id,
                "annotations": [{"bbox": b.tolist(), "category_id": c, "iscrowd": crowd, "area": area}
                                for b, (c, crowd, area) in zip(boxes, per_box)],
            })
            images.append(image)
            is_labeled.append(labeled)
        if dropped:
            self.stats.boxes_dropped += len(dropped)
            if not self._warned_dropped_boxes:
                self._warned_dropped_boxes = True
                logger.warning(
                    "Dropped %d box(es) with zero or negative width/height, or lying entirely outside their image: %s. "
                    "Such boxes are dropped and counted (dropped_boxes in the training logs) without further warnings.",
                    len(dropped), "; ".join(dropped[:5]),
                )
        empty = not images
        if empty:  # every image of the batch was skipped: a placeholder the trainer gives a zero loss
            # Resized like an evaluation image, so that even the coarsest feature map has more than one value
            # per channel (BatchNorm refuses a 1x1 map in a batch of one).
            images = [Image.new("RGB", (32, 32))]
            annotations = [{"image_id": -1, "annotations": []}]
            is_labeled = [False]
        batch = self.processor(
            images=images, annotations=annotations, do_resize=empty or not training, return_tensors="pt"
        )
        out = {
            "pixel_values": batch["pixel_values"],
            "pixel_mask": batch["pixel_mask"],
            "labels": batch["labels"],
            "is_labeled": torch.tensor(is_labeled, dtype=torch.bool),
            "num_skipped": torch.tensor(len(skipped), dtype=torch.int64),
            "skipped_examples": skipped,
            "num_dropped_boxes": torch.tensor(len(dropped), dtype=torch.int64),
        }
        if empty:
            out["empty_batch"] = torch.tensor(True)
        elif student_images:
            # The student's jittered copies as `pixel_values`; the teacher's view keeps the shared geometry only.
            out["teacher_pixel_values"] = out["pixel_values"]
            out["pixel_values"] = self.processor(images=student_images, do_resize=False,
                                                 return_tensors="pt")["pixel_values"]
        return out
