"""From dataset rows to model inputs (`hf_sad.data.collator`): decoding, box cleaning, category mapping, augmentation.

Images: decodable images of any mode (grayscale, bilevel, LA, RGBA, palette with/without transparency, 16-bit PNG,
float TIFF, CMYK JPEG, EXIF-rotated JPEG, GIF, WebP, BMP, 1x1, 8x8) become RGB and are used. Undecodable ones (corrupt
bytes, truncated JPEG, zero bytes, a CSV, random noise, a zero-byte file and a text file on disk) are skipped when
unlabeled (warned with their name, counted in `skipped_images`), and are an error naming them when labeled unless
`skip_bad_labeled_images`. A batch whose every image was skipped becomes a placeholder with a zero loss and no
gradient. A 8000x6000 JPEG is decoded at reduced scale (peak memory measured in a subprocess). Boxes of an
EXIF-rotated image are taken in its displayed orientation (as annotation tools show it).

Annotations:
- zero-area and inverted boxes (w or h <= 0): dropped, counted (`num_dropped_boxes`), warned about once with examples;
- boxes reaching outside the image: clipped; boxes entirely outside: dropped and counted;
- NaN / inf coordinates: an error naming the image (path, image_id or stream position) and the box;
- category ids unknown to the model: an error naming the id and the model's labels;
- images without boxes: valid; duplicate boxes: kept.

Augmentation is seeded by each row's `sample_index` and moves the boxes with the pixels. What happens to skipped
images and dropped boxes during training (counting, stopping) is tested in test_callbacks.py.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw

from hf_sad.data import build_training_stream
from hf_sad.data.collator import SADDataCollator, clean_boxes, decode_image
from hf_sad.data.synthetic import SYNTHETIC_LABELS, synthetic_id2label
from hf_sad.model.image_processing_sad import prepare_coco_detection_target
from hf_sad.training.trainer import SADTrainer

from .utils import (
    GOOD_BOX,
    IMAGE_SIZE,
    detection_dataset,
    image_value,
    jpeg,
    make_args,
    scene,
    tiny_detector,
    unusual_image_bytes,
)

UNUSUAL = unusual_image_bytes()


@pytest.fixture(scope="module")
def processor():
    return tiny_detector()[1]


def training_row(value, index=0, labeled=False, boxes=(), categories=()):
    return {"image": value, "objects": {"bbox": [list(b) for b in boxes], "category": list(categories)},
            "is_labeled": labeled, "sample_index": index}


def collate_boxes(processor, picture, boxes, categories=None, training=True):
    categories = categories if categories is not None else [0] * len(boxes)
    row = {"image": picture, "objects": {"bbox": boxes, "category": categories}, "image_id": 3}
    if training:
        row = {**row, "is_labeled": True, "sample_index": 11}
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0), id2label=synthetic_id2label())
    return collator, collator([row])


# ----------------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_decodable_unusual_images_become_rgb_and_collate(name, processor):
    data, (width, height) = UNUSUAL[name]
    image = decode_image(image_value(data, name))
    assert image.mode == "RGB" and image.size == (width, height)
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))
    box = [0, 0, max(1, width // 2), max(1, height // 2)]
    rows = [training_row(image_value(data, name), 0, labeled=True, boxes=[box], categories=[1]),
            training_row(image_value(data, name), 1)]
    batch = collator(rows)
    assert batch["pixel_values"].shape[:2] == (2, 3) and torch.isfinite(batch["pixel_values"]).all()
    assert int(batch["num_skipped"]) == 0 and len(batch["labels"][0]["boxes"]) == 1
    plain_row = {"image": image_value(data, name), "objects": {"bbox": [box], "category": [1]}}
    plain = SADDataCollator(processor)([plain_row])
    assert plain["pixel_values"].shape[:2] == (1, 3) and plain["labels"][0]["orig_size"].tolist() == [height, width]


def test_pixel_content_survives_mode_conversion():
    assert decode_image(image_value(UNUSUAL["grayscale"][0], "g")).getpixel((10, 10)) == (255, 255, 255)
    red, green, blue = decode_image(image_value(UNUSUAL["cmyk_jpeg"][0], "c")).getpixel((5, 5))
    assert red > 200 and green < 80 and blue < 80  # CMYK (0, 200, 200, 0) is red
    assert decode_image(image_value(UNUSUAL["png_16bit"][0], "p")).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(image_value(UNUSUAL["tiff_float"][0], "f")).getpixel((0, 0)) == (127, 127, 127)


def test_exif_rotated_labeled_image_boxes_are_in_the_displayed_orientation(processor):
    """Decision: boxes of an EXIF-rotated image are given in its displayed (rotated) orientation, as annotation tools
    (CVAT, Label Studio, COCO viewers) show it. The file stores a 100x60 landscape with orientation 6."""
    displayed = Image.new("RGB", (60, 100), (0, 0, 90))
    ImageDraw.Draw(displayed).rectangle([10, 50, 39, 79], fill=(255, 255, 255))  # box x, y, w, h = 10, 50, 30, 30
    stored = displayed.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    value = image_value(jpeg(stored, exif=exif.tobytes()), "rotated")
    assert Image.open(io.BytesIO(value["bytes"])).size == (100, 60)  # stored landscape
    decoded = decode_image(value)
    assert decoded.size == (60, 100) and decoded.getpixel((25, 65))[0] > 200 and decoded.getpixel((25, 20))[0] < 60

    box, expected = [10, 50, 30, 30], torch.tensor([25 / 60, 65 / 100, 30 / 60, 30 / 100])
    plain = SADDataCollator(processor)([{"image": value, "objects": {"bbox": [box], "category": [0]}}])
    assert plain["labels"][0]["orig_size"].tolist() == [100, 60]
    torch.testing.assert_close(plain["labels"][0]["boxes"][0], expected, rtol=0, atol=1e-6)
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))
    batch = collator([training_row(value, 0, labeled=True, boxes=[box], categories=[0])])
    torch.testing.assert_close(batch["labels"][0]["boxes"][0], expected, rtol=0, atol=1e-6)
    # The labeled region of the network input is the white square: sample the box centre in the 64x64 input.
    cx, cy = (expected[:2] * 64).long().tolist()
    std, mean = torch.tensor(processor.image_std), torch.tensor(processor.image_mean)
    pixel = batch["pixel_values"][0, :, cy, cx] * std + mean
    assert (pixel > 0.8).all(), pixel


@pytest.mark.parametrize("name", ["corrupt_bytes", "truncated_jpeg", "zero_bytes", "not_an_image", "random_noise",
                                  "zero_byte_file", "text_file"])
def test_undecodable_unlabeled_image_is_skipped_counted_and_named(name, bad_values, processor, caplog):
    collator = SADDataCollator(processor)
    good = image_value(jpeg(), "good")
    rows = [training_row(good, 0), training_row(bad_values[name], 1), training_row(good, 2)]
    with caplog.at_level(logging.WARNING, logger="hf_sad.data.collator"):
        batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 2 and int(batch["num_skipped"]) == 1
    path = bad_values[name]["path"]
    assert batch["skipped_examples"] == [f"{path!r} sample_index=1"]
    assert any(path in r.getMessage() and "sample_index=1" in r.getMessage() for r in caplog.records)
    assert collator.stats.images_seen == 3 and collator.stats.images_skipped == 1
    assert collator.stats.skipped_examples == batch["skipped_examples"]


@pytest.mark.parametrize("training", [True, False])
def test_undecodable_labeled_image_is_an_error_naming_it_unless_skipping_is_chosen(training, bad_values, processor):
    value = bad_values["truncated_jpeg"]
    row = {"image": value, "objects": {"bbox": [[1, 1, 5, 5]], "category": [0]}, "image_id": 7}
    if training:
        row = training_row(value, 5, labeled=True, boxes=[[1, 1, 5, 5]], categories=[0])
    expected = r"(?s)Could not decode the labeled image 'truncated_jpeg.img'.*skip_bad_labeled_images=True"
    with pytest.raises(ValueError, match=expected):
        SADDataCollator(processor)([row])
    batch = SADDataCollator(processor, skip_bad_labeled_images=True)([row, {**row, "image": image_value(jpeg(), "ok")}])
    assert int(batch["num_skipped"]) == 1 and batch["pixel_values"].shape[0] == 1


def test_batch_with_every_image_skipped_is_a_placeholder_with_zero_loss(tmp_path, labeled, bad_values, processor):
    rows = [training_row(bad_values[name], i) for i, name in enumerate(["corrupt_bytes", "zero_bytes"])]
    batch = SADDataCollator(processor)(rows)
    assert bool(batch["empty_batch"]) and int(batch["num_skipped"]) == 2
    assert batch["pixel_values"].shape[0] == 1 and not batch["is_labeled"].any()
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path), labeled, processing_class=processor)
    model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    assert loss.item() == 0.0 and loss.requires_grad  # connected to the graph: backward (and DDP) work
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


LARGE_IMAGE_PROBE = textwrap.dedent("""
    import json, re, sys
    from PIL import Image
    from hf_sad.data.collator import SADDataCollator, decode_image
    from hf_sad.model.image_processing_sad import SADImageProcessor

    def status_mb(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

    def measure(function):
        \"\"\"Peak RSS growth (MB) while `function` runs: the kernel's peak (VmHWM) is reset to the current RSS.\"\"\"
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = status_mb("VmRSS")
        result = function()
        return status_mb("VmHWM") - before, result

    collator = SADDataCollator(SADImageProcessor(size={"height": 64, "width": 64}), hflip_prob=0.0,
                               scale_range=(1.0, 1.0))
    small, large = sys.argv[1], sys.argv[2]
    row = lambda path, boxes: {"image": {"bytes": None, "path": path}, "objects": {"bbox": boxes, "category": [0]},
                               "is_labeled": True, "sample_index": 0}
    collator([row(small, [[1, 1, 4, 4]])])  # warm up every code path on a small image
    drafted, batch = measure(lambda: collator([row(large, [[4000, 3000, 800, 600]])]))
    full, image = measure(lambda: decode_image({"bytes": None, "path": large}))  # full resolution, for contrast
    print(json.dumps({"drafted": drafted, "full": full, "full_size": image.size,
                      "box": batch["labels"][0]["boxes"][0].tolist(),
                      "centre": batch["pixel_values"][0, :, 35, 35].tolist()}))
""")


def test_very_large_jpeg_is_decoded_at_reduced_scale_without_exhausting_memory(tmp_path):
    large = Image.new("RGB", (8000, 6000), (20, 40, 60))
    ImageDraw.Draw(large).rectangle([4000, 3000, 4799, 3599], fill=(255, 255, 255))
    large.save(tmp_path / "large.jpg", quality=90)
    del large
    scene(64, 64).save(tmp_path / "small.jpg")
    probe = subprocess.run(
        [sys.executable, "-c", LARGE_IMAGE_PROBE, str(tmp_path / "small.jpg"), str(tmp_path / "large.jpg")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    # 8000x6000 RGB is 144 MB before any tensor copy; reduced-scale decoding (1/8 here) stays far below.
    print("peak RSS growth (MB):", {k: round(result[k], 1) for k in ("drafted", "full")})
    assert result["drafted"] < 40, result
    assert result["full"] > 100, result  # the measurement does see a full-resolution decode
    assert result["full_size"] == [8000, 6000]
    torch.testing.assert_close(torch.tensor(result["box"]), torch.tensor([0.55, 0.55, 0.1, 0.1]), rtol=0, atol=1e-3)
    assert min(result["centre"]) > 1.5  # white (normalised) at the box centre: boxes scaled with the pixels


# ----------------------------------------------------------------------------------------------------------------------
# Boxes and categories
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_degenerate_and_inverted_boxes_are_dropped_counted_and_warned_once(processor, picture, caplog, training):
    boxes = [GOOD_BOX, [10, 10, 0, 5], [10, 10, 5, 0], [30, 30, -8, 6], [30, 30, 6, -8], [0, 0, 0, 0]]
    with caplog.at_level(logging.WARNING, logger="hf_sad.data.collator"):
        collator, batch = collate_boxes(processor, picture, boxes, training=training)
        collator([{"image": picture, "objects": {"bbox": [[1, 1, 0, 3]], "category": [0]}, "image_id": 4}])
    assert len(batch["labels"][0]["boxes"]) == 1 and int(batch["num_dropped_boxes"]) == 5
    assert collator.stats.boxes_dropped == 6
    warnings = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per collator, then only counted
    assert "Dropped 5 box(es)" in warnings[0] and "bbox [10.0, 10.0, 0.0, 5.0]" in warnings[0]
    assert "image_id=3" in warnings[0] or "sample_index=11" in warnings[0]


def test_boxes_outside_the_image_are_clipped_and_boxes_entirely_outside_are_dropped(processor, picture):
    boxes = [[-10, -6, 30, 26], [50, 40, 30, 40], [70, 10, 5, 5], [-20, 10, 10, 5], GOOD_BOX]
    _, batch = collate_boxes(processor, picture, boxes, training=False)
    labels = batch["labels"][0]
    assert int(batch["num_dropped_boxes"]) == 2
    expected_xyxy = torch.tensor([[0, 0, 20, 20], [50, 40, 64, 64], [8, 8, 28, 24]], dtype=torch.float32)
    centre = (expected_xyxy[:, :2] + expected_xyxy[:, 2:]) / 2
    expected = torch.cat([centre, expected_xyxy[:, 2:] - expected_xyxy[:, :2]], dim=1) / 64
    torch.testing.assert_close(labels["boxes"], expected, rtol=0, atol=1e-6)


def test_clean_boxes_leaves_boxes_inside_the_image_bit_for_bit():
    boxes = torch.tensor([[10.3, 7.1, 20.7, 13.9], [0.1, 0.2, 63.8, 63.7]])
    cleaned, categories, dropped = clean_boxes(boxes, [1, 2], 64, 64, "x")
    assert torch.equal(cleaned, boxes) and categories == [1, 2] and dropped == []


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_coordinates_are_an_error_naming_the_sample(processor, picture, value, training):
    expected = r"Annotation of image 'picture.img' .*(image_id=3|sample_index=11).*NaN or inf"
    with pytest.raises(ValueError, match=expected):
        collate_boxes(processor, picture, [GOOD_BOX, [5, value, 10, 10]], training=training)
    with pytest.raises(ValueError, match="image_id=9.*NaN or infinite"):
        prepare_coco_detection_target({"image_id": 9, "annotations": [{"bbox": [1, 2, value, 4], "category_id": 0}]},
                                      (64, 64))


def test_unknown_category_id_is_an_error_naming_the_id_and_the_known_labels(tmp_path, processor, picture):
    with pytest.raises(ValueError) as error:
        collate_boxes(processor, picture, [GOOD_BOX], categories=[7], training=False)
    message = str(error.value)
    assert "category id 7" in message and "'circle'" in message and "image_id=3" in message
    with pytest.raises(ValueError, match="category id -1"):
        collate_boxes(processor, picture, [GOOD_BOX], categories=[-1], training=True)

    # Plain integer categories (no ClassLabel) in a training dataset: refused before the first step.
    data = detection_dataset([picture, image_value(jpeg(scene(64, 64)), "odd")],
                             [{"bbox": [GOOD_BOX], "category": [1]}, {"bbox": [GOOD_BOX], "category": [17]}],
                             class_label=False)
    model, processor = tiny_detector()
    with pytest.raises(ValueError) as error:
        SADTrainer(model, None, make_args(tmp_path, max_steps=1), data, processing_class=processor)
    message = str(error.value)
    assert "'odd.img'" in message and "category id 17" in message
    assert all(f"'{name}'" in message for name in SYNTHETIC_LABELS)


def test_images_without_boxes_are_valid_and_duplicate_boxes_are_kept(tmp_path, processor, picture):
    _, batch = collate_boxes(processor, picture, [GOOD_BOX, GOOD_BOX, GOOD_BOX], categories=[0, 0, 2])
    assert len(batch["labels"][0]["boxes"]) == 3 and batch["labels"][0]["class_labels"].tolist() == [0, 0, 2]
    _, batch = collate_boxes(processor, picture, [])
    assert batch["labels"][0]["boxes"].shape == (0, 4)

    images = [picture, image_value(jpeg(scene(64, 64)), "empty")]
    data = detection_dataset(images, [{"bbox": [], "category": []}, {"bbox": [GOOD_BOX, GOOD_BOX], "category": [1, 1]}])
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=2, per_device_train_batch_size=2), data,
                         processing_class=processor)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------------


def test_collator_augmentation_is_seeded_by_sample_index_and_keeps_boxes_on_objects(labeled, processor):
    collator = SADDataCollator(processor, hflip_prob=1.0, scale_range=(1.0, 1.0))
    rows = list(build_training_stream(labeled).take(2))
    first, again = collator(rows), collator(copy.deepcopy(rows))
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    plain = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))(rows)
    # Flipped image = mirrored pixels; boxes mirrored in normalised cx.
    valid = (..., slice(0, IMAGE_SIZE), slice(0, IMAGE_SIZE))  # the images, without the padding
    torch.testing.assert_close(first["pixel_values"][valid], plain["pixel_values"][valid].flip(-1), rtol=0, atol=1e-5)
    for flipped, straight in zip(first["labels"], plain["labels"]):
        torch.testing.assert_close(flipped["boxes"][:, 0], 1 - straight["boxes"][:, 0], rtol=0, atol=1e-5)
    assert first["is_labeled"].all()
