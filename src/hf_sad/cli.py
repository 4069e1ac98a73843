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
from transformers import AutoImageProcessor, AutoModelForObjectDetection, HfArgumentParser, set_seed

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


def _student_card(trainer: SADTrainer, model_args: ModelArguments, data_args: DataArguments, metrics: dict) -> None:
    """Write the student's README.md card into the output folder."""
    from .hub import create_model_card

    model = trainer.model
    card = create_model_card(
        model_name=Path(trainer.args.output_dir).name,
        id2label=model.config.id2label,
        backbone=model.config.backbone,
        teacher=model_args.teacher if trainer.args.distill_loss != "none" else None,
        datasets=[d for d in (data_args.train_data, data_args.unlabeled_data) if d],
        metrics={k: v for k, v in metrics.items() if k.startswith("eval_map")},
        hyperparameters=trainer.distillation_hyperparameters(),
        dataset_name=data_args.eval_data or data_args.train_data,
        detections_image=None,
        repo_id=trainer.args.hub_model_id,
    )
    card.save(str(Path(trainer.args.output_dir) / "README.md"))


def run_training(data_args: DataArguments, model_args: ModelArguments, training_args: SADTrainingArguments) -> dict:
    """Train (supervised with `distill_loss="none"`, else distil), evaluate, save, optionally push. Returns metrics."""
    train = load_data(data_args.train_data, data_args.train_split, data_args.synthetic_image_size)
    names = dataset_label_names(train)
    id2label = dict(enumerate(names)) if names else synthetic_id2label()
    evaluation = None
    if data_args.eval_data:
        evaluation = load_data(data_args.eval_data, data_args.eval_split, data_args.synthetic_image_size)
    unlabeled = None
    if data_args.unlabeled_data:
        unlabeled = load_unlabeled(data_args.unlabeled_data, data_args.unlabeled_split, data_args.synthetic_image_size)
    set_seed(training_args.seed)  # a fresh student's initialisation is part of the run: same --seed, same run
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
        output_dir = Path(training_args.output_dir)
        (output_dir / "results.json").write_text(json.dumps(metrics, indent=2))
        if training_args.distill_loss != "none":  # the card describes a distilled student
            _student_card(trainer, model_args, data_args, metrics)
        if training_args.push_to_hub:
            from .hub import push_to_hub

            repo_id = training_args.hub_model_id or output_dir.name
            url = push_to_hub(output_dir, repo_id, private=bool(training_args.hub_private_repo),
                              token=training_args.hub_token)
            print(f"Pushed to {url}")
    return metrics


def distill_main(argv: list[str] | None = None) -> dict:
    """`hf-sad distill` / `scripts/distill.py`: student + frozen teacher (+ unlabeled data) -> distilled student."""
    parser = HfArgumentParser((DataArguments, ModelArguments, SADTrainingArguments), prog="hf-sad distill")
    data_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.distill_loss != "none" and not model_args.teacher:
        parser.error("--teacher is required for distillation (or pass --distill_loss none).")
    return run_training(data_args, model_args, training_args)


