"""Bad annotations: what the training stream, the collator and the processor do with each kind of box and category.

- zero-area and inverted boxes (w or h <= 0): dropped, counted (`num_dropped_boxes`, `dropped_boxes` in the logs),
  warned about once with examples;
- boxes reaching outside the image: clipped; boxes entirely outside: dropped and counted;
- NaN / inf coordinates: an error naming the image (path, image_id or stream position) and the box;
- category ids unknown to the model: an error naming the id and the model's labels;
- images without boxes: valid; duplicate boxes: kept.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from hf_sad.data import SADDataCollator, build_training_stream, clean_boxes
from hf_sad.image_processing_sad import prepare_coco_detection_target
from hf_sad.synthetic import SYNTHETIC_LABELS, synthetic_id2label
from hf_sad.trainer import SADTrainer

from .robust_utils import detection_dataset, image_value, jpeg, make_args, scene, tiny_detector

GOOD_BOX = [8.0, 8.0, 20.0, 16.0]


@pytest.fixture(scope="module")
def processor():
    return tiny_detector()[1]


@pytest.fixture(scope="module")
def picture():
    return image_value(jpeg(scene(64, 64)), "picture")


def collate_boxes(processor, picture, boxes, categories=None, training=True):
    categories = categories if categories is not None else [0] * len(boxes)
    row = {"image": picture, "objects": {"bbox": boxes, "category": categories}, "image_id": 3}
    if training:
        row = {**row, "is_labeled": True, "sample_index": 11}
    collator = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0), id2label=synthetic_id2label())
    return collator, collator([row])


@pytest.mark.parametrize("training", [True, False])
def test_degenerate_and_inverted_boxes_are_dropped_counted_and_warned_once(processor, picture, caplog, training):
    boxes = [GOOD_BOX, [10, 10, 0, 5], [10, 10, 5, 0], [30, 30, -8, 6], [30, 30, 6, -8], [0, 0, 0, 0]]
    with caplog.at_level(logging.WARNING, logger="hf_sad.data"):
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


def test_non_finite_box_in_a_training_dataset_stops_before_any_update_naming_the_image(tmp_path, picture):
    images = [picture, image_value(jpeg(scene(64, 64)), "bad_box_image")]
    objects = [{"bbox": [GOOD_BOX], "category": [0]}, {"bbox": [[1.0, float("nan"), 4.0, 4.0]], "category": [1]}]
    data = detection_dataset(images, objects)
    with pytest.raises(ValueError, match=r"image 'bad_box_image.img'.*bbox \[1.0, nan, 4.0, 4.0\]"):
        list(build_training_stream(data, num_shards=1).take(4))
    model, processor = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=1), data, processing_class=processor)
    with pytest.raises(ValueError, match="bad_box_image.img"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_category_id_is_an_error_naming_the_id_and_the_known_labels(tmp_path, processor, picture):
    with pytest.raises(ValueError) as error:
        collate_boxes(processor, picture, [GOOD_BOX], categories=[7], training=False)
    message = str(error.value)
    assert "category id 7" in message and "'circle'" in message and "image_id=3" in message
    with pytest.raises(ValueError, match="category id -1"):
        collate_boxes(processor, picture, [GOOD_BOX], categories=[-1], training=True)

    # Plain integer categories (no ClassLabel) in a training dataset: refused when the stream reaches the image.
    data = detection_dataset([picture, image_value(jpeg(scene(64, 64)), "odd")],
                             [{"bbox": [GOOD_BOX], "category": [1]}, {"bbox": [GOOD_BOX], "category": [17]}],
                             class_label=False)
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=1), data, processing_class=processor)
    with pytest.raises(ValueError) as error:
        trainer.train()
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


def test_dropped_boxes_are_counted_in_the_training_logs(tmp_path, picture):
    objects = [{"bbox": [GOOD_BOX, [5, 5, -3, 4]], "category": [0, 1]}, {"bbox": [[90, 90, 5, 5]], "category": [2]}]
    data = detection_dataset([picture, image_value(jpeg(scene(64, 64)), "other")], objects)
    model, processor = tiny_detector()
    trainer = SADTrainer(model, None, make_args(tmp_path, max_steps=2, per_device_train_batch_size=2), data,
                         processing_class=processor)
    result = trainer.train()
    assert [e["dropped_boxes"] for e in trainer.state.log_history if "loss" in e] == [2, 4]
    assert result.metrics["dropped_boxes"] == 4
