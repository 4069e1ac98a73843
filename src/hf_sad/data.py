"""Data for distillation: labeled detection datasets, unlabeled image streams, and the mixed training stream.

Labeled data is the transformers object-detection schema (as in cppe-5 and transformers' object-detection example):
an `image` column and `objects` with `bbox` (COCO x, y, w, h in absolute pixels) and `category` (class ids, ideally a
`ClassLabel` so names can be checked against the model). Unlabeled data is anything with an image column.

Training always reads one stream (`build_training_stream`): the labeled images repeated without end, optionally
interleaved with unlabeled images, each row numbered by `sample_index`. The collator derives each row's augmentation
from that number rather than from the global RNG, so a run resumed from a checkpoint (which replays the stream up to
the checkpoint) sees exactly the pixels an uninterrupted run would have seen. Decoding, box cleaning, augmentation and
collation are `hf_sad.collator`'s (its names are re-exported here).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
from datasets import ClassLabel, Features, List, Value
from datasets import Image as ImageFeature

from .collator import (
    CollationStats,
    SADDataCollator,
    clean_boxes,
    decode_image,
    decode_image_with_scale,
    image_name,
    map_categories,
    objects_as_columns,
)

# The collator's public names are re-exported: they have always been importable from hf_sad.data.
__all__ = [
    "STREAM_FEATURES",
    "CollationStats",
    "SADDataCollator",
    "build_training_stream",
    "category_mapping",
    "clean_boxes",
    "dataset_label_names",
    "decode_image",
    "decode_image_with_scale",
    "detection_features",
    "image_column",
    "load_coco_detection",
    "load_labeled_dataset",
    "load_unlabeled_images",
    "map_categories",
]

logger = logging.getLogger(__name__)

#: Schema of the training stream. Images stay undecoded (bytes/path) until the collator, which decodes them itself so
#: that one corrupt file in an unlabeled pool can be counted and skipped instead of killing a DataLoader worker.
STREAM_FEATURES = Features(
    {
        "image": ImageFeature(decode=False),
        "objects": {"bbox": List(List(Value("float32"), length=4)), "category": List(Value("int64"))},
        "is_labeled": Value("bool"),
    }
)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def load_coco_detection(annotation_file: str | Path, image_dir: str | Path | None = None) -> datasets.Dataset:
    """A COCO detection json + image folder as a `datasets.Dataset` in the transformers detection schema.

    Category ids (any integers) become contiguous `ClassLabel` ids in increasing COCO id order, named by the json's
    `categories`. `image_dir` defaults to `images/` beside the json if it exists, else the json's folder.
    """
    annotation_file = Path(annotation_file)
    coco = json.loads(annotation_file.read_text())
    if image_dir is None:
        image_dir = annotation_file.parent / "images"
        if not image_dir.is_dir():
            image_dir = annotation_file.parent
    image_dir = Path(image_dir)
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise ValueError(f"{annotation_file}: no 'categories'; a COCO detection file must list its classes.")
    to_label = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, dict[str, list]] = {img["id"]: {"bbox": [], "category": [], "area": [], "id": []}
                                             for img in coco["images"]}
    for ann in coco.get("annotations", []):
        if ann["image_id"] not in per_image:
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} refers to unknown image {ann['image_id']}."
            )
        if ann["category_id"] not in to_label:
            raise ValueError(
                f"{annotation_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, which is not in "
                f"'categories' ({sorted(to_label)})."
            )
        objects = per_image[ann["image_id"]]
        objects["bbox"].append([float(v) for v in ann["bbox"]])
        objects["category"].append(to_label[ann["category_id"]])
        objects["area"].append(float(ann.get("area", ann["bbox"][2] * ann["bbox"][3])))
        objects["id"].append(int(ann.get("id", len(objects["id"]))))
    features = detection_features([c["name"] for c in categories])
    rows = {
        "image_id": [img["id"] for img in coco["images"]],
        "image": [str(image_dir / img["file_name"]) for img in coco["images"]],
        "width": [img.get("width", 0) for img in coco["images"]],
        "height": [img.get("height", 0) for img in coco["images"]],
        "objects": [per_image[img["id"]] for img in coco["images"]],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def detection_features(label_names: Sequence[str]) -> Features:
    """The transformers object-detection schema (as cppe-5): `image_id`, `image`, `width`, `height`, and `objects`
    with `id`, `area` (pixels^2), `bbox` (COCO x, y, w, h in absolute pixels) and `category` (a `ClassLabel`)."""
    return Features(
        {
            "image_id": Value("int64"),
            "image": ImageFeature(),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": {
                "id": List(Value("int64")),
                "area": List(Value("float32")),
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(label_names))),
            },
        }
    )


def load_labeled_dataset(source: str | Path, split: str = "train") -> datasets.Dataset:
    """Labeled detection data from a COCO json, a folder, a saved dataset, or the Hub.

    - a `.json` file: COCO annotations (images beside it or in `images/`);
    - a folder with `annotations.json` (or `<split>.json`): COCO;
    - a folder with `metadata.jsonl`: a datasets `imagefolder` (its `objects` column holds the boxes);
    - a folder written by `Dataset.save_to_disk`;
    - anything else: `datasets.load_dataset(source, split=split)` (a Hub id such as `cppe-5`).
    """
    path = Path(source)
    if path.suffix == ".json" and path.is_file():
        return load_coco_detection(path)
    if path.is_dir():
        for name in (f"{split}.json", "annotations.json"):
            if (path / name).is_file():
                return load_coco_detection(path / name)
        if (path / "metadata.jsonl").is_file() or (path / split / "metadata.jsonl").is_file():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        raise ValueError(
            f"{path} is not a labeled dataset: expected a COCO json ({split}.json or annotations.json), an imagefolder "
            "with metadata.jsonl, or a folder written by Dataset.save_to_disk."
        )
    return datasets.load_dataset(str(source), split=split)


def load_unlabeled_images(source: str | Path, split: str = "train", streaming: bool = True) -> datasets.IterableDataset:
    """Unlabeled images as a stream: an image folder, parquet shards (a folder or glob), or a Hub dataset id.

    Store large pools as several parquet shards: a streaming `imagefolder` has a single shard, so it cannot be split
    across processes and workers.
    """
    path = Path(source)
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            ds = datasets.load_dataset("parquet", data_files=parquet, split="train", streaming=streaming)
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", streaming=streaming)
    elif str(source).endswith(".parquet") or "*" in str(source):
        ds = datasets.load_dataset("parquet", data_files=str(source), split="train", streaming=streaming)
    else:
        ds = datasets.load_dataset(str(source), split=split, streaming=streaming)
    return ds if isinstance(ds, datasets.IterableDataset) else ds.to_iterable_dataset()


def dataset_label_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str] | None:
    """Class names of a detection dataset's `objects.category` ClassLabel, or None when categories are plain ints."""
    objects = (dataset.features or {}).get("objects")
    if objects is None:
        return None
    inner = objects if isinstance(objects, Mapping) else getattr(objects, "feature", {})
    category = inner.get("category")  # None when `objects` lacks it (the schema check then names what is missing)
    feature = getattr(category, "feature", category)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def category_mapping(
    dataset: datasets.Dataset | datasets.IterableDataset, id2label: Mapping[int, str]
) -> dict[int, int]:
    """Dataset category id -> model label id, matching by class name. A name the model does not know is an error."""
    names = dataset_label_names(dataset)
    if names is None:
        return {i: i for i in range(len(id2label))}
    label2id = {name: int(i) for i, name in id2label.items()}
    unknown = [n for n in names if n not in label2id]
    if unknown:
        raise ValueError(
            f"The dataset's categories {unknown} are not among the model's labels {sorted(label2id)}. Build the model "
            "with the dataset's class names (id2label), or remap the dataset's categories."
        )
    return {i: label2id[name] for i, name in enumerate(names)}


