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
from hf_sad.model.image_processing_sad import SADImageProcessor, prepare_coco_detection_target
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


def test_augmentation_is_a_function_of_seed_and_sample_index_only(labeled, processor):
    """The same (seed, sample_index) gives the same pixels whatever the global RNG holds, and leaves it untouched;
    another seed gives other pixels."""
    rows = list(build_training_stream(labeled).take(4))
    collator = SADDataCollator(processor, seed=3, student_color_jitter=0.3)
    state = torch.get_rng_state()
    first = collator(copy.deepcopy(rows))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    again = collator(copy.deepcopy(rows))
    for key in ("pixel_values", "teacher_pixel_values"):
        assert torch.equal(first[key], again[key]), key
    other = SADDataCollator(processor, seed=4, student_color_jitter=0.3)(copy.deepcopy(rows))
    assert not torch.equal(other["teacher_pixel_values"], first["teacher_pixel_values"])


def test_scale_jitter_and_student_colour_jitter_stay_in_their_ranges(processor):
    """Training images come out at the processor's size times a factor drawn from `scale_range`, resized with
    antialiasing; with `student_color_jitter` s the student sees each image's brightness scaled by a factor in
    [1 - s, 1 + s] (a grey image: contrast and saturation leave it as it is), the teacher the image as it was."""
    grey = Image.new("RGB", (64, 64), (120, 120, 120))
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(0.5, 0.75), student_color_jitter=0.2)
    ratios, sides = [], []
    for index in range(12):
        batch = collator([training_row(grey, index=index)])
        side = int(batch["pixel_mask"][0].sum(0).max())
        sides.append(side)
        student = batch["pixel_values"][0, :, :side, :side]
        teacher = batch["teacher_pixel_values"][0, :, :side, :side]
        mean, std = torch.tensor(processor.image_mean)[:, None, None], torch.tensor(processor.image_std)[:, None, None]
        ratios.append(float(((student * std + mean) / (teacher * std + mean)).mean()))
    assert all(32 <= side <= 48 for side in sides) and len(set(sides)) > 3, sides
    # uint8 pixels: each adjustment rounds, a level or two of 120
    assert all(0.78 <= r <= 1.22 for r in ratios) and max(ratios) - min(ratios) > 0.1, ratios
    exact = SADDataCollator(processor, hflip_prob=0.0, scale_range=(0.5, 0.5))([training_row(grey)])
    assert int(exact["pixel_mask"][0].sum()) == 32 * 32
    # A 1-px checkerboard shrunk to a third: antialiasing averages it to grey (std 0.5 of 255 levels inside),
    # plain sampling keeps a pattern (std 35).
    board = Image.fromarray(((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 255).byte().numpy()).convert(
        "RGB")
    pixels = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1 / 3, 1 / 3))([training_row(board)])
    assert pixels["pixel_mask"][0].sum() == 21 * 21
    inner = pixels["pixel_values"][0, 0, 1:20, 1:20] * processor.image_std[0] * 255
    assert inner.std() < 2


def test_default_augmentation_is_the_arguments(processor):
    from hf_sad.arguments import SADTrainingArguments

    collator, args = SADDataCollator(processor), SADTrainingArguments(output_dir="unused", use_cpu=True)
    assert collator.hflip_prob == args.hflip_prob == 0.5
    assert collator.scale_range == tuple(args.scale_jitter) == (0.8, 1.2)
    assert collator.student_color_jitter == args.student_color_jitter == 0.0
    assert collator.skip_bad_labeled_images is args.skip_bad_labeled_images is False
    assert collator.seed == args.seed == 42
    assert "teacher_pixel_values" not in collator([training_row(Image.new("RGB", (64, 64)))])


def test_large_training_jpegs_are_decoded_at_reduced_scale_with_their_boxes(processor):
    """A 512 px JPEG for a 64 px model is decoded at 1/4 (by libjpeg) and its boxes follow; evaluation images are
    decoded whole and resized by the processor (a 96 x 48 image comes out 128 x 64 for this 64 px square processor:
    its aspect ratio is not kept by a fixed size, see the processor's `size`)."""
    big = Image.new("RGB", (512, 512), (10, 10, 10))
    ImageDraw.Draw(big).rectangle([256, 128, 319, 255], fill=(250, 250, 250))
    value = image_value(jpeg(big), "big")
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))
    batch = collator([training_row(value, labeled=True, boxes=[[256, 128, 64, 128]], categories=[1])])
    torch.testing.assert_close(batch["labels"][0]["boxes"], torch.tensor([[0.5625, 0.375, 0.125, 0.25]]))
    assert collator._draft_side(480, 640) == math.ceil(64 * 1.0)  # the processor makes every image 64 x 64
    wide = SADDataCollator(SADImageProcessor(size={"shortest_edge": 64, "longest_edge": 100}), scale_range=(0.8, 1.2))
    assert wide._draft_side(480, 640) == math.ceil(85 * 1.2)  # (480, 640) -> 64 x 85; the other orientation alike
    evaluation = collator([{"image": image_value(jpeg(Image.new("RGB", (96, 48))), "wide"), "image_id": 1,
                            "objects": {"bbox": [[90, 40, 30, 20]], "category": [1]}}])
    assert evaluation["pixel_values"].shape[-2:] == (64, 64) and evaluation["labels"][0]["size"].tolist() == [64, 64]
    # The box reached past the right and bottom edges: clipped to the image, then normalised.
    torch.testing.assert_close(evaluation["labels"][0]["boxes"], torch.tensor([[93 / 96, 44 / 48, 6 / 96, 8 / 48]]))


