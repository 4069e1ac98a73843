"""Data (`hf_sad.data`): every data source of SADTrainer loaded right, the training stream, and the dataset schema.

Labeled: a COCO json + image folder (generated, and the real BCCD set in ../shared), a `datasets` dataset in the
transformers detection schema (in memory and `save_to_disk`), an `imagefolder` with `metadata.jsonl`. Unlabeled: an
image folder and parquet shards. Each is carried by `build_training_stream` + `SADDataCollator` to a batch the model
accepts. The training stream mixes labeled and unlabeled rows and numbers them, and stops at a non-finite box before
any update. Plus the category mapping by class name, and datasets without the expected columns refused (by
`SADTrainer` and by the CLI) with the schema and the columns found. Images are 64 px and the model is the tiny
ResNet-18 of tests/utils.py, so everything runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from datasets import ClassLabel

from hf_sad.cli import main
from hf_sad.data import (
    build_training_stream,
    category_mapping,
    check_labeled_dataset,
    dataset_label_names,
    detection_features,
    load_coco_detection,
    load_labeled_dataset,
    load_unlabeled_images,
)
from hf_sad.data.collator import SADDataCollator
from hf_sad.data.synthetic import (
    SYNTHETIC_LABELS,
    make_unlabeled_stream,
    synthetic_id2label,
    write_coco_folder,
)
from hf_sad.training.trainer import SADTrainer

from .utils import (
    BCCD,
    GOOD_BOX,
    IMAGE_SIZE,
    TINY_CLI,
    assert_nothing_trained,
    detection_dataset,
    image_value,
    jpeg,
    make_args,
    scene,
    tiny_detector,
)

BCCD_LABELS = ["RBC", "WBC", "Platelets"]


@pytest.fixture(scope="module")
def detector():
    return tiny_detector()


def boxes_and_categories(dataset) -> list[tuple[list, list]]:
    return [(o["bbox"], o["category"]) for o in dataset["objects"]]


def one_training_batch(detector, labeled, unlabeled=None, category_map=None, rows=4, **collator_kwargs):
    """Stream rows -> collator -> one forward with labels. Returns (stream rows, batch, outputs)."""
    model, processor = detector
    stream = build_training_stream(labeled, unlabeled, category_map=category_map, num_shards=2, shuffle_buffer=1)
    stream_rows = list(stream.take(rows))
    batch = SADDataCollator(processor, category_map=category_map, **collator_kwargs)(stream_rows)
    assert batch["pixel_values"].shape[:2] == (rows, 3) and batch["pixel_mask"].shape[0] == rows
    assert len(batch["labels"]) == rows
    with torch.no_grad():
        outputs = model.train()(
            pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]
        )
    assert torch.isfinite(outputs.loss), outputs.loss
    return stream_rows, batch, outputs


def assert_labels_are_the_boxes(stream_rows, batch):
    """Without augmentation, the collated labels are the rows' boxes (xywh pixels) as normalised cxcywh."""
    for row, labels in zip(stream_rows, batch["labels"]):
        boxes = torch.tensor(row["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4)
        height, width = labels["orig_size"].tolist()
        expected = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], dim=1) / torch.tensor(
            [width, height, width, height]
        )
        torch.testing.assert_close(labels["boxes"], expected, rtol=0, atol=1e-5)
        assert labels["class_labels"].tolist() == row["objects"]["category"]


# ----------------------------------------------------------------------------------------------------------------------
# Labeled: COCO json + image folder
# ----------------------------------------------------------------------------------------------------------------------


def test_coco_folder_round_trips_boxes_categories_and_names(tmp_path, labeled, detector):
    annotations = write_coco_folder(labeled, tmp_path / "coco")
    for loaded in (load_labeled_dataset(tmp_path / "coco"), load_coco_detection(annotations)):
        assert len(loaded) == len(labeled)
        assert dataset_label_names(loaded) == SYNTHETIC_LABELS
        assert boxes_and_categories(loaded) == boxes_and_categories(labeled)
        assert loaded[0]["image"].size == (64, 64)
    rows, batch, _ = one_training_batch(detector, loaded, hflip_prob=0.0, scale_range=(1.0, 1.0))
    assert batch["is_labeled"].all()
    assert_labels_are_the_boxes(rows, batch)