def image_column(dataset: datasets.Dataset | datasets.IterableDataset) -> str:
    """Name of the (first) image column of a dataset."""
    features = dataset.features or {}
    for name, feature in features.items():
        if isinstance(feature, ImageFeature):
            return name
    if "image" in features or not features:
        return "image"
    raise ValueError(f"No image column found; the dataset has columns {sorted(features)} (expected an Image feature).")


# ----------------------------------------------------------------------------------------------------------------------
# The training stream
# ----------------------------------------------------------------------------------------------------------------------


def _check_labeled_schema(dataset: datasets.Dataset | datasets.IterableDataset, name: str) -> None:
    columns = set(dataset.column_names or [])
    expected = (
        "a labeled detection dataset needs an image column and `objects` with `bbox` (COCO x, y, w, h in pixels) and "
        "`category` (class ids)"
    )
    if "objects" not in columns:
        raise ValueError(f"{name} has columns {sorted(columns)}; {expected}.")
    objects = (dataset.features or {}).get("objects")
    inner = getattr(objects, "feature", objects)  # a list of dicts, or a dict of lists
    if isinstance(inner, Mapping) and not {"bbox", "category"} <= set(inner):
        raise ValueError(f"{name} has `objects` with fields {sorted(inner)}; {expected}.")


def _as_stream_rows(
    dataset: datasets.IterableDataset,
    labeled: bool,
    mapping: Mapping[int, int] | None,
    id2label: Mapping[int, str] | None = None,
):
    column = image_column(dataset)
    dataset = dataset.cast_column(column, ImageFeature(decode=False))

    def to_row(example: dict) -> dict:
        if labeled:
            objects = objects_as_columns(example["objects"])
            where = " ".join([image_name(example[column])] + (
                [f"image_id={example['image_id']}"] if example.get("image_id") is not None else []))
            objects["category"] = map_categories(objects["category"], mapping, id2label, where=f"image {where}")
            for box in objects["bbox"]:  # checked here, where the image's name and id are still known
                if not all(math.isfinite(v) for v in box):
                    raise ValueError(
                        f"Annotation of image {where}: bbox {list(box)} has a NaN or infinite coordinate. Fix or "
                        "remove this box."
                    )
        else:
            objects = {"bbox": [], "category": []}
        return {"image": example[column], "objects": objects, "is_labeled": labeled}

    return dataset.map(to_row, remove_columns=dataset.column_names, features=STREAM_FEATURES)