def test_category_ids_are_mapped_for_evaluation_rows_only_and_unlabeled_rows_carry_no_boxes(processor, picture):
    mapping = {0: 2, 1: 0, 2: 1}
    collator = SADDataCollator(processor, category_map=mapping, hflip_prob=0.0, scale_range=(1.0, 1.0))
    evaluation = collator([{"image": picture, "objects": {"bbox": [GOOD_BOX], "category": [0]}, "image_id": 1}])
    training = collator([training_row(picture, labeled=True, boxes=[GOOD_BOX], categories=[0])])
    unlabeled = collator([training_row(picture, labeled=False, boxes=[GOOD_BOX], categories=[0])])
    assert evaluation["labels"][0]["class_labels"].tolist() == [2]  # the dataset's id, mapped to the model's
    assert training["labels"][0]["class_labels"].tolist() == [0]  # the stream carries model ids already
    assert unlabeled["labels"][0]["class_labels"].tolist() == [] and not unlabeled["is_labeled"][0]
    no_objects = collator([{"image": picture, "image_id": 2}])  # an evaluation row without `objects`: no boxes
    assert no_objects["labels"][0]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match=r"image 'picture.img' sample_index=5: category id 9"):
        SADDataCollator(processor, id2label={0: "a", 1: "b"})([training_row(picture, 5, True, [GOOD_BOX], [9])])


def test_dropped_boxes_are_counted_over_the_whole_batch_and_described(processor, picture):
    rows = [training_row(picture, index, True, [GOOD_BOX, [70, 70, 5, 5]], [0, 0]) for index in range(3)]
    assert int(SADDataCollator(processor)(rows)["num_dropped_boxes"]) == 3
    kept, per_box, dropped = clean_boxes(torch.tensor([[1.234, 2.345, 5.0, 6.0], [70.0, 1.0, 5.0, 5.0]]), ["a", "b"],
                                         64, 64, "img")
    assert per_box == ["a"] and dropped == ["img bbox [70.0, 1.0, 5.0, 5.0]"]
    _, _, dropped = clean_boxes(torch.tensor([[1.234, 70.0, 5.0, 6.0]]), ["a"], 64, 64, "img")
    assert dropped == ["img bbox [1.23, 70.0, 5.0, 6.0]"]  # below the image


def test_clean_boxes_clips_to_both_edges_and_leaves_the_other_boxes_bit_for_bit():
    inside = [0.1, 0.2, 0.3, 0.7]  # x + w - x is not exactly w in float32: recomputing it would change the box
    boxes = torch.tensor([inside, [-5.0, -3.0, 20.0, 70.0], [60.0, 50.0, 10.0, 30.0]])
    cleaned, _, dropped = clean_boxes(boxes, [0, 1, 2], 64, 60, "img")
    assert dropped == [] and torch.equal(cleaned[0], boxes[0])
    torch.testing.assert_close(cleaned[1:], torch.tensor([[0.0, 0.0, 15.0, 60.0], [60.0, 50.0, 4.0, 10.0]]))
    with pytest.raises(ValueError, match=r"Annotation of image img: bbox \[3.0, nan, 1.0, 1.0\]"):
        clean_boxes(torch.tensor([inside, [3.0, math.nan, 1.0, 1.0]]), [0, 1], 64, 64, "img")