def test_coco_category_ids_become_contiguous_class_labels_in_id_order(tmp_path, labeled):
    """COCO ids need not start at 0 or be contiguous: they become ClassLabel ids 0..C-1 in increasing id order."""
    path = write_coco_folder(labeled, tmp_path / "coco")
    coco = json.loads(path.read_text())
    sparse = {i + 1: 100 - 10 * i for i in range(len(SYNTHETIC_LABELS))}  # 1 -> 100, 2 -> 90, ... (reversed order)
    for category in coco["categories"]:
        category["id"] = sparse[category["id"]]
    for annotation in coco["annotations"]:
        annotation["category_id"] = sparse[annotation["category_id"]]
    path.write_text(json.dumps(coco))
    loaded = load_labeled_dataset(path)
    assert dataset_label_names(loaded) == SYNTHETIC_LABELS[::-1]  # sorted by COCO id: 50 (star) ... 100 (circle)
    last = len(SYNTHETIC_LABELS) - 1
    for (boxes, categories), (want_boxes, want_categories) in zip(
        boxes_and_categories(loaded), boxes_and_categories(labeled)
    ):
        assert boxes == want_boxes and categories == [last - c for c in want_categories]
    names = loaded.features["objects"]["category"].feature.names
    original = labeled.features["objects"]["category"].feature.names
    for got, want in zip(loaded["objects"], labeled["objects"]):
        assert [names[c] for c in got["category"]] == [original[c] for c in want["category"]]


def test_coco_annotation_with_undeclared_category_is_an_error(tmp_path, labeled):
    path = write_coco_folder(labeled, tmp_path / "coco")
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 77
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="category_id 77"):
        load_coco_detection(path)


def test_real_coco_dataset_bccd():
    for split, num_images, num_boxes in (("train", 291, 3879), ("val", 73, 1007)):
        dataset = load_labeled_dataset(BCCD, split=split)
        coco = json.loads((BCCD / f"{split}.json").read_text())
        assert len(dataset) == num_images and dataset_label_names(dataset) == BCCD_LABELS
        assert isinstance(dataset.features["objects"]["category"].feature, ClassLabel)
        # COCO ids 1 RBC, 2 WBC, 3 Platelets -> ClassLabel 0, 1, 2; boxes unchanged (COCO xywh pixels), per image.
        expected = {img["id"]: ([], []) for img in coco["images"]}
        for annotation in coco["annotations"]:
            expected[annotation["image_id"]][0].append(annotation["bbox"])
            expected[annotation["image_id"]][1].append(annotation["category_id"] - 1)
        assert sum(len(o["bbox"]) for o in dataset["objects"]) == num_boxes
        for image_id, objects in zip(dataset["image_id"], dataset["objects"]):
            assert objects["bbox"] == expected[image_id][0] and objects["category"] == expected[image_id][1]
    assert dataset[0]["image"].size == (640, 480)


def test_bccd_through_stream_and_collator_to_a_model_with_its_classes():
    dataset = load_labeled_dataset(BCCD, split="val").select(range(3))
    # A model whose classes are BCCD's in another order: categories are mapped by name.
    detector = tiny_detector(id2label={0: "WBC", 1: "Platelets", 2: "RBC"})
    mapping = category_mapping(dataset, detector[0].config.id2label)
    assert mapping == {0: 2, 1: 0, 2: 1}
    rows, batch, _ = one_training_batch(detector, dataset, category_map=mapping, rows=2)
    for row, labels in zip(rows, batch["labels"]):
        # The collator's scale jitter resized 640 x 480 to the model's 64 x 64 times a factor in [0.8, 1.2].
        height, width = labels["orig_size"].tolist()
        assert height == width and 51 <= height <= 77
        assert len(labels["class_labels"]) == len(row["objects"]["bbox"]) > 0
    # Evaluation rows (no stream) are mapped by the collator itself.
    eval_batch = SADDataCollator(detector[1], category_map=mapping)([dataset[0]])
    assert eval_batch["labels"][0]["class_labels"].tolist() == [mapping[c] for c in dataset[0]["objects"]["category"]]


