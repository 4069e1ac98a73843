"""Bad and unusual images, labeled and unlabeled, map-style and streaming: never a silent crash, never lost work.

Decodable images of any mode (grayscale, bilevel, LA, RGBA, palette with/without transparency, 16-bit PNG, float
TIFF, CMYK JPEG, EXIF-rotated JPEG, GIF, WebP, BMP, 1x1, 8x8) become RGB and are used. Undecodable ones (corrupt
bytes, truncated JPEG, zero bytes, a CSV, random noise, a zero-byte file and a text file on disk) are skipped when
unlabeled (warned with their name, counted in `skipped_images`), and are an error naming them when labeled unless
`skip_bad_labeled_images`. Too many skips stop the run with examples, but only after `min_images_before_skip_check`
images. A batch whose every image was skipped becomes a placeholder with a zero loss and no update. A 8000x6000 JPEG
is decoded at reduced scale (peak memory measured in a subprocess). Boxes of an EXIF-rotated image are taken in its
displayed orientation (as annotation tools show it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw

from hf_sad.data import SADDataCollator, decode_image
from hf_sad.synthetic import make_labeled_dataset
from hf_sad.trainer import SADTrainer

from .robust_utils import (
    bad_image_bytes,
    detection_dataset,
    image_value,
    jpeg,
    make_args,
    scene,
    tiny_detector,
    unlabeled_pool,
    unusual_image_bytes,
)

UNUSUAL = unusual_image_bytes()
BAD = bad_image_bytes()


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return make_labeled_dataset(8, seed=0, image_size=64, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def processor():
    return tiny_detector()[1]


@pytest.fixture(scope="module")
def bad_values(tmp_path_factory):
    """Every undecodable input: in-memory bytes, plus a zero-byte file and a text file on disk (path only)."""
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image, despite the name\n")
    values = {name: image_value(data, name) for name, data in BAD.items()}
    values["zero_byte_file"] = {"bytes": None, "path": str(folder / "empty.jpg")}
    values["text_file"] = {"bytes": None, "path": str(folder / "notes.png")}
    return values


def training_row(value, index=0, labeled=False, boxes=(), categories=()):
    return {"image": value, "objects": {"bbox": [list(b) for b in boxes], "category": list(categories)},
            "is_labeled": labeled, "sample_index": index}


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
    with caplog.at_level(logging.WARNING, logger="hf_sad.data"):
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


def test_training_where_every_image_is_undecodable_never_updates_the_model(tmp_path, bad_values):
    """Labeled images all bad, skipping chosen: every batch is a placeholder; no weight, buffer or optimizer change."""
    bad = [bad_values[name] for name in ("corrupt_bytes", "truncated_jpeg", "not_an_image", "random_noise")]
    data = detection_dataset(bad, [{"bbox": [[1, 1, 4, 4]], "category": [0]}] * len(bad))
    model, processor = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = make_args(tmp_path, skip_bad_labeled_images=True, max_steps=2, per_device_train_batch_size=2)
    trainer = SADTrainer(model, None, args, data, processing_class=processor)
    result = trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not state for state in trainer.optimizer.state.values())  # AdamW never stepped
    assert result.metrics["skipped_images"] == 4 and result.metrics["nonfinite_steps"] == 0


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_training_skips_and_counts_undecodable_unlabeled_images(tmp_path, labeled, bad_values, streaming, caplog):
    """Unlabeled pool = good + the 7 bad inputs; 8-row batches alternate L, U: step 1 reads the good image and 3 bad
    ones, step 2 the other 4 bad ones (a batch of labeled rows only)."""
    names = sorted(bad_values)
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good] + [bad_values[name] for name in names], streaming=streaming)
    model, processor = tiny_detector()
    teacher, _ = tiny_detector(seed=1)
    args = make_args(tmp_path, distill_loss="adl", max_steps=2, per_device_train_batch_size=8)
    trainer = SADTrainer(model, teacher, args, labeled, pool, processing_class=processor)
    with caplog.at_level(logging.WARNING, logger="hf_sad.data"):
        result = trainer.train()
    logged = [entry["skipped_images"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [3, 7]  # cumulative
    assert result.metrics["skipped_images"] == 7
    warned = " ".join(r.getMessage() for r in caplog.records)
    for name in names:
        assert bad_values[name]["path"] in warned, name
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_dataloader_workers_report_skips_through_the_batch(tmp_path, labeled, bad_values):
    """With a worker process the collator's own counter is invisible to the trainer; the batch carries the count."""
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good, bad_values["truncated_jpeg"]] * 4, streaming=True)
    model, processor = tiny_detector()
    args = make_args(tmp_path, max_steps=2, dataloader_num_workers=1)
    trainer = SADTrainer(model, None, args, labeled, pool, processing_class=processor)
    result = trainer.train()
    assert result.metrics["skipped_images"] == 2
    assert trainer.data_collator.stats.images_seen == 0  # the collator ran in the worker, not here


