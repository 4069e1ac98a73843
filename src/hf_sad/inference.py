"""Running a detector on images and drawing what it found (for `hf-sad predict` and the demo's picture)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, make_grid

from .image_processing_sad import SADImageProcessor
from .modeling_sad import SADForObjectDetection


@torch.no_grad()
def detect(
    model: SADForObjectDetection,
    processor: SADImageProcessor,
    images: Sequence[Image.Image],
    *,
    threshold: float = 0.5,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image: `{"scores" (k,), "labels" (k,) int64, "boxes" (k, 4) xyxy absolute pixels}`."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    for start in range(0, len(images), batch_size):
        chunk = [image.convert("RGB") for image in images[start : start + batch_size]]
        inputs = processor(images=chunk, return_tensors="pt").to(device)
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        sizes = [(image.height, image.width) for image in chunk]
        results += processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
    return [{k: v.cpu() for k, v in r.items()} for r in results]


def draw_detections(
    image: Image.Image, detections: Mapping[str, torch.Tensor], id2label: Mapping[int, str]
) -> Image.Image:
    """`image` with its detections drawn as labelled boxes (label name and score)."""
    if len(detections["boxes"]) == 0:
        return image.convert("RGB")
    labels = [f"{id2label[int(c)]} {s:.2f}" for c, s in zip(detections["labels"], detections["scores"])]
    pixels = TF.pil_to_tensor(image.convert("RGB"))
    drawn = draw_bounding_boxes(pixels, detections["boxes"], labels=labels, colors="yellow", width=1)
    return TF.to_pil_image(drawn)


def detections_grid(
    images: Sequence[Image.Image], detections: Sequence[Mapping[str, torch.Tensor]], id2label: Mapping[int, str],
    columns: int = 4, scale: int = 2,
) -> Image.Image:
    """A grid of images with their detections, each upscaled `scale` times so that small labels stay readable."""
    tiles = []
    for image, found in zip(images, detections):
        big = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        scaled = {**found, "boxes": found["boxes"] * scale}
        tiles.append(TF.pil_to_tensor(draw_detections(big, scaled, id2label)))
    return TF.to_pil_image(make_grid(tiles, nrow=columns, padding=4, pad_value=255))


def to_json(detections: Mapping[str, torch.Tensor], id2label: Mapping[int, str]) -> list[dict]:
    """Detections of one image as JSON-ready dicts with `label`, `score` and `box` (xmin, ymin, xmax, ymax pixels)."""
    return [
        {
            "label": id2label[int(label)],
            "score": round(float(score), 4),
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), [round(float(v), 2) for v in box])),
        }
        for score, label, box in zip(detections["scores"], detections["labels"], detections["boxes"])
    ]
