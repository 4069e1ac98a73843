"""Labeled detection datasets and unlabeled image sources, loaded from what users have and checked before training.

Labeled data is the transformers object-detection schema (as in cppe-5 and transformers' object-detection example):
an `image` column and `objects` with `bbox` (COCO x, y, w, h in absolute pixels) and `category` (class ids, ideally a
`ClassLabel` so names can be checked against the model). Unlabeled data is anything with an image column.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from tqdm.auto import tqdm

from ..hub import is_hub_id, looks_like_local_path
from .collator import IMAGE_SUFFIXES, checked_box, decode_image, image_name, map_categories, objects_as_columns

__all__ = [
    "LABELED_LAYOUTS",
    "category_mapping",
    "check_labeled_dataset",
    "check_labeled_schema",
    "check_parquet_shards",
    "coco_image_dir",
    "dataset_label_names",
    "detection_features",
    "first_images",
    "image_column",
    "load_coco_detection",
    "load_labeled_dataset",
    "load_unlabeled_images",
    "parquet_files",
    "with_model_categories",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def load_coco_detection(annotation_file: str | Path, image_dir: str | Path | None = None) -> datasets.Dataset:
    """A COCO detection json + image folder as a `datasets.Dataset` in the transformers detection schema.

    Category ids (any integers) become contiguous `ClassLabel` ids in increasing COCO id order, named by the json's
    `categories`; `iscrowd` is kept per object (crowd regions are ignored in training and treated as COCO does in
    evaluation). `image_dir` defaults to `images/` beside the json; for the standard COCO layout
    (`annotations/instances_val2017.json`) to the folder named after the split beside `annotations/` (`val2017/`);
    else to the json's folder.

    Every malformed entry (duplicate image ids, a bbox that is not 4 numbers, a string or unknown category id, an
    annotation of an unknown image) is a ValueError naming the file, the image / annotation id and what is wrong.
    Boxes that all look normalised (every coordinate <= 1 in images larger than that) are warned about.
    """
    annotation_file = Path(annotation_file)
    if not annotation_file.is_file():
        raise FileNotFoundError(f"{annotation_file}: no such COCO annotation file.")
    try:
        coco = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{annotation_file} is not a JSON file: {error}") from error
    if not isinstance(coco, Mapping) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{annotation_file}: expected a COCO detection file, a JSON object with an 'images' list.")
    image_dir = Path(image_dir) if image_dir is not None else coco_image_dir(annotation_file)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{annotation_file}: its image folder {image_dir} does not exist; pass image_dir.")

    names, to_label = _coco_categories(coco, annotation_file)
    images = _coco_images(coco["images"], annotation_file)
    per_image = {img["id"]: {"bbox": [], "category": [], "area": [], "id": [], "iscrowd": []} for img in images}
    annotations = coco.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"{annotation_file}: 'annotations' must be a list, got {type(annotations).__name__}.")
    for index, ann in enumerate(annotations):
        where = f"{annotation_file}: annotation {ann.get('id', f'#{index}') if isinstance(ann, Mapping) else index}"
        if not isinstance(ann, Mapping):
            raise ValueError(f"{where} is not an object: {ann!r:.100}.")
        if ann.get("image_id") not in per_image:
            raise ValueError(f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'.")
        where += f" (image_id {ann['image_id']})"
        category = ann.get("category_id")
        if isinstance(category, (str, bool)) or category not in to_label:
            raise ValueError(f"{where}: category_id {category!r} is not one of the ids in 'categories' "
                             f"({sorted(to_label)}).")
        if "bbox" not in ann:
            raise ValueError(f"{where} has no 'bbox'.")
        box = checked_box(ann["bbox"], where)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise ValueError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}.")
        objects = per_image[ann["image_id"]]
        objects["bbox"].append(box)
        objects["category"].append(to_label[category])
        objects["area"].append(float(ann.get("area") or box[2] * box[3]))
        objects["id"].append(int(ann.get("id", index)))
        objects["iscrowd"].append(int(crowd))
    _warn_if_normalised(per_image, images, annotation_file)
    rows = {
        "image_id": [img["id"] for img in images],
        "image": [str(image_dir / img["file_name"]) for img in images],
        "width": [int(img.get("width") or 0) for img in images],
        "height": [int(img.get("height") or 0) for img in images],
        "objects": [per_image[img["id"]] for img in images],
    }
    return datasets.Dataset.from_dict(rows, features=detection_features(names))


def coco_image_dir(annotation_file: Path) -> Path:
    """Where the images of a COCO json are, by the layouts people have (see `load_coco_detection`)."""
    beside = annotation_file.parent / "images"
    if beside.is_dir():
        return beside
    split = re.sub(r"^(instances|person_keypoints|captions)_", "", annotation_file.stem)
    if annotation_file.parent.name == "annotations":
        for candidate in (annotation_file.parent.parent / split, annotation_file.parent.parent / "images" / split):
            if candidate.is_dir():
                return candidate
    return annotation_file.parent


def _coco_categories(coco: Mapping, source: Path) -> tuple[list[str], dict[int, int]]:
    categories = coco.get("categories") or []
    if not categories:
        raise ValueError(f"{source}: no 'categories'; a COCO detection file must list its classes.")
    for category in categories:
        if not isinstance(category, Mapping) or not isinstance(category.get("id"), int) or "name" not in category:
            raise ValueError(f"{source}: category {category!r:.100} needs an integer 'id' and a 'name'.")
    ids = [c["id"] for c in categories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{source}: category ids {duplicates} appear more than once in 'categories'.")
    categories = sorted(categories, key=lambda c: c["id"])
    return [str(c["name"]) for c in categories], {c["id"]: i for i, c in enumerate(categories)}


def _coco_images(images: list, source: Path) -> list[Mapping]:
    for index, image in enumerate(images):
        if not isinstance(image, Mapping) or "id" not in image or not image.get("file_name"):
            raise ValueError(f"{source}: images[{index}] = {image!r:.100} needs an 'id' and a 'file_name'.")
        if not isinstance(image["id"], int) or isinstance(image["id"], bool):
            raise ValueError(f"{source}: images[{index}] ({image['file_name']}) has id {image['id']!r}; COCO image "
                             "ids are integers.")
    counts = Counter(image["id"] for image in images)
    duplicates = [image_id for image_id, count in counts.items() if count > 1]
    if duplicates:
        raise ValueError(
            f"{source}: {len(duplicates)} image id(s) appear more than once in 'images' (e.g. {duplicates[:5]}); "
            "their annotations could not be told apart. Give every image its own id."
        )
    return images


def _warn_if_normalised(per_image: Mapping, images: list[Mapping], source: Path) -> None:
    """Warn when every box of the file lies within [0, 1] though its images are larger: boxes given as fractions of
    the image in a field that holds pixels."""
    boxes = [box for objects in per_image.values() for box in objects["bbox"]]
    large = any((img.get("width") or 2) > 1 or (img.get("height") or 2) > 1 for img in images)
    if boxes and large and all(0 <= v <= 1 for box in boxes for v in box):
        examples = [f"image {image_id} bbox {o['bbox'][0]}" for image_id, o in per_image.items() if o["bbox"]][:3]
        logger.warning(
            "%s: all %d boxes have every coordinate in [0, 1] (e.g. %s), but COCO boxes are x, y, w, h in pixels: "
            "they look normalised. Multiply them by the image width/height, or they train a detector of "
            "one-pixel objects.", source, len(boxes), "; ".join(examples),
        )


def detection_features(label_names: Sequence[str]) -> Features:
    """The transformers object-detection schema (as cppe-5) plus `iscrowd`: `image_id`, `image`, `width`, `height`,
    and `objects` with `id`, `area` (pixels^2), `bbox` (COCO x, y, w, h in absolute pixels), `category` (a
    `ClassLabel`) and `iscrowd` (0/1). Datasets without `iscrowd` are read as having none."""
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
                "iscrowd": List(Value("int8")),
            },
        }
    )


#: The labeled and unlabeled data layouts `load_labeled_dataset` / `load_unlabeled_images` accept (README's table).
LABELED_LAYOUTS = (
    "a COCO json (images in `images/` beside it, in the folder named after its split for the standard "
    "`annotations/instances_<split>.json` layout, or in --image_dir); a folder holding `<split>.json` or "
    "`annotations.json`; an imagefolder with `metadata.jsonl`; a Dataset or DatasetDict saved with `save_to_disk`; "
    "parquet (a file, a glob, or a Hub-layout folder `data/<split>-*.parquet`); or a Hub dataset id"
)


def load_labeled_dataset(
    source: str | Path, split: str = "train", image_dir: str | Path | None = None
) -> datasets.Dataset:
    """Labeled detection data from any layout of `LABELED_LAYOUTS`; `split` picks the split of a DatasetDict, a
    parquet folder or a Hub dataset, and names the COCO json to look for in a folder (`<split>.json`).

    A local path that does not exist is a FileNotFoundError (not a Hub lookup); a folder in no known layout, an
    unknown split or an empty dataset is a ValueError naming the source.
    """
    text = str(source)
    path = Path(source).expanduser()
    if path.suffix == ".json":
        dataset = load_coco_detection(path, image_dir)
    elif path.suffix == ".parquet" or "*" in text:
        files = parquet_files(source)
        dataset = datasets.load_dataset("parquet", data_files=files, split="train")
    elif path.is_dir():
        dataset = _load_labeled_folder(path, split, image_dir)
    elif _local_source(text):
        raise FileNotFoundError(f"{source}: no such file or folder (nor a Hub dataset id, namespace/name).")
    else:
        dataset = datasets.load_dataset(text, split=split)
    if len(dataset) == 0:
        raise ValueError(f"{source} (split {split!r}) is empty: 0 labeled images.")
    return dataset


def _load_labeled_folder(path: Path, split: str, image_dir: str | Path | None) -> datasets.Dataset:
    for name in (f"{split}.json", "annotations.json"):
        if (path / name).is_file():
            return load_coco_detection(path / name, image_dir)
    standard = sorted((path / "annotations").glob(f"instances_{split}*.json"))
    if standard:
        return load_coco_detection(standard[0], image_dir)
    if (path / "metadata.jsonl").is_file() or (path / split / "metadata.jsonl").is_file():
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    if (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        if split not in saved:
            raise ValueError(f"{path} is a DatasetDict with splits {sorted(saved)}; there is no split {split!r}.")
        return saved[split]
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    shards = sorted(str(p) for pattern in ("*.parquet", "data/*.parquet") for p in path.glob(pattern))
    if shards:
        check_parquet_shards(shards)
        found = datasets.load_dataset(str(path))
        if split not in found:
            raise ValueError(f"{path} holds parquet splits {sorted(found)}; there is no split {split!r}.")
        return found[split]
    jsons = sorted(p.name for p in path.glob("*.json"))
    if jsons:
        raise ValueError(
            f"{path} holds no {split}.json nor annotations.json (split {split!r}), but {jsons}: pass the split that "
            f"names one of them (e.g. --train_split / --eval_split {Path(jsons[0]).stem}) or the json itself."
        )
    raise ValueError(f"{path} is not a labeled dataset in a known layout. Accepted: {LABELED_LAYOUTS}.")


def load_unlabeled_images(source: str | Path, split: str = "train", streaming: bool = True) -> datasets.IterableDataset:
    """Unlabeled images as a stream: an image folder, parquet shards (a folder or glob), or a Hub dataset id.

    Store large pools as several parquet shards: a streaming `imagefolder` has a single shard, so it cannot be split
    across processes and workers. Parquet shards are checked before training (their footers are read): a corrupt
    shard is an error naming the file. A folder without images or shards, or a missing path, is an error at once.
    """
    text = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        parquet = sorted(str(p) for p in path.rglob("*.parquet"))
        if parquet:
            check_parquet_shards(parquet)
            ds = datasets.load_dataset("parquet", data_files=parquet, split="train", streaming=streaming)
        elif any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split="train", streaming=streaming)
        else:
            raise ValueError(f"The unlabeled folder {path} is empty: it holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}) and no parquet shards.")
    elif text.endswith(".parquet") or "*" in text:
        files = parquet_files(source)
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    elif _local_source(text):
        raise FileNotFoundError(f"{source}: no such file or folder (nor a Hub dataset id, namespace/name).")
    else:
        ds = datasets.load_dataset(text, split=split, streaming=streaming)
    return ds if isinstance(ds, datasets.IterableDataset) else ds.to_iterable_dataset()


def _local_source(text: str) -> bool:
    """Whether a data source string names a local path rather than a Hub dataset: a path that exists or is spelled
    as one, a name with a data-file suffix ("coco/train.json" is a missing file, not a Hub id), a path whose first
    folder exists here, or not a Hub id."""
    path = Path(text)
    data_file = path.suffix.lower() in (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".zip", ".tar")
    local_parent = len(path.parts) > 1 and Path(path.parts[0]).is_dir()  # "data/train" where data/ is here
    return (looks_like_local_path(text) or data_file or path.suffix.lower() in IMAGE_SUFFIXES or local_parent
            or not is_hub_id(text))


def check_parquet_shards(files: Sequence[str]) -> None:
    """Read each parquet file's footer (no data): a truncated or corrupt shard is a ValueError naming it, before
    training rather than hours into it."""
    import pyarrow.parquet as pq

    for file in files:
        try:
            pq.ParquetFile(file).metadata  # noqa: B018 - reading the footer is the check
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise ValueError(f"The parquet shard {file} cannot be read ({type(error).__name__}: {error}).") from error


def first_images(source: str | Path, count: int) -> list[Image.Image]:
    """The first `count` decodable images (RGB) of an unlabeled source (see `load_unlabeled_images`), e.g. to
    calibrate int8 quantisation; undecodable ones are skipped and counted in a warning."""
    stream = load_unlabeled_images(source)
    column = image_column(stream)
    images, skipped = [], []
    for row in stream.cast_column(column, ImageFeature(decode=False)):
        try:
            images.append(decode_image(row[column]))
        except Exception:  # noqa: BLE001 - PIL raises many types for malformed files; all mean "undecodable"
            skipped.append(image_name(row[column]))
        if len(images) == count:
            break
    if skipped:
        logger.warning("%s: skipped %d undecodable image(s), e.g. %s.", source, len(skipped), ", ".join(skipped[:3]))
    if not images:
        raise ValueError(f"{source}: no decodable image.")
    return images


def parquet_files(source: str | Path) -> list[str]:
    """The parquet files a path or glob (`shards/*.parquet`) names, each checked readable (`check_parquet_shards`)."""
    text = str(Path(source).expanduser())
    if "*" in text:
        files = sorted(glob.glob(text))
        if not files:
            raise FileNotFoundError(f"{source}: no parquet file matches.")
    elif Path(text).is_file():
        files = [text]
    else:
        raise FileNotFoundError(f"{source}: no such parquet file.")
    check_parquet_shards(files)
    return files


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
    dataset: datasets.Dataset | datasets.IterableDataset, id2label: Mapping[int, str], dataset_name: str = "the dataset"
) -> dict[int, int]:
    """Dataset category id -> model label id, matching by class name. A name the model does not know is an error."""
    names = dataset_label_names(dataset)
    if names is None:
        return {i: i for i in range(len(id2label))}
    label2id = {name: int(i) for i, name in id2label.items()}
    unknown = [n for n in names if n not in label2id]
    if unknown:
        raise ValueError(
            f"{dataset_name}: categories {unknown} are not among the model's labels {sorted(label2id)}. Build the "
            "model with the dataset's class names (id2label), or remap the dataset's categories."
        )
    return {i: label2id[name] for i, name in enumerate(names)}


def with_model_categories(
    dataset: datasets.Dataset | datasets.IterableDataset, id2label: Mapping[int, str]
) -> datasets.Dataset | datasets.IterableDataset:
    """`dataset` with `objects.category` turned into the model's label ids by class name (see `category_mapping`):
    an evaluation set may list its classes in another order than the training set, or only some of them. Unchanged
    when the ids already are the model's (or the categories are plain integers)."""
    mapping = category_mapping(dataset, id2label)
    if all(source == target for source, target in mapping.items()):
        return dataset

    def remap(objects: Any) -> dict:
        columns = objects_as_columns(objects)
        return {"objects": {**columns, "category": [mapping[c] for c in columns["category"]]}}

    features = dataset.features.copy()
    names = [id2label[i] for i in sorted(id2label, key=int)]
    inner = dict(features["objects"]) if isinstance(features["objects"], Mapping) else dict(features["objects"].feature)
    inner.update(bbox=List(List(Value("float32"), length=4)), category=List(ClassLabel(names=names)),
                 iscrowd=List(Value("int64")), area=List(Value("float32")))
    features["objects"] = {key: inner[key] for key in ("bbox", "category", "iscrowd", "area")}
    return dataset.map(remap, input_columns="objects", features=features)


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
# Checks before training
# ----------------------------------------------------------------------------------------------------------------------


