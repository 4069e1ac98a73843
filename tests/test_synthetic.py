"""Tests of the synthetic scene generator and its datasets (small sizes: these run on a shared 2-core CPU)."""

import json

import numpy as np
import pytest
from datasets import ClassLabel, Image, IterableDataset, List, Value

from hf_sad.data.synthetic import (
    COLOURS,
    SYNTHETIC_LABELS,
    generate_scene,
    make_labeled_dataset,
    make_unlabeled_stream,
    synthetic_id2label,
    synthetic_labels,
    write_coco_folder,
)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_id2label_matches_labels():
    assert synthetic_id2label() == dict(enumerate(SYNTHETIC_LABELS))
    assert 5 <= len(SYNTHETIC_LABELS) <= 6 and len(set(SYNTHETIC_LABELS)) == len(SYNTHETIC_LABELS)


@pytest.mark.parametrize("shifted", [False, True])
def test_same_seed_is_identical(shifted):
    image_a, target_a = generate_scene(7, shifted=shifted)
    image_b, target_b = generate_scene(7, shifted=shifted)
    np.testing.assert_array_equal(_pixels(image_a), _pixels(image_b))
    assert target_a == target_b


def test_different_seeds_differ():
    image_a, target_a = generate_scene(1)
    image_b, target_b = generate_scene(2)
    assert not np.array_equal(_pixels(image_a), _pixels(image_b))
    assert target_a != target_b


@pytest.mark.parametrize("image_size", [96, 128, 160])
def test_boxes_are_valid(image_size):
    counts = np.zeros(len(SYNTHETIC_LABELS), dtype=int)
    for seed in range(40):
        image, target = generate_scene(seed, image_size=image_size, shifted=seed % 2 == 1, max_objects=6)
        assert image.size == (image_size, image_size) and image.mode == "RGB"
        assert 1 <= len(target["bbox"]) <= 6
        assert len(target["bbox"]) == len(target["category"]) == len(target["area"])
        for (x, y, w, h), category, area in zip(target["bbox"], target["category"], target["area"]):
            assert all(isinstance(v, float) for v in (x, y, w, h, area))
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= image_size and y + h <= image_size
            assert area == pytest.approx(w * h)
            assert 0 <= category < len(SYNTHETIC_LABELS)
            # Sizes span small (~6% of the side) to large (~50%).
            assert 0.04 * image_size <= max(w, h) <= 0.55 * image_size
            counts[category] += 1
    assert (counts > 0).all()