# ----------------------------------------------------------------------------------------------------------------------
# Labeled: a datasets dataset (in memory, save_to_disk), an imagefolder with metadata.jsonl
# ----------------------------------------------------------------------------------------------------------------------


def test_datasets_dataset_in_memory_and_saved_to_disk(tmp_path, labeled, detector):
    rows, batch, _ = one_training_batch(detector, labeled, hflip_prob=0.0, scale_range=(1.0, 1.0))
    assert_labels_are_the_boxes(rows, batch)
    labeled.save_to_disk(str(tmp_path / "saved"))
    loaded = load_labeled_dataset(tmp_path / "saved")
    assert loaded.features == labeled.features and boxes_and_categories(loaded) == boxes_and_categories(labeled)
    one_training_batch(detector, loaded)


def test_imagefolder_with_metadata_jsonl(tmp_path, labeled, detector):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    with (folder / "metadata.jsonl").open("w") as metadata:
        for row in labeled:
            file_name = f"{row['image_id']:03d}.png"
            row["image"].save(folder / file_name)
            objects = {"bbox": row["objects"]["bbox"], "category": row["objects"]["category"]}
            metadata.write(json.dumps({"file_name": file_name, "objects": objects}) + "\n")
    loaded = load_labeled_dataset(folder, split="train")
    assert len(loaded) == len(labeled)
    by_size = sorted(boxes_and_categories(loaded)), sorted(boxes_and_categories(labeled))
    assert by_size[0] == by_size[1]
    assert dataset_label_names(loaded) is None  # plain integer categories: used as model label ids as they are
    assert category_mapping(loaded, synthetic_id2label()) == {i: i for i in range(len(SYNTHETIC_LABELS))}
    rows, batch, _ = one_training_batch(detector, loaded, hflip_prob=0.0, scale_range=(1.0, 1.0))
    assert_labels_are_the_boxes(rows, batch)


# ----------------------------------------------------------------------------------------------------------------------
# Unlabeled: an image folder, parquet shards
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlabeled_images():
    return [row["image"] for row in make_unlabeled_stream(image_size=IMAGE_SIZE, num_images=8)]


def test_unlabeled_image_folder(tmp_path, labeled, unlabeled_images, detector):
    folder = tmp_path / "pool"
    (folder / "nested").mkdir(parents=True)
    for k, image in enumerate(unlabeled_images[:5]):
        image.save(folder / ("nested" if k % 2 else ".") / f"{k}.png")
    stream = load_unlabeled_images(folder)
    assert isinstance(stream, datasets.IterableDataset) and stream.n_shards == 1  # imagefolder: one shard, always
    assert len(list(stream)) == 5
    rows, batch, _ = one_training_batch(detector, labeled, stream, rows=4)
    assert batch["is_labeled"].tolist() == [True, False, True, False]
    assert [len(labels["class_labels"]) for labels in batch["labels"][1::2]] == [0, 0]


