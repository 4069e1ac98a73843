"""`hf-sad` command line and the entry points behind `scripts/train.py` and `scripts/distill.py`.

Each command parses its own dataclasses with transformers' `HfArgumentParser`, as transformers' example scripts do,
so `hf-sad COMMAND --help` lists exactly that command's flags: data, model and distillation flags first, then every
`TrainingArguments` flag. `--config run.yaml` reads flag values from a YAML file, as TRL's scripts do; flags on the
command line win.

`main(argv)` lets errors propagate (tests and Python callers see the exception); the `hf-sad` console entry point
(`console_main`) turns data, path and configuration errors into a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import timm
import yaml
from transformers import AutoImageProcessor, AutoModelForObjectDetection, HfArgumentParser, set_seed

from .arguments import DetectionTrainingArguments, SADTrainingArguments
from .data import dataset_label_names, load_labeled_dataset, load_unlabeled_images, prepare_training_data
from .data.loading import check_labeled_schema, first_images
from .data.synthetic import make_labeled_dataset, make_unlabeled_stream
from .hub import is_hub_id, looks_like_local_path, write_exports_into_card
from .model.builder import create_detector
from .reporting import format_metrics, write_json
from .training.callbacks import TrainingStopped
from .training.trainer import SADTrainer

logger = logging.getLogger("hf_sad")

#: Built-in data sources that need no download: `synthetic[:N]` labeled scenes, `synthetic-val[:N]`, and the
#: unlabeled streams `synthetic` / `synthetic-shifted`.
SYNTHETIC_SOURCES = ("synthetic", "synthetic-val", "synthetic-shifted")


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the data comes from. Sources are a COCO json or folder, an imagefolder, a saved or Hub dataset, or the
    built-in synthetic scenes (`synthetic:N`, `synthetic-val:N`; unlabeled `synthetic`, `synthetic-shifted`)."""

    _argument_group_name = "data"

    train_data: str = field(metadata={"help": "Labeled training data (see the README's table of formats)."})
    train_split: str = field(default="train", metadata={"help": "Split of a DatasetDict, parquet or Hub dataset."})
    train_image_dir: str | None = field(
        default=None, metadata={"help": "Image folder of a COCO json whose images are not where it looks."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Labeled evaluation data (COCO mAP)."})
    eval_split: str = field(default="validation", metadata={"help": "Split of the evaluation dataset."})
    eval_image_dir: str | None = field(default=None, metadata={"help": "Image folder of the evaluation COCO json."})
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "Class names, in category-id order, for data whose categories are plain integers "
                          "(an imagefolder, a saved dataset); data with names must agree with them."},
    )
    synthetic_image_size: int = field(default=128, metadata={"help": "Image side of the built-in synthetic data."})


@dataclass
class UnlabeledDataArguments:
    """The unlabeled images of a distillation (a supervised run has no use for them)."""

    _argument_group_name = "unlabeled data"

    unlabeled_data: str | None = field(default=None, metadata={"help": "Unlabeled images (folder, parquet, Hub id)."})
    unlabeled_split: str = field(default="train", metadata={"help": "Split of a Hub unlabeled dataset."})