def train_main(argv: list[str] | None = None) -> dict:
    """`hf-sad train` / `scripts/train.py`: supervised training of a teacher or a baseline student."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distill_loss" in argv or "--teacher" in argv:
        raise SystemExit("hf-sad train is supervised only; use hf-sad distill for --teacher / --distill_loss.")
    return distill_main([*argv, "--distill_loss", "none"])


@dataclass
class DemoArguments:
    """The built-in teacher -> student demo on generated data (no network)."""

    output_dir: str = field(default="sad-demo", metadata={"help": "Where results, the student and pictures go."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: a few steps per model."})
    seed: int = field(default=0, metadata={"help": "Seed of data and initialisation."})


def demo_main(argv: list[str] | None = None) -> dict:
    """`hf-sad demo`: teacher, baseline student and SAD student on synthetic data; prints a table."""
    from dataclasses import replace

    from .demo import QUICK, DemoConfig, run_demo

    (args,) = HfArgumentParser(DemoArguments, prog="hf-sad demo").parse_args_into_dataclasses(args=argv)
    config = replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
    return run_demo(args.output_dir, quick=args.quick, config=config)


@dataclass
class EvaluateArguments:
    """COCO mAP of a saved model on a labeled dataset."""

    model: str = field(metadata={"help": "A saved SAD model (path or Hub id)."})
    data: str = field(metadata={"help": "Labeled data (COCO json/folder, imagefolder, saved or Hub dataset)."})
    split: str = field(default="validation", metadata={"help": "Split of a Hub/imagefolder dataset."})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass."})
    synthetic_image_size: int = field(default=128, metadata={"help": "Image side of synthetic data."})


def evaluate_main(argv: list[str] | None = None) -> dict:
    """`hf-sad evaluate`: prints COCO metrics (map, map_50, map_75, small/medium/large, per class) as JSON."""
    import tempfile

    (args,) = HfArgumentParser(EvaluateArguments, prog="hf-sad evaluate").parse_args_into_dataclasses(args=argv)
    data = load_data(args.data, args.split, args.synthetic_image_size)
    model = AutoModelForObjectDetection.from_pretrained(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SADTrainingArguments(output_dir=tmp, distill_loss="none", report_to="none",
                                             per_device_eval_batch_size=args.batch_size)
        trainer = SADTrainer(model, None, training_args, eval_dataset=data, processing_class=processor)
        metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    print(json.dumps(metrics, indent=2))
    return metrics


@dataclass
class PredictArguments:
    """Detections for images: JSON and pictures with the boxes drawn."""

    model: str = field(metadata={"help": "A saved SAD model (path or Hub id)."})
    images: list[str] = field(metadata={"help": "Image files or folders."})
    output_dir: str = field(default="predictions", metadata={"help": "Where detections.json and pictures go."})
    threshold: float = field(default=0.5, metadata={"help": "Minimum score of a detection."})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass."})


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def predict_main(argv: list[str] | None = None) -> dict:
    """`hf-sad predict`: writes `detections.json` ({file: [{label, score, box}]}) and one drawn picture per image."""
    from PIL import Image

    from .data import decode_image
    from .inference import detect, draw_detections, to_json

    (args,) = HfArgumentParser(PredictArguments, prog="hf-sad predict").parse_args_into_dataclasses(args=argv)
    files = []
    for item in map(Path, args.images):
        files += sorted(p for p in item.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if item.is_dir() else [item]
    if not files:
        raise SystemExit(f"No images found in {args.images}.")
    model = AutoModelForObjectDetection.from_pretrained(args.model)
    processor = AutoImageProcessor.from_pretrained(args.model)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        images: list[Image.Image] = [decode_image({"path": str(f), "bytes": None}) for f in chunk]
        for file, image, found in zip(chunk, images, detect(model, processor, images, threshold=args.threshold)):
            results[str(file)] = to_json(found, model.config.id2label)
            draw_detections(image, found, model.config.id2label).save(output_dir / f"{file.stem}_detections.png")
    (output_dir / "detections.json").write_text(json.dumps(results, indent=2))
    print(f"{sum(map(len, results.values()))} detections in {len(files)} images -> {output_dir}")
    return results


@dataclass
class PushArguments:
    """Upload a saved student (weights, processor, remote code, card) to the Hugging Face Hub."""

    model_dir: str = field(metadata={"help": "The saved student folder."})
    repo_id: str = field(metadata={"help": "NAMESPACE/NAME of the Hub repository."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def push_main(argv: list[str] | None = None) -> str:
    """`hf-sad push MODEL_DIR --repo-id NAMESPACE/NAME [--private]`; the token comes from `hf auth login`/HF_TOKEN."""
    from .hub import push_to_hub

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv[0], *argv[1:]]
    (args,) = HfArgumentParser(PushArguments, prog="hf-sad push").parse_args_into_dataclasses(args=argv)
    url = push_to_hub(args.model_dir, args.repo_id, private=args.private, revision=args.revision)
    print(f"Pushed {args.model_dir} to {url}")
    return url


COMMANDS = {
    "demo": (demo_main, "teacher -> student distillation demo on built-in data"),
    "train": (train_main, "supervised training of a teacher or baseline student"),
    "distill": (distill_main, "distil a frozen teacher into a student (SAD)"),
    "evaluate": (evaluate_main, "COCO mAP of a saved model on a dataset"),
    "predict": (predict_main, "detections for images: JSON and drawn pictures"),
    "push": (push_main, "upload a saved student to the Hugging Face Hub"),
}


def main(argv: list[str] | None = None) -> None:
    """`hf-sad COMMAND [--help] ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = ["usage: hf-sad COMMAND [--help] ...", "", "commands:"]
        lines += [f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items()]
        print("\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[argv[0]][0](argv[1:])