def test_unlabeled_parquet_shards(tmp_path, labeled, unlabeled_images, detector, monkeypatch):
    # datasets waits this long (default 5 s) for PyArrow's reader threads whenever a stream mixing in parquet shards
    # is closed; every iteration below closes one.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2)
    folder = tmp_path / "parquet"
    folder.mkdir()
    features = datasets.Features({"image": datasets.Image()})
    for k in range(4):
        shard = datasets.Dataset.from_dict({"image": unlabeled_images[2 * k: 2 * k + 2]}, features=features)
        shard.to_parquet(str(folder / f"shard-{k:02d}.parquet"))
    stream = load_unlabeled_images(folder)
    assert stream.n_shards == 4  # one shard per file: processes and workers get whole files
    assert len(list(stream)) == 8
    assert load_unlabeled_images(str(folder / "*.parquet")).n_shards == 4
    assert len(list(load_unlabeled_images(str(folder / "shard-00.parquet")))) == 2

    rows, batch, _ = one_training_batch(detector, labeled, stream, rows=4)
    assert batch["is_labeled"].tolist() == [True, False, True, False]
    # Two processes, as accelerate shards a datasets stream (whole shards per rank): disjoint unlabeled images.
    training = build_training_stream(labeled, stream, num_shards=2)
    assert training.n_shards == 2
    seen = []
    for rank in range(2):
        part = training.shard(num_shards=2, index=rank)
        seen.append({row["image"]["bytes"] for row in part.take(12) if not row["is_labeled"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


# ----------------------------------------------------------------------------------------------------------------------
# The training stream
# ----------------------------------------------------------------------------------------------------------------------


def test_stream_mixes_labeled_and_unlabeled_and_numbers_rows(labeled):
    stream = build_training_stream(labeled, make_unlabeled_stream(image_size=IMAGE_SIZE), unlabeled_ratio=0.5)
    rows = list(stream.take(8))
    assert [r["is_labeled"] for r in rows] == [True, False] * 4  # 0.5 alternates exactly, as in the paper
    assert [r["sample_index"] for r in rows] == list(range(8))
    assert all(len(r["objects"]["bbox"]) == 0 for r in rows if not r["is_labeled"])


def test_non_finite_box_in_a_training_dataset_stops_before_the_first_step_naming_the_image(tmp_path, picture):
    images = [picture, image_value(jpeg(scene(64, 64)), "bad_box_image")]
    objects = [{"bbox": [GOOD_BOX], "category": [0]}, {"bbox": [[1.0, float("nan"), 4.0, 4.0]], "category": [1]}]
    data = detection_dataset(images, objects)
    with pytest.raises(ValueError, match=r"image 'bad_box_image.img'.*bbox \[1.0, nan, 4.0, 4.0\]"):
        list(build_training_stream(data, num_shards=1).take(4))
    model, processor = tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="bad_box_image.img"):  # found before the first step
        SADTrainer(model, None, make_args(tmp_path, max_steps=1), data, processing_class=processor).train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------------
# Categories and schema errors
# ----------------------------------------------------------------------------------------------------------------------


def test_category_mapping_matches_class_names_not_positions(labeled):
    reordered = dict(enumerate(reversed(SYNTHETIC_LABELS)))
    mapping = category_mapping(labeled, reordered)
    last = len(SYNTHETIC_LABELS) - 1
    assert mapping == {i: last - i for i in range(len(SYNTHETIC_LABELS))}
    model, processor = tiny_detector(id2label=reordered)
    stream_rows = list(build_training_stream(labeled, category_map=mapping, shuffle_buffer=1).take(2))
    batch = SADDataCollator(processor, category_map=mapping)(stream_rows)
    by_name = {name: i for i, name in reordered.items()}
    # The label ids in the batch name the same classes as the dataset's ids (rows found by their first box).
    names = labeled.features["objects"]["category"].feature.names
    source = {tuple(o["bbox"][0]): o["category"] for o in labeled["objects"]}
    for row, labels in zip(stream_rows, batch["labels"]):
        original = source[tuple(row["objects"]["bbox"][0])]
        assert labels["class_labels"].tolist() == [by_name[names[c]] for c in original]


def test_dataset_class_unknown_to_the_model_is_an_error_naming_it(labeled):
    id2label = {0: "circle", 1: "square"}
    with pytest.raises(ValueError) as err:
        category_mapping(labeled, id2label)
    message = str(err.value)
    assert "'triangle'" in message and "'star'" in message  # the unknown dataset classes
    assert "['circle', 'square']" in message  # the model's labels


def test_train_dataset_without_objects_is_an_error_listing_schema_and_columns(tmp_path, labeled, detector):
    model, processor = detector
    captions = datasets.Dataset.from_dict(
        {"image": list(labeled["image"][:2]), "caption": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    args = make_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError) as err:
        SADTrainer(model, None, args, captions, processing_class=processor)
    message = str(err.value)
    assert "train_dataset" in message and "['caption', 'image']" in message  # the columns found
    assert "`objects`" in message and "`bbox`" in message and "`category`" in message  # the expected schema


def test_datasets_without_the_expected_columns_are_refused_listing_schema_and_columns(tmp_path, labeled):
    student, processor = tiny_detector()
    args = make_args(tmp_path)
    no_objects = labeled.remove_columns("objects")
    with pytest.raises(ValueError) as error:
        SADTrainer(student, None, args, no_objects, processing_class=processor)
    message = str(error.value)
    assert "['height', 'image', 'image_id', 'width']" in message and "`objects` with `bbox`" in message

    wrong_fields = datasets.Dataset.from_dict(
        {"image": [labeled[0]["image"]], "objects": [{"boxes": [[1.0, 1.0, 4.0, 4.0]], "labels": [0]}]})
    with pytest.raises(ValueError, match=r"`objects` with fields \['boxes', 'labels'\].*`bbox`"):
        SADTrainer(student, None, args, wrong_fields, processing_class=processor)

    no_image = labeled.remove_columns("image")
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['height', 'image_id'"):
        SADTrainer(student, None, args, no_image, processing_class=processor)

    captions = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['text'\]"):
        SADTrainer(student, None, args, labeled, captions, processing_class=processor)

    streaming = labeled.to_iterable_dataset()
    with pytest.raises(ValueError, match="streaming train_dataset has no length: set max_steps"):
        SADTrainer(student, None, make_args(tmp_path, max_steps=-1), streaming, processing_class=processor)

    renamed = labeled.cast(detection_features([f"x{i}" for i in range(len(SYNTHETIC_LABELS))]))
    with pytest.raises(ValueError, match=r"train_dataset: categories \['x0', .*not among the model's labels"):
        SADTrainer(student, None, args, renamed, processing_class=processor)
    with pytest.raises(ValueError, match=r"eval_dataset: categories \['x0', .*not among the model's labels"):
        SADTrainer(student, None, args, labeled, eval_dataset=renamed, processing_class=processor)


def test_cli_refuses_datasets_without_the_expected_columns(tmp_path, labeled, saved_teacher):
    labeled.remove_columns("objects").save_to_disk(str(tmp_path / "no_objects"))
    cli = [arg for arg in TINY_CLI if arg != "synthetic:4"]
    cli[cli.index("--train_data") + 1:cli.index("--train_data") + 1] = [str(tmp_path / "no_objects")]
    with pytest.raises(ValueError, match=r"train_dataset has columns \['height', 'image', 'image_id', 'width'\]"):
        main(["train", "--output_dir", str(tmp_path / "cli"), *cli])
    assert_nothing_trained(tmp_path / "cli")

    (tmp_path / "pool").mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(tmp_path / "pool" / "part-0.parquet"))
    with pytest.raises(ValueError, match=r"No image column found; the dataset has columns \['text'\]"):
        main(["distill", "--teacher", str(saved_teacher), "--unlabeled_data", str(tmp_path / "pool"),
              "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert_nothing_trained(tmp_path / "cli")


# ----------------------------------------------------------------------------------------------------------------------
# COCO files as they come, and the layouts users have
# ----------------------------------------------------------------------------------------------------------------------


def write_coco(folder, images, annotations, categories=({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}),
               name="annotations.json", image_dir="images"):
    """A COCO json with the given entries; every image entry gets a real 64 px file in `image_dir`."""
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    for image in images:
        if "file_name" in image:
            scene(64, 64).save(folder / image_dir / image["file_name"])
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return path


def image_entry(image_id, **extra):
    return {"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64, **extra}


def test_coco_iscrowd_is_kept_through_dataset_stream_and_collator(tmp_path, detector):
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 30, 30, 30], "iscrowd": 1, "area": 500}]
    dataset = load_coco_detection(write_coco(tmp_path, [image_entry(1)], annotations))
    objects = dataset[0]["objects"]
    assert objects["iscrowd"] == [0, 1] and objects["area"] == [400.0, 500.0]  # a crowd's own area is kept
    model, processor = detector
    mapping = category_mapping(dataset, {0: "circle", 1: "square"})
    rows = list(build_training_stream(dataset, category_map=mapping, num_shards=1).take(1))
    assert rows[0]["objects"]["iscrowd"] == [0, 1]
    batch = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))(rows)
    assert batch["labels"][0]["iscrowd"].tolist() == [0, 1]
    evaluation = SADDataCollator(processor, category_map=mapping)(list(dataset.cast_column(
        "image", datasets.Image(decode=False))))
    assert evaluation["labels"][0]["iscrowd"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        ({"bbox": [1, 2, 3]},
         r"annotation 7 \(image_id 1\): bbox must be \[x, y, w, h\] \(4 numbers\), got \[1, 2, 3\]"),
        ({"bbox": [1, 2, 3, 4, 5]}, r"annotation 7 \(image_id 1\).*4 numbers\), got \[1, 2, 3, 4, 5\]"),
        ({"bbox": ["1", "2", "a", "4"]}, r"annotation 7 \(image_id 1\).*must hold 4 numbers"),
        ({"bbox": None}, r"annotation 7 \(image_id 1\).*got None"),
        ({"bbox": "1 2 3 4"}, r"annotation 7 \(image_id 1\).*got '1 2 3 4'"),
        ({"bbox": [1, 2, 3, 4], "category_id": "1"}, r"annotation 7 \(image_id 1\): category_id '1' is not one of"),
        ({"bbox": [1, 2, 3, 4], "category_id": 9}, r"annotation 7 \(image_id 1\): category_id 9 is not one of the ids"),
        ({"bbox": [1, 2, 3, 4], "image_id": 5}, r"annotation 7 refers to image_id 5, which is not in 'images'"),
        ({"bbox": [1, 2, 3, 4], "iscrowd": 2}, r"annotation 7 \(image_id 1\): iscrowd must be 0 or 1"),
        ({}, r"annotation 7 \(image_id 1\) has no 'bbox'"),
    ],
    ids=["3_numbers", "5_numbers", "strings", "null", "a_string", "string_category", "unknown_category",
         "unknown_image", "bad_iscrowd", "missing_bbox"],
)
def test_malformed_coco_annotations_name_the_file_the_ids_and_the_problem(tmp_path, annotation, expected):
    path = write_coco(tmp_path, [image_entry(1)], [{"id": 7, "image_id": 1, "category_id": 1, **annotation}])
    with pytest.raises(ValueError, match=rf"{path}: {expected}"):
        load_coco_detection(path)


