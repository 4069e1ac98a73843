"""`hf-sad` command line and the entry points behind `scripts/train.py` and `scripts/distill.py`.

Arguments are parsed with transformers' `HfArgumentParser` from dataclasses, as in transformers' example scripts:
`DataArguments` + `ModelArguments` + `SADTrainingArguments` (every `TrainingArguments` flag works).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoImageProcessor, AutoModelForObjectDetection, HfArgumentParser

from .builder import create_detector
from .data import dataset_label_names, load_labeled_dataset, load_unlabeled_images
from .synthetic import make_labeled_dataset, make_unlabeled_stream, synthetic_id2label
from .trainer import SADTrainer, SADTrainingArguments

logger = logging.getLogger("hf_sad")

#: Built-in data sources that need no download: `synthetic[:N]` labeled scenes, `synthetic-val[:N]`, and the
#: unlabeled streams `synthetic` / `synthetic-shifted`.
SYNTHETIC_SOURCES = ("synthetic", "synthetic-val", "synthetic-shifted")


@dataclass
class DataArguments:
    """Where the data comes from. Sources are a COCO json or folder, an imagefolder, a saved or Hub dataset, or the
    built-in synthetic scenes (`synthetic:N`, `synthetic-val:N`; unlabeled `synthetic`, `synthetic-shifted`)."""

    train_data: str = field(default="synthetic:256", metadata={"help": "Labeled training data."})
    train_split: str = field(default="train", metadata={"help": "Split of a Hub/imagefolder training dataset."})
    eval_data: str | None = field(default=None, metadata={"help": "Labeled evaluation data (COCO mAP)."})
    eval_split: str = field(default="validation", metadata={"help": "Split of a Hub/imagefolder eval dataset."})
    unlabeled_data: str | None = field(default=None, metadata={"help": "Unlabeled images (folder, parquet, Hub id)."})
    unlabeled_split: str = field(default="train", metadata={"help": "Split of a Hub unlabeled dataset."})
    synthetic_image_size: int = field(default=128, metadata={"help": "Image side of the built-in synthetic data."})


@dataclass
class ModelArguments:
    """The student (a saved model or a fresh one on a timm backbone) and the teacher."""

    student: str = field(
        default="resnet18",
        metadata={"help": "A saved SAD model (path or Hub id), or a timm backbone name for a fresh student."},
    )
    teacher: str | None = field(default=None, metadata={"help": "The teacher: a saved SAD model (path or Hub id)."})
    image_size: int = field(default=512, metadata={"help": "Shortest image side of a fresh model's processor."})
    fpn_channels: int = field(default=256, metadata={"help": "Pyramid width of a fresh model."})
    head_channels: int = field(default=256, metadata={"help": "Head width of a fresh model."})
    head_num_convs: int = field(default=4, metadata={"help": "Convolutions per head of a fresh model."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Load timm's pretrained backbone weights."})


def load_data(source: str, split: str, image_size: int, seed_offset: int = 0) -> datasets.Dataset:
    """A labeled dataset from a source string (see `DataArguments`)."""
    name, _, count = source.partition(":")
    if name in ("synthetic", "synthetic-val"):
        seed = (1 if name == "synthetic-val" else 0) + seed_offset
        return make_labeled_dataset(int(count or 256), seed=seed, image_size=image_size)
    return load_labeled_dataset(source, split=split)


def load_unlabeled(source: str, split: str, image_size: int) -> datasets.IterableDataset:
    if source in ("synthetic", "synthetic-shifted"):
        return make_unlabeled_stream(image_size=image_size, shifted=source == "synthetic-shifted")
    return load_unlabeled_images(source, split=split)


def build_student(model_args: ModelArguments, id2label: dict[int, str]):
    """Load a saved student, or create a fresh one on the named timm backbone with the dataset's classes."""
    if Path(model_args.student).is_dir() or "/" in model_args.student:
        model = AutoModelForObjectDetection.from_pretrained(model_args.student)
        return model, AutoImageProcessor.from_pretrained(model_args.student)
    return create_detector(
        model_args.student,
        id2label,
        pretrained_backbone=model_args.pretrained_backbone,
        image_size=model_args.image_size,
        fpn_channels=model_args.fpn_channels,
        head_channels=model_args.head_channels,
        head_num_convs=model_args.head_num_convs,
    )


def run_training(data_args: DataArguments, model_args: ModelArguments, training_args: SADTrainingArguments) -> dict:
    """Train (supervised with `distill_loss="none"`, else distil), evaluate, save. Returns the final metrics."""
    train = load_data(data_args.train_data, data_args.train_split, data_args.synthetic_image_size)
    names = dataset_label_names(train)
    id2label = dict(enumerate(names)) if names else synthetic_id2label()
    evaluation = None
    if data_args.eval_data:
        evaluation = load_data(data_args.eval_data, data_args.eval_split, data_args.synthetic_image_size)
    unlabeled = None
    if data_args.unlabeled_data:
        unlabeled = load_unlabeled(data_args.unlabeled_data, data_args.unlabeled_split, data_args.synthetic_image_size)
    model, processor = build_student(model_args, id2label)
    trainer = SADTrainer(
        model,
        model_args.teacher if training_args.distill_loss != "none" else None,
        training_args,
        train,
        unlabeled,
        evaluation,
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model()
    if trainer.is_world_process_zero():
        (Path(training_args.output_dir) / "results.json").write_text(json.dumps(metrics, indent=2))
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def distill_main(argv: list[str] | None = None) -> dict:
    """Entry point of `scripts/distill.py` / `hf-sad distill`: student + teacher (+ unlabeled data) -> student."""
    parser = HfArgumentParser((DataArguments, ModelArguments, SADTrainingArguments))
    data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.distill_loss != "none" and not model_args.teacher:
        parser.error("--teacher is required for distillation (or pass --distill_loss none).")
    return run_training(data_args, model_args, training_args)


def train_main(argv: list[str] | None = None) -> dict:
    """Entry point of `scripts/train.py` / `hf-sad train`: supervised training of a teacher or a baseline student."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return distill_main([*argv, "--distill_loss", "none"])


def main(argv: list[str] | None = None) -> None:
    """`hf-sad` command dispatcher."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "distill": distill_main}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: hf-sad {train,distill} [--help] ...")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    commands[argv[0]](argv[1:])
