"""The training data of a run, prepared before the trainer: labeled images repeated without end, interleaved with
unlabeled images, each row numbered by `sample_index`, and the number of steps the run takes.

The collator derives each row's augmentation from its `sample_index` rather than from the global RNG, so a run resumed
from a checkpoint (which replays the stream up to the checkpoint) sees exactly the pixels an uninterrupted one would
have seen. `prepare_training_data` is what `hf-sad train` / `distill` call, as TRL prepares its data sets before its
trainers; `SADTrainer` calls it itself when given raw data sets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
from datasets import Features, List, Value
from datasets import Image as ImageFeature

from .collator import image_name, map_categories, objects_as_columns
from .loading import category_mapping, check_labeled_dataset, check_labeled_schema, image_column

if TYPE_CHECKING:
    from ..arguments import SADTrainingArguments

__all__ = [
    "STREAM_FEATURES",
    "TrainingData",
    "build_training_stream",
    "check_unlabeled_dataset",
    "prepare_training_data",
    "steps_for_epochs",
    "teacher_steps",
]

#: Schema of the training stream. Images stay undecoded (bytes/path) until the collator, which decodes them itself so
#: that one corrupt file in an unlabeled pool can be counted and skipped instead of killing a DataLoader worker.
STREAM_FEATURES = Features(
    {
        "image": ImageFeature(decode=False),
        "objects": {
            "bbox": List(List(Value("float32"), length=4)),
            "category": List(Value("int64")),
            "iscrowd": List(Value("int64")),
        },
        "is_labeled": Value("bool"),
    }
)


def check_unlabeled_dataset(dataset: datasets.Dataset | datasets.IterableDataset) -> None:
    """Refuse an unlabeled dataset that would leave a "semi-supervised" run labeled-only: one without rows (a stream
    is asked for its first row) or without an image column."""
    column = image_column(dataset)
    streaming = not isinstance(dataset, datasets.Dataset)
    if streaming:  # its first row, undecoded: a bad first image is the collator's to skip and count
        empty = next(iter(dataset.cast_column(column, ImageFeature(decode=False)).take(1)), None) is None
    else:
        empty = len(dataset) == 0
    if empty:
        raise ValueError("unlabeled_dataset is empty: it yields no image. Check the unlabeled source, or train "
                         "without one.")


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
            where = " ".join([image_name(example[column])] + (
                [f"image_id={example['image_id']}"] if example.get("image_id") is not None else []))
            objects = objects_as_columns(example["objects"], f"Annotation of image {where}")
            objects["category"] = map_categories(objects["category"], mapping, id2label, where=f"image {where}")
            del objects["area"]  # evaluation's; training does not read it
        else:
            objects = {"bbox": [], "category": [], "iscrowd": []}
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
    check_labeled_schema(labeled, "train_dataset")
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


@dataclass
class TrainingData:
    """A run's prepared training data (`prepare_training_data`).

    Attributes:
        stream: the endless stream of training rows (`build_training_stream`).
        max_steps: the optimizer steps the run takes.
        category_map: dataset category id -> model label id of the labeled data.
    """

    stream: datasets.IterableDataset
    max_steps: int
    category_map: dict[int, int]


def prepare_training_data(
    labeled: datasets.Dataset | datasets.IterableDataset,
    unlabeled: datasets.Dataset | datasets.IterableDataset | None,
    args: SADTrainingArguments,
    id2label: Mapping[int, str],
    teacher=None,
) -> TrainingData:
    """Check the data against the model and the settings, and build the training stream and the run's step count.

    Before any step: the labeled data is checked (`check_labeled_dataset`: its classes against `id2label`, its
    annotations and image headers), the unlabeled data for an image column, rows and a use in this run
    (`args.check_unlabeled`).
    Steps: `args.max_steps` when set; else, with `recipe="paper"` and a teacher (as `SADTrainer` takes it), 3x the
    steps the teacher was trained (`teacher_steps`); else enough to show every labeled image `num_train_epochs` times
    (`steps_for_epochs`).
    """
    category_map = category_mapping(labeled, id2label, "train_dataset")
    check_labeled_dataset(labeled, "train_dataset", category_map, id2label,
                          skip_undecodable=args.skip_bad_labeled_images)
    if unlabeled is not None:
        check_unlabeled_dataset(unlabeled)
    args.check_unlabeled(given=unlabeled is not None)
    if args.max_steps > 0:
        max_steps = args.max_steps
    elif args.recipe == "paper" and teacher is not None:
        max_steps = 3 * teacher_steps(teacher)
    else:
        max_steps = steps_for_epochs(args, labeled, unlabeled)
    stream = build_training_stream(
        labeled,
        unlabeled,
        unlabeled_ratio=args.unlabeled_ratio,
        category_map=category_map,
        seed=args.data_seed if args.data_seed is not None else args.seed,
        num_shards=max(8, args.world_size * max(1, args.dataloader_num_workers)),
        id2label=id2label,
    )
    return TrainingData(stream, max_steps, category_map)


def teacher_steps(teacher) -> int:
    """How many steps the saved `teacher` (a folder) was trained (its `trainer_state.json`), for a 3x student
    schedule; a ValueError for a teacher that is no saved folder (a model object, an ensemble)."""
    state = Path(teacher) / "trainer_state.json" if isinstance(teacher, str) else None
    if state is None or not state.is_file():
        raise ValueError(
            "recipe='paper' without max_steps trains the student 3x its teacher's steps, but the teacher's "
            f"trainer_state.json ({state or 'a teacher given as a model object or a list'}) is not there: set "
            "max_steps."
        )
    return int(json.loads(state.read_text())["global_step"])


def steps_for_epochs(args: SADTrainingArguments, labeled, unlabeled) -> int:
    """`max_steps` that shows every labeled image `num_train_epochs` times (the training stream itself never ends)."""
    if not hasattr(labeled, "__len__"):
        raise ValueError("A streaming train_dataset has no length: set max_steps.")
    labeled_share = 1 - args.unlabeled_ratio if unlabeled is not None else 1.0
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return max(1, math.ceil(args.num_train_epochs * len(labeled) / (per_step * labeled_share)))