def test_duplicate_coco_image_ids_are_an_error_naming_them(tmp_path):
    images = [image_entry(1), image_entry(2), {**image_entry(1), "file_name": "other.png"}]
    path = write_coco(tmp_path, images, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(ValueError, match=r"1 image id\(s\) appear more than once in 'images' \(e.g. \[1\]\)"):
        load_coco_detection(path)


def test_normalised_boxes_and_wrong_image_sizes_are_warned_about_with_counts(tmp_path, detector, caplog):
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [0.1, 0.2, 0.3, 0.4]} for i in (1, 2)]
    images = [image_entry(1), image_entry(2, width=640, height=480)]  # the files are 64 x 64
    path = write_coco(tmp_path, images, annotations)
    with caplog.at_level(logging.WARNING, logger="hf_sad"):
        dataset = load_coco_detection(path)
    assert "all 2 boxes have every coordinate in [0, 1]" in caplog.text and "look normalised" in caplog.text
    caplog.clear()
    model, processor = detector
    with caplog.at_level(logging.WARNING, logger="hf_sad"):
        SADTrainer(model, None, make_args(tmp_path), dataset, processing_class=processor)
    assert "1 of 2 images have another size in their annotation file than on disk" in caplog.text
    assert "640x480 in the data, 64x64 in the file" in caplog.text