def build_training_stream(
    labeled: datasets.Dataset | datasets.IterableDataset,
    unlabeled: datasets.IterableDataset | datasets.Dataset | None = None,
    *,
    unlabeled_ratio: float = 0.5,
    category_map: Mapping[int, int] | None = None,
    seed: int = 42,
    num_shards: int = 8,
    shuffle_buffer: int = 1000,
    id2label: Mapping[int, str] | None = None,
) -> datasets.IterableDataset:
    """One endless stream of training rows: labeled images (shuffled, repeated) interleaved with unlabeled images.

    Each row has `image` (undecoded), `objects` (boxes and model label ids; empty for unlabeled rows), `is_labeled`,
    and `sample_index` (its position in the stream). A share `unlabeled_ratio` of the rows is unlabeled on average;
    with 0.5 the two alternate exactly, as in the paper. A finite unlabeled set is repeated as well.

    `num_shards` splits map-style data into that many shards, so that accelerate can give each process whole shards
    (disjoint data) and DataLoader workers can share the work; keep it a multiple of processes x workers.
    `id2label` (the model's labels) makes a category id outside them an error naming the image and the labels.
    """
    _check_labeled_schema(labeled, "train_dataset")
    if isinstance(labeled, datasets.Dataset):
        labeled = labeled.to_iterable_dataset(num_shards=min(num_shards, max(1, len(labeled))))
    stream = _as_stream_rows(labeled, True, category_map, id2label)
    stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer).repeat(None)
    if unlabeled is not None and unlabeled_ratio > 0:
        if isinstance(unlabeled, datasets.Dataset):
            unlabeled = unlabeled.to_iterable_dataset(num_shards=min(num_shards, max(1, len(unlabeled))))
        unlabeled_rows = _as_stream_rows(unlabeled, False, None).repeat(None)
        if unlabeled_ratio == 0.5:
            stream = datasets.interleave_datasets([stream, unlabeled_rows], stopping_strategy="all_exhausted")
        else:
            stream = datasets.interleave_datasets(
                [stream, unlabeled_rows],
                probabilities=[1 - unlabeled_ratio, unlabeled_ratio],
                seed=seed,
                stopping_strategy="all_exhausted",
            )
    features = STREAM_FEATURES.copy()
    features["sample_index"] = Value("int64")
    return stream.map(lambda _, index: {"sample_index": index}, with_indices=True, features=features)