def test_too_many_skipped_images_stop_the_run_with_examples(tmp_path, labeled, bad_values):
    good = image_value(jpeg(scene(64, 64)), "good")
    pool = unlabeled_pool([good, bad_values["corrupt_bytes"]] * 4, streaming=True)
    model, processor = tiny_detector()
    args = make_args(tmp_path, max_steps=3, min_images_before_skip_check=4, max_skipped_image_fraction=0.2)
    trainer = SADTrainer(model, None, args, labeled, pool, processing_class=processor)
    with pytest.raises(RuntimeError) as error:
        trainer.train()
    message = str(error.value)
    assert "1 of the 4 training images" in message and "max_skipped_image_fraction=0.2" in message
    assert "'corrupt_bytes.img' sample_index=3" in message


def test_labeled_undecodable_image_stops_training_naming_it_or_is_skipped_when_chosen(tmp_path, bad_values):
    good = image_value(jpeg(scene(64, 64)), "good")
    images = [good, good, bad_values["zero_byte_file"], good]
    data = detection_dataset(images, [{"bbox": [[4, 4, 16, 16]], "category": [0]}] * 4)
    model, processor = tiny_detector()
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match="Could not decode the labeled image .*empty.jpg"):
        SADTrainer(model, None, args, data, processing_class=processor).train()
    args = make_args(tmp_path, max_steps=1, per_device_train_batch_size=4, skip_bad_labeled_images=True)
    result = SADTrainer(model, None, args, data, processing_class=processor).train()
    assert result.metrics["skipped_images"] == 1


LARGE_IMAGE_PROBE = textwrap.dedent("""
    import json, re, sys
    from PIL import Image
    from hf_sad.data import SADDataCollator, decode_image
    from hf_sad.image_processing_sad import SADImageProcessor

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


def test_undecodable_evaluation_image_is_named_or_skipped_when_chosen(tmp_path, labeled, bad_values):
    """Evaluation images reach the collator undecoded too: a bad one is named (not an anonymous datasets error)."""
    good = [{"bytes": jpeg(scene(64, 64)), "path": f"val{i}.jpg"} for i in range(2)]
    evaluation = detection_dataset(good + [bad_values["corrupt_bytes"], bad_values["truncated_jpeg"]],
                                   [{"bbox": [[4, 4, 16, 16]], "category": [0]}] * 4)
    model, processor = tiny_detector()
    args = make_args(tmp_path, per_device_eval_batch_size=2)
    with pytest.raises(ValueError, match="Could not decode the labeled image 'corrupt_bytes.img'"):
        SADTrainer(model, None, args, labeled, eval_dataset=evaluation, processing_class=processor).evaluate()
    args = make_args(tmp_path, per_device_eval_batch_size=2, skip_bad_labeled_images=True)
    trainer = SADTrainer(model, None, args, labeled, eval_dataset=evaluation, processing_class=processor)
    metrics = trainer.evaluate()  # the second batch is all bad: a placeholder that scores no image
    assert 0.0 <= metrics["eval_map"] <= 1.0