def test_objects_overlap_sometimes():
    def intersects(a, b):
        return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]

    overlapping = 0
    for seed in range(40):
        boxes = generate_scene(seed)[1]["bbox"]
        overlapping += any(intersects(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert 0 < overlapping < 40


def test_shifted_domain_differs_in_background_statistics():
    default = np.stack([_pixels(generate_scene(s)[0]) for s in range(16)]).astype(np.float32)
    shifted = np.stack([_pixels(generate_scene(s, shifted=True)[0]) for s in range(16)]).astype(np.float32)
    mean_default, mean_shifted = default.mean((0, 1, 2)), shifted.mean((0, 1, 2))
    assert np.abs(mean_default - mean_shifted).max() > 20  # clearly different mean colour
    assert mean_shifted.mean() < mean_default.mean()  # the shifted palette is darker


def test_labeled_dataset_schema(tmp_path):
    ds = make_labeled_dataset(4, seed=0, image_size=64, cache_dir=str(tmp_path))
    assert len(ds) == 4
    features = ds.features
    assert isinstance(features["image"], Image)
    assert features["image_id"] == Value("int64")
    assert features["width"] == Value("int32") and features["height"] == Value("int32")
    objects = features["objects"]
    assert set(objects) == {"id", "area", "bbox", "category", "iscrowd"}
    assert isinstance(objects["category"], List) and isinstance(objects["category"].feature, ClassLabel)
    assert objects["category"].feature.names == SYNTHETIC_LABELS
    assert objects["bbox"].feature.length == 4

    row = ds[0]
    assert row["image"].size == (64, 64) and row["width"] == row["height"] == 64
    assert len(row["objects"]["bbox"]) == len(row["objects"]["category"]) == len(row["objects"]["id"])
    assert row["objects"]["iscrowd"] == [0] * len(row["objects"]["id"])
    ids = [i for r in ds for i in r["objects"]["id"]]
    assert len(set(ids)) == len(ids) and min(ids) >= 1


def test_splits_are_disjoint_and_reproducible(tmp_path):
    train = make_labeled_dataset(3, seed=0, image_size=48, cache_dir=str(tmp_path / "a"))
    again = make_labeled_dataset(3, seed=0, image_size=48, cache_dir=str(tmp_path / "b"))
    val = make_labeled_dataset(3, seed=1, image_size=48, cache_dir=str(tmp_path / "c"))
    train_px = [_pixels(r["image"]) for r in train]
    for a, b in zip(train_px, [_pixels(r["image"]) for r in again]):
        np.testing.assert_array_equal(a, b)
    for v in (_pixels(r["image"]) for r in val):
        assert not any(np.array_equal(v, t) for t in train_px)


def test_unlabeled_stream_shards():
    stream = make_unlabeled_stream(seed=0, image_size=48, num_shards=4)
    assert isinstance(stream, IterableDataset)
    assert stream.n_shards == 4
    assert set(stream.features) == {"image"} and isinstance(stream.features["image"], Image)
    first = [_pixels(stream.shard(num_shards=4, index=i).take(1).__iter__().__next__()["image"]) for i in range(2)]
    assert not np.array_equal(first[0], first[1])


def test_unlabeled_stream_take_and_limit():
    unlimited = make_unlabeled_stream(image_size=48, num_shards=2)
    rows = list(unlimited.take(5))
    assert len(rows) == 5 and all(r["image"].size == (48, 48) for r in rows)
    limited = make_unlabeled_stream(image_size=48, num_shards=3, num_images=7)
    assert len(list(limited)) == 7
    assert sum(len(list(limited.shard(num_shards=3, index=i))) for i in range(3)) == 7


def test_unlabeled_stream_disjoint_from_labeled(tmp_path):
    labeled = [_pixels(r["image"]) for r in make_labeled_dataset(3, seed=0, image_size=48, cache_dir=str(tmp_path))]
    for row in make_unlabeled_stream(seed=0, image_size=48, num_shards=3).take(6):
        assert not any(np.array_equal(_pixels(row["image"]), px) for px in labeled)


def test_write_coco_folder(tmp_path):
    ds = make_labeled_dataset(3, seed=2, image_size=48, cache_dir=str(tmp_path / "cache"))
    path = write_coco_folder(ds, tmp_path / "coco")
    coco = json.loads(path.read_text())
    assert path == tmp_path / "coco" / "annotations.json"
    assert [c["name"] for c in coco["categories"]] == SYNTHETIC_LABELS
    assert len(coco["images"]) == 3
    assert len(coco["annotations"]) == sum(len(r["objects"]["bbox"]) for r in ds)
    for image in coco["images"]:
        assert (tmp_path / "coco" / "images" / image["file_name"]).is_file()
    first = ds[0]["objects"]
    ann = next(a for a in coco["annotations"] if a["image_id"] == 0)
    assert ann["bbox"] == first["bbox"][0] and ann["category_id"] == first["category"][0] + 1


@pytest.mark.parametrize("shifted", [False, True])
def test_coloured_task_classes_are_shape_and_colour(shifted):
    """24 classes, id = shape * 4 + colour; the object's pixels have its class's hue, in both domains."""
    assert len(synthetic_labels(coloured=True)) == 24 and synthetic_labels(True)[5] == "yellow square"
    hues = {name: hue for name, hue in COLOURS}
    found = 0
    for seed in range(20):
        image, target = generate_scene(seed, image_size=128, coloured=True, shifted=shifted)
        pixels = np.asarray(image.convert("HSV"), dtype=np.float32)
        for (x, y, w, h), category in zip(target["bbox"], target["category"]):
            assert 0 <= category < 24
            colour = synthetic_labels(True)[category].split()[0]
            assert colour == COLOURS[category % 4][0]
            centre = pixels[int(y + h / 2) - 1 : int(y + h / 2) + 1, int(x + w / 2) - 1 : int(x + w / 2) + 1, 0]
            # the centre of an unhidden convex glyph (circle, square, triangle, star) shows the class hue
            if target["category"].count(category) == 1 and category // 4 in (0, 1, 2, 5) and w * h > 200:
                distance = abs(float(np.median(centre)) / 255 - hues[colour])
                found += min(distance, 1 - distance) < 0.08
    assert found >= 10
