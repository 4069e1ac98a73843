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

import datasets
import pytest
import torch
from datasets import ClassLabel

from hf_sad.cli import main
from hf_sad.collator import SADDataCollator
from hf_sad.data import (
    build_training_stream,
    category_mapping,
    dataset_label_names,
    load_coco_detection,
    load_labeled_dataset,
    load_unlabeled_images,
)
from hf_sad.synthetic import (
    SYNTHETIC_LABELS,
    make_unlabeled_stream,
    synthetic_id2label,
    write_coco_folder,
)
from hf_sad.trainer import SADTrainer

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

    renamed = labeled.cast_column("objects", datasets.Features({
        "id": datasets.List(datasets.Value("int64")), "area": datasets.List(datasets.Value("float32")),
        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "category": datasets.List(datasets.ClassLabel(names=[f"x{i}" for i in range(len(SYNTHETIC_LABELS))]))}))
    with pytest.raises(ValueError, match=r"categories \['x0', .*not among the model's labels"):
        SADTrainer(student, None, args, renamed, processing_class=processor)
    with pytest.raises(ValueError, match="eval_dataset classes"):
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