def test_objects_in_both_layouts_and_their_errors_name_the_object():
    from hf_sad.data.collator import objects_as_columns

    as_rows = [{"bbox": [1, 2, 3, 4], "category": 2, "iscrowd": 1, "area": 9.5}, {"bbox": [5, 6, 7, 8], "category": 0}]
    columns = objects_as_columns(as_rows, "img")
    assert columns["bbox"] == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]] and columns["category"] == [2, 0]
    assert columns["iscrowd"] == [1, 0] and columns["area"][0] == 9.5 and math.isnan(columns["area"][1])
    as_columns = objects_as_columns({"bbox": [[1, 2, 3, 4]], "category": [1]}, "img")
    assert as_columns["iscrowd"] == [0] and math.isnan(as_columns["area"][0])
    for objects, message in [
        (None, r"an image: `objects` is null"),
        ([{"bbox": [1, 2, 3, 4]}], r"img: objects\[0\] = .* lacks `bbox` or `category`"),
        ([{"category": 1}], r"img: objects\[0\] = .* lacks `bbox` or `category`"),
        ([[1, 2, 3, 4]], r"img: objects\[0\] = .* lacks `bbox` or `category`"),
        ({"bbox": [[1, 2, 3, 4]], "category": None}, r"img: `objects` lacks \['category'\]"),
        ({"bbox": [[1, 2, 3, 4], [1, 2, 3, 4]], "category": [0, "3"]}, r"img: objects\[1\] category must be an"),
        ({"bbox": [[1, 2, 3, 4]], "category": [None]}, r"img: objects\[0\] category must be an integer id, got None"),
        ({"bbox": [[1, 2, 3, 4]], "category": [1.5]}, r"objects\[0\] category must be an integer id, got 1.5"),
        ({"bbox": [[1, 2, 3, 4]], "category": [0], "iscrowd": ["x"]}, r"img: objects\[0\] iscrowd must be an"),
        ({"bbox": [[1, 2, 3, 4]], "category": [0], "area": [math.inf]}, r"img: objects\[0\] area must be a finite"),
        ({"bbox": [[1, 2, 3, 4]], "category": [0], "area": [-1]}, r"objects\[0\] area must be a finite number >= 0"),
        ({"bbox": [[1, 2, 3, 4]], "category": [0], "area": ["big"]}, r"objects\[0\] area must be a number of"),
        ({"bbox": [5], "category": [0]}, r"img: objects\[0\]: bbox must be \[x, y, w, h\]"),
        ({"bbox": ["1234"], "category": [0]}, r"img: objects\[0\]: bbox must be \[x, y, w, h\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            objects_as_columns(objects) if objects is None else objects_as_columns(objects, "img")
    zero_area = objects_as_columns({"bbox": [[1, 2, 3, 4]] * 2, "category": [0, 0], "area": [0, 0.5]}, "img")
    assert zero_area["area"] == [0.0, 0.5]


def test_images_are_named_by_their_path_or_as_in_memory_and_rows_by_their_place(tmp_path, processor):
    from hf_sad.data.collator import CollationStats, image_name

    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(path)
    with Image.open(path) as opened:
        assert image_name(opened) == repr(str(path))
    assert image_name({"path": "x.jpg", "bytes": b""}) == "'x.jpg'" and image_name({"bytes": b"1"}) == (
        "(in-memory image)")
    assert image_name(Image.new("RGB", (2, 2))) == "(in-memory image)"
    with pytest.raises(ValueError, match=r"Could not decode the labeled image row 1 of the batch"):
        SADDataCollator(processor)([{"image": Image.new("RGB", (64, 64)), "objects": {"bbox": [], "category": []}},
                                    {"image": {"bytes": b"broken"}, "objects": {"bbox": [], "category": []}}])
    stats = CollationStats()
    for index in range(12):
        stats.skipped(f"image {index}")
    assert stats.images_skipped == 12 and stats.skipped_examples == [f"image {i}" for i in range(10)]


def test_decoding_keeps_the_range_of_16_bit_32_bit_and_float_images_and_palettes_without_warnings():
    import warnings

    import numpy as np

    from hf_sad.data.collator import decode_image, decode_image_with_scale

    values = np.array([[0, 20000], [40000, 40000]])
    images = {
        "I;16": Image.fromarray(values.astype(np.uint16)),
        "I;16B": Image.fromarray(values.astype(">u2")),
        "I;16L": Image.frombytes("I;16L", (2, 2), values.astype("<u2").tobytes()),
        "I": Image.fromarray(values.astype(np.int32)),
        "F": Image.fromarray(values.astype(np.float32)),
    }
    for mode, image in images.items():
        assert image.mode == mode, (mode, image.mode)
        decoded = np.asarray(decode_image(image))[..., 0]
        assert decoded.tolist() == [[0, 127], [255, 255]], mode  # scaled by the brightest pixel, not clipped
    palette = Image.new("RGB", (4, 4), (200, 30, 30)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when a palette with transparency goes straight to RGB
        decoded = decode_image({"bytes": buffer.getvalue(), "path": "p.png"})
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == palette.convert("RGB").getpixel((0, 0))
    image, factor = decode_image_with_scale(Image.new("RGB", (16, 16)), min_size=lambda h, w: 4)
    assert factor == 1.0 and image.size == (16, 16)  # not a JPEG: decoded whole
    big = {"bytes": jpeg(Image.new("RGB", (256, 256), (9, 9, 9))), "path": "big.jpg"}
    image, factor = decode_image_with_scale(big, min_size=lambda h, w: 64)
    assert (factor, image.size) == (0.25, (64, 64))
    assert decode_image(big, min_size=lambda h, w: 64).size == (64, 64)
