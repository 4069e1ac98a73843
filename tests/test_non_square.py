"""Non-square images through the whole pipeline: processor -> collator -> training targets -> loss ->
post-processing -> evaluation, in both orientations of two aspect ratios, each stage against pixel boxes worked out by
hand below.

Square images hide every swap of height and width; real data (BCCD: 640 x 480) is not square. Every case resizes the
image (the processor's shortest edge is 32 px), so that confusing the original size with the resized one shows too.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from hf_sad.data import load_coco_detection
from hf_sad.data.collator import SADDataCollator
from hf_sad.model.box_ops import absolute_xyxy
from hf_sad.model.modeling_sad import SADObjectDetectionOutput, predicted_boxes
from hf_sad.training.trainer import SADTrainer

from .utils import LABELS, make_args, oracle_detector, reference_detection_loss, tiny_detector

#: The processor's size: shortest edge 32 px, longest at most 64 px (aspect ratio kept).
SIZE = {"shortest_edge": 32, "longest_edge": 64}

#: name -> (width, height, one box (COCO x, y, w, h) in original pixels, (height, width) after resizing, the box as
#: x1, y1, x2, y2 in resized pixels). By hand: the resize factor is 32 / the shorter side, 2/3 for 96 x 48 and 8/15
#: for 90 x 60.
CASES = {
    "landscape_2_1": (96, 48, [12.0, 6.0, 36.0, 18.0], (32, 64), [8.0, 4.0, 32.0, 16.0]),
    "portrait_1_2": (48, 96, [6.0, 12.0, 18.0, 36.0], (64, 32), [4.0, 8.0, 16.0, 32.0]),
    "landscape_3_2": (90, 60, [30.0, 15.0, 45.0, 30.0], (32, 48), [16.0, 8.0, 40.0, 24.0]),
    "portrait_2_3": (60, 90, [15.0, 30.0, 30.0, 45.0], (48, 32), [8.0, 16.0, 24.0, 40.0]),
}
CLASS = 1  # "square"


def model_and_processor():
    # anchor_scale 2: level-3 anchors of 16-25 px, the size of these boxes
    return tiny_detector(id2label=LABELS, image_size=dict(SIZE), anchor_scale=2.0)


def normalised_cxcywh(box: list[float], width: int, height: int) -> list[float]:
    x, y, w, h = box
    return [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 80, 120)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(CASES))
def test_processor_targets_are_the_box_in_pixels_of_the_resized_image(case):
    width, height, box, resized, resized_box = CASES[case]
    _, processor = model_and_processor()
    annotation = {"image_id": 7, "annotations": [{"bbox": box, "category_id": CLASS}]}
    batch = processor(images=[Image.new("RGB", (width, height))], annotations=[annotation], return_tensors="pt")
    (label,) = batch["labels"]
    assert label["orig_size"].tolist() == [height, width]
    assert label["size"].tolist() == list(resized)
    torch.testing.assert_close(label["boxes"], torch.tensor([normalised_cxcywh(box, width, height)]))
    torch.testing.assert_close(absolute_xyxy(label["boxes"], label["size"]), torch.tensor([resized_box]))
    # Padded bottom/right to multiples of 32; the mask marks the resized image.
    padded = [-(-side // 32) * 32 for side in resized]
    assert tuple(batch["pixel_values"].shape) == (1, 3, *padded)
    mask = batch["pixel_mask"][0]
    assert int(mask.sum()) == resized[0] * resized[1] and mask[: resized[0], : resized[1]].all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_flip_mirrors_the_box_across_the_image_width(case):
    """hflip_prob=1 and no scale jitter: the box comes back mirrored at x' = width - x - w, normalised by the
    image's own width and height, and the image resized to the processor's size."""
    width, height, box, resized, _ = CASES[case]
    _, processor = model_and_processor()
    collator = SADDataCollator(processor, hflip_prob=1.0, scale_range=(1.0, 1.0), id2label=LABELS)
    row = {"image": {"bytes": png(width, height), "path": f"{case}.png"}, "is_labeled": True, "sample_index": 0,
           "objects": {"bbox": [box], "category": [CLASS], "iscrowd": [0]}}
    batch = collator([row])
    (label,) = batch["labels"]
    x, y, w, h = box
    torch.testing.assert_close(label["boxes"], torch.tensor([normalised_cxcywh([width - x - w, y, w, h], width,
                                                                                height)]))
    assert label["size"].tolist() == list(resized)
    assert int(batch["pixel_mask"][0].sum()) == resized[0] * resized[1]


@pytest.mark.parametrize("pair", [("landscape_2_1", "portrait_1_2"), ("landscape_3_2", "portrait_2_3")])
def test_loss_targets_post_processing_and_valid_sizes_of_a_mixed_batch(pair):
    """A landscape and a portrait image in one padded batch: each image's valid size, its loss against the hand-made
    pixel box (an independent RetinaNet loss on the same outputs), and its detection mapped back to its original
    pixels."""
    model, processor = model_and_processor()
    images = [Image.new("RGB", CASES[name][:2]) for name in pair]
    annotations = [{"image_id": i, "annotations": [{"bbox": CASES[name][2], "category_id": CLASS}]}
                   for i, name in enumerate(pair)]
    batch = processor(images=images, annotations=annotations, return_tensors="pt")
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
    assert out.image_sizes.tolist() == [list(map(float, CASES[name][3])) for name in pair]

    hand_boxes = [torch.tensor([CASES[name][4]]) for name in pair]
    focal, box, positives = reference_detection_loss(
        out.logits, out.box_regression, out.anchors, hand_boxes, [torch.tensor([CLASS])] * 2)
    assert positives > 0
    torch.testing.assert_close(out.loss_dict["loss_cls"].double(), torch.tensor(focal, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss_dict["loss_box"].double(), torch.tensor(box, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert out.loss_dict["num_positives"] == positives

    # Each image's detection: the anchor nearest its box, with deltas that decode to the box exactly.
    logits = torch.full_like(out.logits, -20.0)
    deltas = torch.zeros_like(out.box_regression)
    for i, target in enumerate(hand_boxes):
        anchor_centres = (out.anchors[:, :2] + out.anchors[:, 2:]) / 2
        best = int(((anchor_centres - (target[0, :2] + target[0, 2:]) / 2) ** 2).sum(1).argmin())
        a, b = out.anchors[best], target[0]
        deltas[i, best] = torch.stack([((b[0] + b[2]) - (a[0] + a[2])) / 2 / (a[2] - a[0]),
                                       ((b[1] + b[3]) - (a[1] + a[3])) / 2 / (a[3] - a[1]),
                                       torch.log((b[2] - b[0]) / (a[2] - a[0])),
                                       torch.log((b[3] - b[1]) / (a[3] - a[1]))])
        logits[i, best, CLASS] = 8.0
    outputs = SADObjectDetectionOutput(logits=logits,
                                       pred_boxes=predicted_boxes(deltas, out.anchors, out.image_sizes))
    original_sizes = [(CASES[name][1], CASES[name][0]) for name in pair]
    detections = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=original_sizes)
    for detection, name in zip(detections, pair):
        x, y, w, h = CASES[name][2]
        assert detection["labels"].tolist() == [CLASS]
        torch.testing.assert_close(detection["boxes"], torch.tensor([[x, y, x + w, y + h]]), rtol=0, atol=1e-4)


def test_evaluation_of_non_square_images_scores_a_perfect_detector_one(tmp_path):
    """COCO mAP through `SADTrainer.evaluate` (collator, prediction step, packing, metric) of a detector that outputs
    the ground truth: 1.0 exactly in every orientation; one whose boxes were scaled with height and width exchanged
    scores 0."""
    images, annotations = [], []
    for index, (name, (width, height, box, _, _)) in enumerate(sorted(CASES.items()), start=1):
        Image.new("RGB", (width, height)).save(tmp_path / f"{name}.png")
        images.append({"id": index, "file_name": f"{name}.png", "width": width, "height": height})
        annotations.append({"id": index, "image_id": index, "category_id": CLASS + 1, "bbox": box,
                            "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in LABELS.items()]
    (tmp_path / "val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
    (tmp_path / "images").symlink_to(tmp_path)
    dataset = load_coco_detection(tmp_path / "val.json")

    model, processor = oracle_detector(id2label=LABELS, image_size=dict(SIZE), anchor_scale=2.0)
    trainer = SADTrainer(model, None, make_args(tmp_path, per_device_eval_batch_size=2), eval_dataset=dataset,
                         processing_class=processor)
    metrics = trainer.evaluate()
    assert metrics["eval_map"] == 1.0 and metrics["eval_map_square"] == 1.0 and metrics["eval_mar_100"] == 1.0

    # The ground truth scaled by (height, width) instead of (width, height): what reading `orig_size` the wrong way
    # round makes of a perfect detection.
    swapped = {}
    for index, (_, (width, height, box, _, _)) in enumerate(sorted(CASES.items()), start=1):
        cx, cy, w, h = normalised_cxcywh(box, width, height)
        swapped[index] = [((cx - w / 2) * height, (cy - h / 2) * width, (cx + w / 2) * height, (cy + h / 2) * width,
                           CLASS, 0.9)]
    model.detections = swapped
    assert trainer.evaluate()["eval_map"] == 0.0
