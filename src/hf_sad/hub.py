"""Model cards for distilled students and pushing saved students to the Hugging Face Hub.

`create_model_card` renders the package's Jinja template (`hf_sad/model_cards/student.md`) into a
`huggingface_hub.ModelCard` with structured metadata (`pipeline_tag`, `library_name`, `base_model`, `model-index`);
`push_to_hub` uploads a folder written by `save_pretrained` (model + image processor + card) with `HfApi`.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import jinja2
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .evaluation import METRIC_NAMES

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "student.md"
CARD_TAGS = ["hf-sad", "object-detection", "knowledge-distillation", "semi-supervised", "retinanet"]
SUPERVISED_TAGS = ["hf-sad", "object-detection", "retinanet"]

# The card's results table shows the AP summary figures.
RESULT_COLUMNS = {key: name for key, name in METRIC_NAMES.items() if key.startswith("map")}
# Keys that go into the structured `model-index`, with the IoU range each one averages over.
MODEL_INDEX_METRICS = {"map": "IoU=0.50:0.95", "map_50": "IoU=0.50", "map_75": "IoU=0.75"}

# Never uploaded: Trainer checkpoints and state (pickles, optimizer moments, absolute paths in trainer_state.json).
PUSH_IGNORE_PATTERNS = [
    "checkpoint-*",
    "*/checkpoint-*",
    "runs/*",
    "training_args.bin",
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.pickle",
    ".ipynb_checkpoints/*",
    "*.lock",
]
DEFAULT_COMMIT_MESSAGE = "Upload SAD student detector with hf-sad"
OPENVINO_SUFFIX = "openvino_model.xml"
EXPORTS_TEMPLATE = "exports.md"
EXPORTS_MARKERS = ("<!-- hf-sad exports: begin -->", "<!-- hf-sad exports: end -->")
#: Files `hf-sad export` writes -> how the card describes them.
EXPORTED_FILES = {
    "model.onnx": "ONNX (opset 18), float32: ONNX Runtime, or any runtime with ONNX's `NonMaxSuppression`.",
    "model_int8.onnx": "ONNX with int8 convolutions (static quantisation): faster on CPUs, slightly less accurate.",
    "openvino_model.xml": "OpenVINO IR, float32, with its weights in `openvino_model.bin`.",
}

_PLACEHOLDER_REPO_ID = re.compile(r"your-username/[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SECRET_KEY = re.compile(r"token(?!iz)|secret|password|api_?key|credential", re.IGNORECASE)
_MAX_SCANNED_BYTES = 64 * 1024 * 1024  # token scan before upload: larger files are weights, read only in chunks


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def card_template(name: str = CARD_TEMPLATE) -> str:
    """The Jinja source of a model-card template (default: the student card), read from the installed package
    (works from a wheel or zip)."""
    return resources.files("hf_sad.model_cards").joinpath(name).read_text(encoding="utf-8")


def looks_like_local_path(name: str) -> bool:
    """Whether `name` is a filesystem path rather than a Hub id: absolute, home- or dot-relative, or existing."""
    if not name:
        return False
    if name.startswith(("~", ".", "/", "\\")) or PureWindowsPath(name).drive or os.path.isabs(name):
        return True
    return Path(name).exists()


def is_hub_id(name: str | None) -> bool:
    """Whether `name` looks like a Hub repo id `namespace/name` (and is not a local path that happens to match)."""
    if not name or looks_like_local_path(name):
        return False
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name and not name.endswith(".git")


def public_name(name: str) -> str:
    """`name` safe to publish: a local path is reduced to its last component (the card never shows local paths)."""
    if not looks_like_local_path(name):
        return name
    parts = PureWindowsPath(name).parts if "\\" in name else PurePosixPath(os.path.expanduser(name)).parts
    return parts[-1] if parts and parts[-1] not in ("/", "\\") else name.strip("/\\~.") or "local"


def _source_display(name: str | None, *, what: str) -> str:
    """Markdown for a teacher or data set: a Hub link for a Hub id, the folder name for a local path."""
    if not name:
        return "not recorded"
    if is_hub_id(name):
        return f"[`{name}`](https://huggingface.co/{name})"
    if looks_like_local_path(name):
        return f"`{public_name(name)}` (a local {what}, not on the Hub)"
    return f"`{name}`"


def _teachers_display(teachers: Sequence[str]) -> str:
    """Markdown for the teacher, or for each member of an ensemble."""
    if len(teachers) > 1:
        return f"an ensemble of {len(teachers)}: " + ", ".join(_source_display(t, what="checkpoint") for t in teachers)
    return _source_display(teachers[0] if teachers else None, what="checkpoint")


def _fraction(value: Any) -> float | None:
    """A metric value as a float in [0, 1], or None when missing / NaN (COCO gives -1 or NaN for empty areas)."""
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    if math.isnan(value) or value < 0:
        return None
    if value > 1.0:
        raise ValueError(f"Metrics must be fractions in [0, 1] as returned by hf_sad.evaluation, got {value}.")
    return value


def normalize_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """COCO metrics -> `{key: fraction}` for the known AP keys; `eval_` / `test_` prefixes are stripped."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        key = re.sub(r"^(eval|test|validation|val)_", "", key)
        if key in RESULT_COLUMNS and (fraction := _fraction(value)) is not None:
            out[key] = fraction
    return out


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _format_value(value: Any) -> str:
    """A hyper-parameter value for a markdown table cell (local paths reduced to their last component)."""
    if isinstance(value, str):
        text = public_name(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, Mapping):
        text = ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_format_value(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _hyperparameter_rows(hyperparameters: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """`(name, value)` rows; anything named like a credential is dropped, never rendered."""
    return [
        (str(name), _format_value(value))
        for name, value in (hyperparameters or {}).items()
        if value is not None and not _SECRET_KEY.search(str(name))
    ]


def _results_rows(
    rows: Sequence[tuple[str, dict[str, float]]],
) -> tuple[list[str], list[dict[str, Any]]]:
    """The results table: the columns present in any row, and per model its values in percent."""
    keys = [key for key in RESULT_COLUMNS if any(key in metrics for _, metrics in rows)]
    table = [
        {"name": name, "values": [_percent(metrics.get(key)) for key in keys]} for name, metrics in rows if metrics
    ]
    return [RESULT_COLUMNS[key] for key in keys], table


def _eval_results(metrics: dict[str, float], *, dataset_type: str, dataset_name: str) -> list[EvalResult]:
    """The student's mAP (percent) as `model-index` entries."""
    return [
        EvalResult(
            task_type="object-detection",
            task_name="Object Detection",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            metric_type="mAP",
            metric_name=RESULT_COLUMNS[key],
            metric_config=iou,
            metric_value=round(100 * metrics[key], 2),
        )
        for key, iou in MODEL_INDEX_METRICS.items()
        if key in metrics
    ]


def create_model_card(
    *,
    model_name: str,
    id2label: Mapping[int | str, str],
    backbone: str,
    teacher: str | Sequence[str] | None = None,
    teacher_backbone: str | None = None,
    datasets: Sequence[str] | None = None,
    metrics: Mapping[str, Any] | None = None,
    teacher_metrics: Mapping[str, Any] | None = None,
    baseline_metrics: Mapping[str, Any] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    dataset_name: str = "custom",
    detections_image: str | None = "detections.png",
    repo_id: str | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
    base_model: str | None = None,
    method: str = "sad",
    versions: Mapping[str, str] | None = None,
) -> ModelCard:
    """Render the model card (`README.md`) of a detector: a distilled student (`method="sad"`) or a supervised one.

    Args:
        model_name: title of the card and name of the `model-index` entry (a local path is reduced to its folder name).
        id2label: class id -> class name of the student.
        backbone: timm name of the student's backbone, e.g. `"resnet18"`.
        teacher: Hub id (`namespace/name`) or local path of the teacher, or a list of them (an ensemble), or a
            description (the mean teacher). Hub ids become `base_model`; a local path is shown by its folder name and
            marked local.
        teacher_backbone: timm name of the teacher's backbone, if known.
        datasets: training data sets; Hub ids go into the `datasets` metadata, local paths are shown by name only.
        metrics: the student's COCO metrics as fractions in [0, 1] (`map`, `map_50`, `map_75`, `map_small`, ...;
            `eval_` prefixes are accepted). They are published in percent.
        teacher_metrics: the teacher's COCO metrics on the same data, same format.
        baseline_metrics: a supervised-only student's COCO metrics on the same data, same format.
        hyperparameters: distillation settings shown as a table (`distill_loss`, `adl_beta`, `adl_gamma`,
            `temperature`, `normalizer`, `unlabeled_ratio`, `steps`, `lr`, `image_size`, ...). Keys that name a
            credential (`*token*`, `*secret*`, ...) are dropped.
        dataset_name: human-readable name of the evaluation data set.
        detections_image: file name, inside the repo, of a picture of detections; `None` when there is none.
        repo_id: Hub id the card is written for, used in the usage snippet; without one the snippet shows
            `your-username/<model_name>`, which `push_to_hub` replaces by the real repo id.
        license: license identifier for the metadata (e.g. `"apache-2.0"`), optional.
        tags: extra Hub tags.
        base_model: the checkpoint the model was initialised from (a Hub id; local paths are left out). Default: the
            teacher, when it is a Hub id.
        method: `"sad"` (distilled from `teacher`) or `"supervised"` (a teacher or a baseline; no teacher shown).
        versions: library name -> version, listed as the framework versions (see `framework_versions`).

    Returns:
        A `huggingface_hub.ModelCard`; `card.save(folder / "README.md")` writes it.
    """
    if method not in ("sad", "supervised"):
        raise ValueError(f"method must be 'sad' or 'supervised', got {method!r}.")
    distilled = method == "sad"
    teachers = [teacher] if isinstance(teacher, str) else list(teacher or [])
    hub_teachers = [t for t in teachers if is_hub_id(t)] if distilled else []
    hub_datasets = [d for d in datasets or [] if is_hub_id(d)]
    if dataset_name == "custom" and hub_datasets:
        dataset_name = hub_datasets[0]
    dataset_name = public_name(dataset_name)
    model_name = public_name(model_name)
    student = normalize_metrics(metrics)

    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=list(dict.fromkeys([*(CARD_TAGS if distilled else SUPERVISED_TAGS), *(tags or [])])),
        license=license,
        base_model=base_model if is_hub_id(base_model) else (hub_teachers if len(hub_teachers) > 1
                                                             else hub_teachers[0] if hub_teachers else None),
        datasets=hub_datasets or None,
        eval_results=_eval_results(
            student,
            dataset_type=dataset_name if is_hub_id(dataset_name) else re.sub(r"[^\w.-]+", "-", dataset_name).strip("-"),
            dataset_name=dataset_name,
        )
        or None,
    )
    columns, rows = _results_rows(
        [
            (f"**{model_name}** ({'student, SAD' if distilled else 'supervised'})", student),
            (f"teacher{f' ({teacher_backbone})' if teacher_backbone else ''}", normalize_metrics(teacher_metrics)),
            ("supervised baseline (same student, no distillation)", normalize_metrics(baseline_metrics)),
        ]
    )
    labels = [name for _, name in sorted((int(k), v) for k, v in id2label.items())]
    return ModelCard.from_template(
        card_data,
        # Read through importlib.resources (a real file is not guaranteed, e.g. zipped installs), so pass the text.
        template_str=card_template(),
        model_name=model_name,
        backbone=backbone,
        num_classes=len(labels),
        classes_display=", ".join(f"`{name}`" for name in labels),
        teacher_display=_teachers_display(teachers),
        teacher_backbone=teacher_backbone,
        data_display=", ".join(_source_display(d, what="data set") for d in datasets) if datasets else dataset_name,
        dataset_display=f"`{dataset_name}`",
        hyperparameters=_hyperparameter_rows(hyperparameters),
        result_columns=columns,
        results_rows=rows,
        detections_image=PurePosixPath(detections_image.replace("\\", "/")).name if detections_image else None,
        repo_id=repo_id or placeholder_repo_id(model_name),
        license=license,
        distilled=distilled,
        versions=sorted((versions or {}).items()),
    )


def run_card_settings(args, processor) -> dict[str, Any]:
    """The settings that define a run (`SADTrainingArguments`), as its model card lists them: the optimisation and
    augmentation, then the ones its distillation mode names (`hf_sad.distillation.modes`)."""
    mode = args.mode
    settings = {
        "distill_loss": args.distill_loss if mode.needs_teacher else None,
        "steps": args.max_steps,
        "learning_rate": args.learning_rate,
        "batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
        "image_size": dict(processor.size) if processor is not None else None,
        "hflip_prob": args.hflip_prob,
        "scale_jitter": list(args.scale_jitter),
        **{name: getattr(args, name) for name in mode.card_settings},
    }
    return {k: v for k, v in settings.items() if v is not None}


def write_run_card(
    trainer,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: str | list[str] | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    baseline_metrics: dict[str, float] | None = None,
    teacher_metrics: dict[str, float] | None = None,
    detections_image: str | None = None,
    **kwargs,
) -> Path:
    """Write the model card (`README.md`) of a `SADTrainer`'s run into its output folder; returns the file.

    Args:
        trainer: the trainer (its model, teacher, settings and the metrics of its last evaluations).
        model_name: the card's title; defaults to the Hub repo's name or the output folder's.
        dataset_name: the evaluation data's name (Hub id or local name).
        tags: extra Hub tags.
        license: license identifier for the metadata, e.g. "apache-2.0".
        datasets: training data sources; Hub ids go into the card's `datasets` metadata.
        baseline_metrics: COCO metrics of a supervised student trained on the same data, for the results table.
        teacher_metrics: the teacher's COCO metrics on the evaluation data; default: those of `evaluate_teacher`.
        detections_image: a picture of detections inside the output folder, shown in the card.
        kwargs: `finetuned_from` and `dataset`, as transformers' `Trainer.create_model_card` takes them.
    """
    unknown = set(kwargs) - {"finetuned_from", "dataset", "language", "tasks", "dataset_tags", "dataset_args"}
    if unknown:
        raise TypeError(f"create_model_card() got unexpected arguments {sorted(unknown)}.")
    args = trainer.args
    output_dir = Path(args.output_dir)
    repo_id = getattr(trainer, "hub_model_id", None) or args.hub_model_id
    teacher = trainer.teacher
    if detections_image is None and (output_dir / "detections.png").is_file():
        detections_image = "detections.png"
    card = create_model_card(
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else output_dir.name),
        id2label=trainer.model.config.id2label,
        backbone=trainer.model.config.backbone,
        teacher=teacher.source if teacher is not None else None,
        teacher_backbone=teacher.backbone if teacher is not None else None,
        datasets=datasets,
        metrics=_last_metrics(trainer, "eval_"),
        teacher_metrics=teacher_metrics if teacher_metrics is not None else _last_metrics(trainer, "teacher_"),
        baseline_metrics=baseline_metrics,
        hyperparameters=run_card_settings(args, trainer.processing_class),
        dataset_name=dataset_name or kwargs.get("dataset") or "custom",
        detections_image=detections_image,
        repo_id=repo_id,
        license=license,
        tags=[tags] if isinstance(tags, str) else tags,
        base_model=kwargs.get("finetuned_from"),
        method="sad" if teacher is not None else "supervised",
        versions=framework_versions(),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    card.save(str(output_dir / "README.md"))
    return output_dir / "README.md"


def _last_metrics(trainer, prefix: str) -> dict[str, float]:
    """The metrics of the trainer's last log entry holding `{prefix}map`, prefix stripped (empty when there is
    none)."""
    for entry in reversed(trainer.state.log_history):
        if f"{prefix}map" in entry:
            return {k.removeprefix(prefix): v for k, v in entry.items() if k.startswith(prefix)}
    return {}


def write_exports_into_card(model_dir: str | os.PathLike) -> bool:
    """Name the exported files of a model folder (`hf-sad export`) in its card (README.md), with how to run them:
    a section after the usage, replaced by later exports. Returns whether the card names any export."""
    folder = Path(model_dir)
    card = folder / "README.md"
    if not card.is_file():
        return False
    files = [(name, description) for name, description in EXPORTED_FILES.items() if (folder / name).is_file()]
    text = card.read_text(encoding="utf-8")
    begin, end = EXPORTS_MARKERS
    if begin in text and end in text:
        before, after = text[: text.index(begin)].rstrip("\n"), text[text.index(end) + len(end) :].lstrip("\n")
        text = f"{before}\n\n{after}" if after else f"{before}\n"
    if files:
        settings = json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8"))
        title = re.search(r"^# (.+)$", text, flags=re.MULTILINE)
        model_name = title.group(1).strip() if title else folder.name
        repo_id = _PLACEHOLDER_REPO_ID.search(text)  # the card's own; push_to_hub puts the real one in its place
        section = jinja2.Template(card_template(EXPORTS_TEMPLATE)).render(
            files=files,
            model_name=model_name,
            repo_id=repo_id.group(0) if repo_id else placeholder_repo_id(model_name),
            backend="onnxruntime" if (folder / "model.onnx").is_file() else "openvino",
            **{key: settings.get(key) for key in ("max_detections", "pre_nms_top_k", "nms_iou_threshold")},
        )
        block = f"{begin}\n{section.strip()}\n{end}\n"
        at = text.find("\n## Citation")
        text = text[: at + 1] + block + "\n" + text[at + 1 :] if at >= 0 else text.rstrip("\n") + "\n\n" + block
    card.write_text(text, encoding="utf-8")
    return bool(files)


def placeholder_repo_id(model_name: str) -> str:
    """The repo id a card shows until the model is pushed (`push_to_hub` puts the real one in its place)."""
    return f"your-username/{model_name}"


def framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a saved detector depends on (for the model card)."""
    names = ("hf-sad", "transformers", "torch", "torchvision", "timm", "datasets", "accelerate")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# --------------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------------


def check_saved_student(model_dir: str | os.PathLike) -> Path:
    """Check that `model_dir` holds a saved SAD detector and its image processor; return it as a `Path`.

    Raises:
        FileNotFoundError: naming every required file that is missing (config.json, safetensors weights,
            preprocessor_config.json).
        ValueError: config.json is not a SAD config (`model_type` is not `"sad"`).
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; save the student with save_pretrained first.")
    missing = []
    config_file = folder / "config.json"
    if not config_file.is_file():
        missing.append("config.json (model.save_pretrained)")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors weights (model.save_pretrained with safetensors)")
    if not (folder / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json (processor.save_pretrained)")
    if missing:
        raise FileNotFoundError(f"{folder} is not a saved SAD student; missing: {'; '.join(missing)}.")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != "sad":
        raise ValueError(f"{config_file} has model_type {model_type!r}, expected 'sad' (an hf_sad detector).")
    if not (folder / "README.md").is_file():
        logger.warning("%s has no README.md: the repo gets no model card (see hf_sad.hub.create_model_card).", folder)
    return folder


def files_to_upload(model_dir: str | os.PathLike) -> list[str]:
    """Relative paths (posix) of the files `push_to_hub` uploads from `model_dir`: all but those matching
    `PUSH_IGNORE_PATTERNS`, except that an OpenVINO export's weights (`openvino_model.bin`, raw tensors that OpenVINO
    reads as data, never a pickle) go with its `openvino_model.xml`."""
    folder = Path(model_dir)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(files, ignore_patterns=PUSH_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))
    for xml in [name for name in kept if name.endswith(OPENVINO_SUFFIX)]:
        weights = xml.removesuffix(".xml") + ".bin"
        if weights in files:
            kept.append(weights)
    return sorted(kept)


def _files_containing(folder: Path, files: Sequence[str], secret: str) -> list[str]:
    """Those of `files` (relative to `folder`) whose bytes contain `secret`; big files are read in 1 MiB chunks."""
    needle = secret.encode()
    hits = []
    for name in files:
        with (folder / name).open("rb") as f:
            tail = b""
            for _ in range(_MAX_SCANNED_BYTES // (1 << 20)):
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                if needle in tail + chunk:
                    hits.append(name)
                    break
                tail = chunk[-len(needle) :]
    return hits


def _write_repo_id_into_card(card: Path, repo_id: str) -> None:
    """Put the real repo id where a card written before the push shows `your-username/<name>`."""
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        updated = _PLACEHOLDER_REPO_ID.sub(repo_id, text)
        if updated != text:
            card.write_text(updated, encoding="utf-8")


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    revision: str | None = None,
) -> str:
    """Upload a saved student folder (weights, config, remote code, image processor, card, pictures, results).

    Trainer checkpoints and pickles (`checkpoint-*`, `training_args.bin`, `*.bin`, `*.pt`, optimizer and scheduler
    states) are never uploaded; the weights go as safetensors. Exports (`hf-sad export`) go with them and are named
    in the card.

    Args:
        model_dir: folder written by `model.save_pretrained` + `processor.save_pretrained` (+ `README.md`).
        repo_id: target Hub repo, `namespace/name`; created if it does not exist.
        private: create the repo as private (ignored if it already exists).
        token: Hub token with write access; `None` uses the usual sources (`HF_TOKEN`, `hf auth login`).
        commit_message: summary of the commit.
        revision: branch to push to (created from `main` if missing); `None` pushes to `main`.

    Returns:
        The URL of the new commit.

    Raises:
        PermissionError: no token is available (pushing always needs one, and a private repo must never be attempted
            anonymously).
        FileNotFoundError / ValueError: `model_dir` is not a saved SAD student (see `check_saved_student`), or a file
            in it contains the token.

    A card written before the repo id was known (`your-username/<name>` in its usage snippet) gets the real id.
    """
    folder = check_saved_student(model_dir)
    token = token or get_token()
    if not token:
        visibility = "a private" if private else "a"
        raise PermissionError(
            f"Pushing {visibility} repo ({repo_id}) needs a Hugging Face token with write access: log in with "
            "`hf auth login`, set HF_TOKEN, or pass token=..."
        )
    # A token pasted into a config or card would be published with it: refuse before anything leaves the machine.
    if leaked := _files_containing(folder, files_to_upload(folder), token):
        raise ValueError(f"Refusing to upload: these files contain your Hub token: {', '.join(leaked)}.")

    write_exports_into_card(folder)
    _write_repo_id_into_card(folder / "README.md", repo_id)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        revision=revision,
        allow_patterns=[glob.escape(name) for name in files_to_upload(folder)],  # exactly these files
    )
    url = getattr(commit, "commit_url", None) or str(repo_url)
    logger.info("Pushed %s to %s", folder.name, url)
    return url