def test_missing_image_files_are_found_before_the_first_step(tmp_path, detector):
    path = write_coco(tmp_path, [image_entry(i) for i in range(1, 4)],
                      [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    for name in ("2.png", "3.png"):
        (tmp_path / "images" / name).unlink()
    model, processor = detector
    with pytest.raises(FileNotFoundError, match=r"train_dataset: 2 of 3 image files do not exist, e\.g\. .*2\.png"):
        SADTrainer(model, None, make_args(tmp_path), load_coco_detection(path), processing_class=processor)


def test_objects_null_and_malformed_rows_of_a_dataset_are_named(tmp_path, detector, picture):
    model, processor = detector
    for objects, expected in [
        (None, "`objects` is null"),
        ({"bbox": [[1.0, 2.0, 3.0]], "category": [0]}, r"objects\[0\]: bbox must be \[x, y, w, h\]"),
        ({"bbox": [GOOD_BOX], "category": ["circle"]}, r"objects\[0\] category must be an integer id, got 'circle'"),
    ]:
        data = datasets.Dataset.from_dict({"image": [picture], "objects": [objects], "image_id": [4]})
        with pytest.raises(ValueError, match=rf"train_dataset row 0 \('picture.img', image_id=4\).*{expected}"):
            SADTrainer(model, None, make_args(tmp_path), data, processing_class=processor)
    data = datasets.Dataset.from_dict({"image": [picture], "objects": [{"bbox": [GOOD_BOX]}]})
    with pytest.raises(ValueError, match=r"train_dataset has `objects` with fields \['bbox'\]"):
        SADTrainer(model, None, make_args(tmp_path), data, processing_class=processor)


def test_standard_coco_layout_is_found_and_image_dir_is_an_option(tmp_path, detector):
    root = tmp_path / "coco"
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20]}]
    path = write_coco(root, [image_entry(1)], annotations, name="annotations/instances_val2017.json",
                      image_dir="val2017")
    for source in (path, root):  # the json itself, or the dataset folder with split val2017
        dataset = load_labeled_dataset(source, split="val2017")
        assert dataset[0]["image"].size == (64, 64)  # decodes: the images were found in val2017/
    elsewhere = write_coco(tmp_path / "other", [image_entry(1)], annotations, image_dir="pictures")
    misplaced = load_labeled_dataset(elsewhere)  # looks beside the json, where the images are not
    with pytest.raises(FileNotFoundError, match=r"1 of 1 image files do not exist.*--train_image_dir"):
        check_labeled_dataset(misplaced, "train_dataset")
    assert load_labeled_dataset(elsewhere, image_dir=elsewhere.parent / "pictures")[0]["image"].size == (64, 64)