@dataclass
class ModelArguments:
    """The model to train: a saved detector, or a fresh one on a timm backbone."""

    _argument_group_name = "model"

    student: str = field(
        default="resnet18",
        metadata={"help": "A saved SAD model (path or Hub id), or a timm backbone name for a fresh model."},
    )
    image_size: int = field(default=512, metadata={"help": "Shortest image side of a fresh model's processor."})
    fpn_channels: int = field(default=256, metadata={"help": "Pyramid width of a fresh model."})
    head_channels: int = field(default=256, metadata={"help": "Head width of a fresh model."})
    head_num_convs: int = field(default=4, metadata={"help": "Convolutions per head of a fresh model."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Load timm's pretrained backbone weights."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "A saved detector whose backbone and pyramid start a fresh model (its heads are not taken)."},
    )
    license: str | None = field(default=None, metadata={"help": "License of the trained model, for its card."})


@dataclass
class TeacherArguments:
    """The frozen teacher of a distillation."""

    _argument_group_name = "teacher"

    teacher: list[str] | None = field(default=None, metadata={
        "help": "The teacher: a saved SAD model (path or Hub id); several make an ensemble (--teacher_aggregation). "
                "None with --ema_teacher (the teacher is then an average of the student)."})


def parse(prog: str, description: str, dataclass_types: tuple[type, ...], argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with a parser built from `dataclass_types` and `--config FILE.yaml` (flag name -> value; flags on
    the command line win). Unknown flags are a usage error (exit status 2)."""
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE.yaml", help="Flag values from a YAML file; command-line flags win.")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_read_config(parser, known.config))
    return parser.parse_args(argv)


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The flag values of a YAML config file, checked against the parser's flags (so a typo is an error)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}.")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions) - {"config"})
    if unknown:
        raise ValueError(f"--config {path}: unknown flag(s) {unknown}; `--help` lists the flags of this command.")
    for name in values:
        actions[name].required = False  # given by the file
    return values


def from_namespace(dtype: type, namespace: argparse.Namespace, **overrides):
    """An instance of the dataclass `dtype` from the parsed values it has fields for, plus `overrides`."""
    names = {f.name for f in dataclasses.fields(dtype) if f.init}
    return dtype(**{**{k: v for k, v in vars(namespace).items() if k in names}, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# train / distill
# ----------------------------------------------------------------------------------------------------------------------


def load_data(
    source: str, split: str, image_size: int, seed_offset: int = 0, image_dir: str | None = None
) -> datasets.Dataset:
    """A labeled dataset from a source string (see `DataArguments`)."""
    name, _, count = source.partition(":")
    if name in ("synthetic", "synthetic-val"):
        seed = (1 if name == "synthetic-val" else 0) + seed_offset
        return make_labeled_dataset(int(count or 256), seed=seed, image_size=image_size)
    return load_labeled_dataset(source, split=split, image_dir=image_dir)


def class_names(dataset: datasets.Dataset, given: list[str] | None, source: str) -> list[str]:
    """The classes to train: the data's own names, or `--class_names` where the data has plain integer categories;
    neither (or the two disagreeing) is an error naming the source."""
    check_labeled_schema(dataset, "train_dataset")
    names = dataset_label_names(dataset)
    if given:
        given = [name for part in given for name in part.split(",") if name]  # "a,b,c" or a b c
        if names is not None and names != given:
            raise ValueError(f"--class_names {given} disagree with the class names of {source}: {names}.")
        return given
    if names is None:
        raise ValueError(
            f"The categories of {source} are plain integers, without class names (a ClassLabel feature or COCO "
            "'categories'): pass them with --class_names NAME [NAME ...], in category-id order."
        )
    return names


def load_unlabeled(source: str, split: str, image_size: int) -> datasets.IterableDataset:
    if source in ("synthetic", "synthetic-shifted"):
        return make_unlabeled_stream(image_size=image_size, shifted=source == "synthetic-shifted")
    return load_unlabeled_images(source, split=split)


def load_saved_detector(source: str):
    """(model, image processor) saved at the folder or Hub id `source`; a missing local folder is a
    FileNotFoundError and a folder without a detector a ValueError, both naming `source`."""
    if not Path(source).exists() and (looks_like_local_path(source) or not is_hub_id(source)):
        raise FileNotFoundError(f"{source}: no such model folder (nor a Hub model id, namespace/name).")
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise ValueError(f"{source} is a folder without a saved detector (no config.json); save one there with "
                         "save_pretrained, or name another folder or Hub id.")
    try:
        return AutoModelForObjectDetection.from_pretrained(source), AutoImageProcessor.from_pretrained(source)
    except OSError as error:
        raise ValueError(f"Could not load a detector and its image processor from {source}: {error}") from error


def build_student(model_args: ModelArguments, id2label: dict[int, str]):
    """Load a saved model, or create a fresh one on the named timm backbone with the dataset's classes. A timm name
    builds a fresh model even where a folder of that name (without a saved detector) exists."""
    name = model_args.student
    fresh = timm.is_model(name) and not (Path(name) / "config.json").is_file()
    if not fresh and (Path(name).exists() or "/" in name or looks_like_local_path(name)):
        return load_saved_detector(name)
    return create_detector(
        model_args.student,
        id2label,
        pretrained_backbone=model_args.pretrained_backbone,
        init_from=model_args.init_from,
        image_size=model_args.image_size,
        fpn_channels=model_args.fpn_channels,
        head_channels=model_args.head_channels,
        head_num_convs=model_args.head_num_convs,
    )


def run_training(
    data_args: DataArguments,
    model_args: ModelArguments,
    training_args: SADTrainingArguments,
    teacher: str | list[str] | None = None,
    unlabeled_args: UnlabeledDataArguments | None = None,
) -> dict:
    """Train (supervised with `distill_loss="none"`, else distil), save, evaluate, write results and the model card,
    optionally push. Ends as transformers' example scripts do (`***** train metrics *****`, `train_results.json`,
    `eval_results.json`, `all_results.json`, `trainer_state.json`), plus `results.json` and a per-class AP table.
    Returns the metrics."""
    train = load_data(data_args.train_data, data_args.train_split, data_args.synthetic_image_size,
                      image_dir=data_args.train_image_dir)
    id2label = dict(enumerate(class_names(train, data_args.class_names, data_args.train_data)))
    evaluation = None
    if data_args.eval_data:
        evaluation = load_data(data_args.eval_data, data_args.eval_split, data_args.synthetic_image_size,
                               image_dir=data_args.eval_image_dir)
    unlabeled = None
    if unlabeled_args is not None and unlabeled_args.unlabeled_data:
        unlabeled = load_unlabeled(unlabeled_args.unlabeled_data, unlabeled_args.unlabeled_split,
                                   data_args.synthetic_image_size)
    set_seed(training_args.seed)  # a fresh student's initialisation is part of the run: same --seed, same run
    model, processor = build_student(model_args, id2label)
    training_data = prepare_training_data(train, unlabeled, training_args, model.config.id2label, teacher)
    trainer = SADTrainer(model, teacher, training_args, training_data, eval_dataset=evaluation,
                         processing_class=processor)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # before evaluation: nothing that fails afterwards can lose the trained weights
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if evaluation is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
        if trainer.teacher is not None:
            teacher_metrics = trainer.evaluate_teacher()
            trainer.log_metrics("teacher", teacher_metrics)
            trainer.save_metrics("teacher", teacher_metrics)
            metrics.update(teacher_metrics)
        if trainer.is_world_process_zero():
            print(f"\nCOCO AP of the {'student' if trainer.teacher is not None else 'model'} on "
                  f"{data_args.eval_data} (percent)\n{format_metrics(eval_metrics, id2label, prefix='eval_')}\n")
    card = {
        "datasets": [data_args.train_data] + ([unlabeled_args.unlabeled_data] if unlabeled is not None else []),
        "dataset_name": data_args.eval_data or data_args.train_data,
        "license": model_args.license,
    }
    if trainer.is_world_process_zero():
        write_json(Path(training_args.output_dir) / "results.json", metrics)
    if training_args.push_to_hub:
        url = trainer.push_to_hub(**card)
        if url:
            print(f"Pushed to {url}")
    else:
        trainer.create_model_card(**card)
    return metrics


def distill_main(argv: list[str] | None = None) -> dict:
    """`hf-sad distill` / `scripts/distill.py`: student + frozen teacher (+ unlabeled data) -> distilled student."""
    namespace = parse(
        "hf-sad distill", "Distil a frozen teacher into a student with SAD.",
        (DataArguments, UnlabeledDataArguments, ModelArguments, TeacherArguments, SADTrainingArguments), _argv(argv),
    )
    training_args = from_namespace(SADTrainingArguments, namespace)
    teachers = namespace.teacher or []
    try:
        training_args.check_teacher(given=bool(teachers), flag="--teacher")
    except ValueError as error:  # a usage error, before any data is read
        raise SystemExit(f"hf-sad distill: error: {error}") from None
    return run_training(from_namespace(DataArguments, namespace), from_namespace(ModelArguments, namespace),
                        training_args, teacher=teachers[0] if len(teachers) == 1 else teachers or None,
                        unlabeled_args=from_namespace(UnlabeledDataArguments, namespace))


def train_main(argv: list[str] | None = None) -> dict:
    """`hf-sad train` / `scripts/train.py`: supervised training of a teacher or a baseline student."""
    namespace = parse(
        "hf-sad train", "Supervised training of a detector (a teacher, or a baseline student).",
        (DataArguments, ModelArguments, DetectionTrainingArguments), _argv(argv),
    )
    return run_training(from_namespace(DataArguments, namespace), from_namespace(ModelArguments, namespace),
                        from_namespace(SADTrainingArguments, namespace, distill_loss="none"))


# ----------------------------------------------------------------------------------------------------------------------
# demo / evaluate / predict / push
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoArguments:
    """The built-in teacher -> student demo on generated data (no network)."""

    output_dir: str = field(default="sad-demo", metadata={"help": "Where results, the student and pictures go."})
    quick: bool = field(default=False, metadata={"help": "A smoke run: a few steps per model."})
    seed: int = field(default=0, metadata={"help": "Seed of data and initialisation."})


def demo_main(argv: list[str] | None = None) -> dict:
    """`hf-sad demo`: teacher, baseline student and SAD student on synthetic data; prints a table."""
    from .demo import QUICK, DemoConfig, run_demo

    args = from_namespace(DemoArguments, parse("hf-sad demo", demo_main.__doc__, (DemoArguments,), _argv(argv)))
    config = dataclasses.replace(QUICK if args.quick else DemoConfig(), seed=args.seed)
    return run_demo(args.output_dir, quick=args.quick, config=config)


@dataclass
class EvaluateArguments:
    """COCO mAP of a saved model on a labeled dataset."""

    model: str = field(metadata={"help": "A saved SAD model (path or Hub id)."})
    data: str = field(metadata={"help": "Labeled data (COCO json/folder, imagefolder, saved or Hub dataset)."})
    split: str = field(default="validation", metadata={"help": "Split of a DatasetDict, parquet or Hub dataset."})
    image_dir: str | None = field(default=None, metadata={"help": "Image folder of a COCO json."})
    output_file: str = field(default="evaluation.json", metadata={"help": "Where the metrics are written (JSON)."})
    skip_bad_labeled_images: bool = field(default=False, metadata={"help": "Skip undecodable images (counted)."})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass."})
    synthetic_image_size: int = field(default=128, metadata={"help": "Image side of synthetic data."})
    backend: str = field(default="pytorch", metadata={
        "help": "pytorch, or onnxruntime / openvino to evaluate the model's export (hf-sad export).",
        "choices": ["pytorch", "onnxruntime", "openvino"]})
    exported_file: str | None = field(default=None, metadata={
        "help": "With an export backend: the file in the model folder (default model.onnx / openvino_model.xml; "
        "e.g. model_int8.onnx)."})


def evaluate_main(argv: list[str] | None = None) -> dict:
    """`hf-sad evaluate`: prints the overall and per-class COCO AP and writes all metrics to a JSON file."""
    import tempfile

    args = from_namespace(EvaluateArguments, parse("hf-sad evaluate", evaluate_main.__doc__, (EvaluateArguments,),
                                                   _argv(argv)))
    data = load_data(args.data, args.split, args.synthetic_image_size, image_dir=args.image_dir)
    model, processor = load_saved_detector(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SADTrainingArguments(output_dir=tmp, distill_loss="none", report_to="none",
                                             per_device_eval_batch_size=args.batch_size, disable_tqdm=False,
                                             skip_bad_labeled_images=args.skip_bad_labeled_images)
        trainer = SADTrainer(model, None, training_args, eval_dataset=data, processing_class=processor)
        if args.backend == "pytorch":
            metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
        else:
            from .runtime import ExportedDetector, evaluate_exported

            exported = ExportedDetector.from_pretrained(args.model, backend=args.backend, file=args.exported_file)
            metrics = evaluate_exported(exported, trainer.get_eval_dataloader())
    path = write_json(args.output_file, metrics)
    evaluated = args.model if args.backend == "pytorch" else f"{args.model} ({args.backend})"
    print(f"\nCOCO AP of {evaluated} on {args.data} (percent)\n{format_metrics(metrics, model.config.id2label)}")
    print(f"\nAll metrics: {path}")
    return metrics


@dataclass
class PredictArguments:
    """Detections for images: JSON and pictures with the boxes drawn."""

    model: str = field(metadata={"help": "A saved SAD model (path or Hub id)."})
    images: list[str] = field(metadata={"help": "Image files or folders (searched recursively)."})
    output_dir: str = field(default="predictions", metadata={"help": "Where detections.json and pictures go."})
    threshold: float = field(default=0.5, metadata={"help": "Minimum score of a detection."})
    batch_size: int = field(default=8, metadata={"help": "Images per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device; default: cuda when available."})
    backend: str = field(default="pytorch", metadata={
        "help": "pytorch, or onnxruntime / openvino to run the model's export (hf-sad export).",
        "choices": ["pytorch", "onnxruntime", "openvino"]})
    exported_file: str | None = field(default=None, metadata={
        "help": "With an export backend: the file in the model folder (default model.onnx / openvino_model.xml; "
        "e.g. model_int8.onnx)."})


def predict_main(argv: list[str] | None = None) -> dict:
    """`hf-sad predict`: writes `detections.json` ({image path: [{label, score, box}]}) and a drawn picture per
    image, in folders mirroring the inputs."""
    from .inference import predict_images

    args = from_namespace(PredictArguments, parse("hf-sad predict", predict_main.__doc__, (PredictArguments,),
                                                  _argv(argv)))
    if args.backend == "pytorch":
        model, processor = load_saved_detector(args.model)
        report = predict_images(model, args.images, args.output_dir, threshold=args.threshold,
                                batch_size=args.batch_size, device=args.device, processor=processor)
    else:
        report = predict_images(args.model, args.images, args.output_dir, threshold=args.threshold,
                                batch_size=args.batch_size, backend=args.backend, exported_file=args.exported_file)
    print(report.summary())
    return report.detections


@dataclass
class ExportArguments:
    """Export a saved detector with its post-processing (box decoding, NMS) to ONNX or OpenVINO."""

    model_dir: str = field(metadata={"help": "The saved model folder."})
    format: str = field(default="onnx", metadata={"help": "Export format.", "choices": ["onnx", "openvino"]})
    output: str | None = field(default=None, metadata={
        "help": "File to write (default: MODEL_DIR/model.onnx, or MODEL_DIR/openvino_model.xml with its .bin)."})
    int8: bool = field(default=False, metadata={
        "help": "Also write an int8 model (ONNX Runtime static quantisation) as model_int8.onnx beside the float one; "
        "needs --calibration_data."})
    calibration_data: str | None = field(default=None, metadata={
        "help": "Images to calibrate int8 with: an image folder, parquet shards or a Hub dataset."})
    num_calibration_images: int = field(default=100, metadata={"help": "How many calibration images to read."})


def export_main(argv: list[str] | None = None) -> dict[str, str]:
    """`hf-sad export MODEL_DIR [--format onnx|openvino] [--int8 --calibration_data IMAGES]`: the model with its
    post-processing in one graph, where `hf-sad predict --backend onnxruntime|openvino` finds it."""
    import tempfile

    from .export import EXPORT_FORMATS, export_onnx, export_openvino, quantize_onnx

    argv = _argv(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv[0], *argv[1:]]
    args = from_namespace(ExportArguments, parse("hf-sad export", export_main.__doc__, (ExportArguments,), argv))
    if args.int8 and (args.format != "onnx" or not args.calibration_data):
        raise ValueError("--int8 quantises the ONNX export (--format onnx) and needs --calibration_data IMAGES.")
    if not Path(args.model_dir).is_dir():
        raise FileNotFoundError(f"{args.model_dir}: no such model folder.")
    model, processor = load_saved_detector(args.model_dir)
    output = Path(args.output or Path(args.model_dir) / EXPORT_FORMATS[args.format])
    written = {}
    if args.format == "onnx":
        written["onnx"] = str(export_onnx(model, processor, output))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            written["openvino"] = str(export_openvino(export_onnx(model, processor, Path(tmp) / "model.onnx"), output))
    if args.int8:
        images = first_images(args.calibration_data, args.num_calibration_images)
        written["onnx_int8"] = str(quantize_onnx(output, output.with_name(f"{output.stem}_int8.onnx"), processor,
                                                 images))
    backend = "onnxruntime" if args.format == "onnx" else "openvino"
    if write_exports_into_card(args.model_dir):
        written["card"] = str(Path(args.model_dir) / "README.md")
    print("\n".join(f"Wrote {path}" for path in written.values()))
    print(f"Run it: hf-sad predict --model {args.model_dir} --backend {backend} --images IMAGES")
    return written


@dataclass
class PushArguments:
    """Upload a saved detector (weights, processor, remote code, card) to the Hugging Face Hub."""

    model_dir: str = field(metadata={"help": "The saved model folder."})
    repo_id: str = field(metadata={"help": "NAMESPACE/NAME of the Hub repository."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def push_main(argv: list[str] | None = None) -> str:
    """`hf-sad push MODEL_DIR --repo-id NAMESPACE/NAME [--private]`; the token comes from `hf auth login`/HF_TOKEN."""
    from .hub import push_to_hub

    argv = _argv(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model_dir", argv[0], *argv[1:]]
    args = from_namespace(PushArguments, parse("hf-sad push", push_main.__doc__, (PushArguments,), argv))
    url = push_to_hub(args.model_dir, args.repo_id, private=args.private, revision=args.revision)
    print(f"Pushed {args.model_dir} to {url}")
    return url


COMMANDS = {
    "demo": (demo_main, "teacher -> student distillation demo on built-in data"),
    "train": (train_main, "supervised training of a teacher or baseline student"),
    "distill": (distill_main, "distil a frozen teacher into a student (SAD)"),
    "evaluate": (evaluate_main, "COCO mAP of a saved model on a dataset"),
    "predict": (predict_main, "detections for images: JSON and drawn pictures"),
    "export": (export_main, "export a saved model to ONNX / OpenVINO, with its post-processing"),
    "push": (push_main, "upload a saved model to the Hugging Face Hub"),
}


def _argv(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def configure_logging() -> None:
    """hf_sad's own messages at INFO on the console; other libraries (HTTP clients included) only from WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_sad").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> Any:
    """`hf-sad COMMAND [--help] ...`: runs the command; errors propagate (see `console_main`)."""
    argv = _argv(argv)
    if not argv or argv[0] not in COMMANDS:
        lines = ["usage: hf-sad COMMAND [--help] ...", "", "commands:"]
        lines += [f"  {name:<10}{description}" for name, (_, description) in COMMANDS.items()]
        print("\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    configure_logging()
    return COMMANDS[argv[0]][0](argv[1:])


def console_main() -> None:
    """The `hf-sad` console script: `main()`, with data, path and configuration errors (and runs stopped on purpose,
    and a Hub that cannot be reached) shown as one message (no traceback) and exit status 1."""
    try:
        main()
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, TrainingStopped) as error:
        print(f"hf-sad: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["DataArguments", "ModelArguments", "TeacherArguments", "UnlabeledDataArguments", "console_main", "main"]