def check_labeled_schema(dataset: datasets.Dataset | datasets.IterableDataset, name: str) -> None:
    """A ValueError naming `name` and its columns unless `dataset` has `objects` with `bbox` and `category`."""
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


def check_labeled_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    name: str,
    category_map: Mapping[int, int] | None = None,
    id2label: Mapping[int, str] | None = None,
    skip_undecodable: bool = False,
) -> None:
    """Find what would stop a run late, before its first step: a fast pass over a map-style labeled dataset that reads
    annotations and file headers, never pixels.

    Errors (ValueError, naming `name`, the image and what is wrong): an empty dataset, missing columns, malformed
    `objects` (null, a bbox that is not 4 numbers, a category that is not an integer id or not one of the model's
    classes), image files that do not exist, images whose header cannot be read (not images, truncated at the
    start; all of them counted, examples named; with `skip_undecodable` the latter are a warning, and the collator
    skips them). Warnings through the `hf_sad` logger, with counts and examples: image sizes in the data that
    disagree with the files. A streaming dataset is only checked for its columns (reading it through would cost what
    training costs).
    """
    check_labeled_schema(dataset, name)
    if not isinstance(dataset, datasets.Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: 0 labeled images.")
    column = image_column(dataset)
    keep = [c for c in (column, "objects", "image_id", "width", "height") if c in dataset.column_names]
    rows = dataset.select_columns(keep).cast_column(column, ImageFeature(decode=False))
    missing, unreadable, wrong_size, checked = [], [], [], 0
    for index, row in enumerate(tqdm(rows, desc=f"Checking {name}", disable=len(rows) < 2000, unit="image")):
        value = row[column]
        image_id = f", image_id={row['image_id']}" if row.get("image_id") is not None else ""
        where = f"{name} row {index} ({image_name(value)}{image_id})"
        objects = objects_as_columns(row["objects"], where)
        map_categories(objects["category"], category_map, id2label, where=where)
        data = value.get("bytes") if isinstance(value, Mapping) else None
        path = value.get("path") if isinstance(value, Mapping) else None
        if not data and path and not Path(path).is_file():
            missing.append(path)
            continue
        if not data and not path:
            continue  # an in-memory image (a PIL image): decoded already
        try:
            with Image.open(io.BytesIO(data) if data else path) as image:  # reads the header only
                size = image.size
        except Exception as error:  # noqa: BLE001 - PIL raises many types for malformed files; all mean "undecodable"
            unreadable.append(f"{image_name(value)} ({type(error).__name__})")
            continue
        if row.get("width") and row.get("height"):
            checked += 1
            if size != (row["width"], row["height"]):
                stated = f"{row['width']}x{row['height']}"
                wrong_size.append(f"{path}: {stated} in the data, {size[0]}x{size[1]} in the file")
    if missing:
        raise FileNotFoundError(
            f"{name}: {len(missing)} of {len(rows)} image files do not exist, e.g. {', '.join(missing[:3])}. Check the "
            "image folder (--train_image_dir / --eval_image_dir, image_dir in Python) or the paths in the annotations."
        )
    if unreadable and not skip_undecodable:
        raise ValueError(
            f"{name}: {len(unreadable)} of {len(rows)} images cannot be read as images, e.g. "
            f"{', '.join(unreadable[:3])}. Fix or remove them, or pass --skip_bad_labeled_images "
            "(skip_bad_labeled_images=True) to skip them."
        )
    if unreadable:
        logger.warning("%s: %d of %d images cannot be read as images and will be skipped, e.g. %s.", name,
                       len(unreadable), len(rows), ", ".join(unreadable[:3]))
    if wrong_size:
        logger.warning(
            "%s: %d of %d images have another size in their annotation file than on disk, e.g. %s. Boxes are read in "
            "pixels of the file as it is; check that the annotations belong to these files.",
            name, len(wrong_size), checked, "; ".join(wrong_size[:3]),
        )