def test_saved_dataset_dict_and_labeled_parquet_layouts(tmp_path, labeled):
    datasets.DatasetDict({"train": labeled, "validation": labeled.select(range(2))}).save_to_disk(
        str(tmp_path / "dict"))
    assert len(load_labeled_dataset(tmp_path / "dict", split="validation")) == 2
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train', 'validation'\]; there is no split"):
        load_labeled_dataset(tmp_path / "dict", split="test")

    (tmp_path / "hub" / "data").mkdir(parents=True)
    labeled.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    labeled.select(range(3)).to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    folder = load_labeled_dataset(tmp_path / "hub", split="validation")
    single = load_labeled_dataset(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    glob = load_labeled_dataset(str(tmp_path / "hub" / "data" / "*.parquet"))
    assert (len(folder), len(single), len(glob)) == (3, len(labeled), len(labeled) + 3)
    assert dataset_label_names(single) == SYNTHETIC_LABELS  # the ClassLabel names travel in the parquet schema


@pytest.mark.parametrize("source", ["coco/train.json", "./data", "/nowhere/at/all", "data/train/part.parquet"])
def test_local_paths_that_do_not_exist_are_missing_paths_not_hub_ids(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{source}: no such"):
        load_labeled_dataset(source)
    with pytest.raises(FileNotFoundError, match=f"{source}: no such"):
        load_unlabeled_images(source)


def test_a_missing_folder_inside_a_local_folder_is_a_missing_path_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pets").mkdir()  # "pets/train" reads as the Hub id pets/train unless pets/ is here
    with pytest.raises(FileNotFoundError, match="pets/train: no such file or folder"):
        load_labeled_dataset("pets/train")
    with pytest.raises(FileNotFoundError, match="pets/train: no such file or folder"):
        load_unlabeled_images("pets/train")


def test_empty_sources_are_errors_naming_them(tmp_path, labeled, detector):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"The unlabeled folder {tmp_path / 'pool'} is empty"):
        load_unlabeled_images(tmp_path / "pool")
    empty_coco = write_coco(tmp_path / "none", [], [])
    with pytest.raises(ValueError, match="is empty: 0 labeled images"):
        load_labeled_dataset(empty_coco)
    model, processor = detector
    with pytest.raises(ValueError, match="train_dataset is empty"):
        SADTrainer(model, None, make_args(tmp_path), labeled.select([]), processing_class=processor)

    def nothing():
        yield from ()

    features = datasets.Features({"image": datasets.Image()})
    empty_stream = datasets.IterableDataset.from_generator(nothing, features=features)
    with pytest.raises(ValueError, match="unlabeled_dataset is empty"):
        SADTrainer(model, tiny_detector(seed=1)[0], make_args(tmp_path, distill_loss="adl"), labeled, empty_stream,
                   processing_class=processor)
    with pytest.raises(ValueError, match="unlabeled_ratio=0 would never read it"):
        args = make_args(tmp_path, distill_loss="adl", unlabeled_ratio=0.0)
        SADTrainer(model, tiny_detector(seed=1)[0], args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                   processing_class=processor)


def test_a_corrupt_parquet_shard_is_named_before_training(tmp_path, unlabeled_images):
    folder = tmp_path / "shards"
    folder.mkdir()
    pool = datasets.Dataset.from_dict({"image": unlabeled_images}, features=datasets.Features(
        {"image": datasets.Image()}))
    for shard in range(2):
        pool.shard(2, shard).to_parquet(str(folder / f"part-{shard}.parquet"))
    data = (folder / "part-1.parquet").read_bytes()
    (folder / "part-1.parquet").write_bytes(data[: len(data) // 2])  # truncated mid-file
    with pytest.raises(ValueError, match=r"The parquet shard .*part-1\.parquet cannot be read"):
        load_unlabeled_images(folder)
    with pytest.raises(ValueError, match=r"The parquet shard .*part-1\.parquet cannot be read"):
        load_unlabeled_images(str(folder / "*.parquet"))


def test_a_corrupt_labeled_parquet_file_is_named(tmp_path, labeled):
    labeled.to_parquet(str(tmp_path / "train.parquet"))
    data = (tmp_path / "train.parquet").read_bytes()
    (tmp_path / "train.parquet").write_bytes(data[: len(data) // 2])
    for source in (tmp_path / "train.parquet", str(tmp_path / "*.parquet")):
        with pytest.raises(ValueError, match=r"The parquet shard .*train\.parquet cannot be read"):
            load_labeled_dataset(source)
