"""SADTrainer: a transformers `Trainer` that distils a frozen teacher detector into a student with ADL.

One training step takes a mixed batch of labeled and unlabeled images, runs the student once and the teacher once
(no gradients) over the same augmented pixels, and adds

- the supervised focal + box loss on the labeled images,
- a distillation term (`distill_loss`) on the labeled images, weighted by `labeled_distill_weight`,
- a distillation term on the unlabeled images, weighted by `unlabeled_distill_weight`.

Anchors in the ignore band of the ground-truth boxes (labeled images) or of the teacher's pseudo-boxes (unlabeled
images) are left out of the distillation, as in the original implementation.
"""

from __future__ import annotations

import json
import logging
import math
import re
import types
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForObjectDetection, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import SADDataCollator, build_training_stream, category_mapping, dataset_label_names
from .evaluation import DetectionMetrics, pack_detections, pack_targets
from .losses import adaptive_distillation_loss, focal_distillation_loss, hard_pseudo_labels, kl_distillation_loss
from .modeling_sad import SADForObjectDetection

logger = logging.getLogger(__name__)

DISTILL_LOSSES = ("adl", "kl", "fdl", "hard", "none")
_TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SADTrainingArguments(TrainingArguments):
    r"""
    Arguments of [`SADTrainer`]: everything of [`~transformers.TrainingArguments`] plus the distillation settings.
    Defaults of some inherited fields are changed to what detection needs (see below).

    Parameters:
        distill_loss (`str`, *optional*, defaults to `"adl"`):
            `"adl"`: Adaptive Distillation Loss; `"kl"`: plain binary KL; `"fdl"`: focal distillation (hard-to-mimic
            only, ADL with beta = 0); `"hard"`: teacher detections above `pseudo_label_threshold` as hard targets on
            unlabeled images (data distillation); `"none"`: supervised training only (a baseline; no teacher needed).
        adl_beta (`float`, *optional*, defaults to 1.0):
            ADL weight of the teacher's entropy (hard-to-learn samples), in the paper's sense.
        adl_gamma (`float`, *optional*, defaults to 2.0):
            ADL focusing exponent.
        adl_variant (`str`, *optional*, defaults to `"paper"`):
            `"paper"` (weight x KL) or `"released"` (weight x alpha-balanced soft cross-entropy, as the original code).
        distill_temperature (`float`, *optional*, defaults to 1.0):
            Temperature applied to both logits; the loss is multiplied by its square.
        distill_normalizer (`str`, *optional*, defaults to `"adaptive"`):
            `"adaptive"`: max(1, sum of q ** `normalizer_power`) over the distilled anchors, a teacher-defined soft
            count of positives that also exists on unlabeled images; `"positives"`: the number of positive anchors
            (ground truth or pseudo-boxes), as RetinaNet normalises its focal loss.
        normalizer_power (`float`, *optional*, defaults to 1.8):
            Exponent of the adaptive normaliser.
        labeled_distill_weight (`float`, *optional*, defaults to 1.0):
            Weight of the distillation term on labeled images.
        unlabeled_distill_weight (`float`, *optional*, defaults to 1.0):
            Weight of the distillation term on unlabeled images.
        unlabeled_ratio (`float`, *optional*, defaults to 0.5):
            Share of unlabeled images in the training stream (0.5 alternates labeled and unlabeled, as the paper).
            Ignored without an unlabeled dataset.
        pseudo_label_threshold (`float`, *optional*, defaults to 0.5):
            Teacher score above which a detection becomes a pseudo-box (for `"hard"`, and for the box loss and the
            ignore mask on unlabeled images).
        pseudo_box_weight (`float`, *optional*, defaults to 1.0):
            Weight of the box regression loss against the teacher's pseudo-boxes on unlabeled images (ADL, KL and
            focal distillation; the soft targets train classification only, so without it the unlabeled images
            teach no localisation). 0 disables it.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the teacher's weights: `"float32"`, `"bfloat16"`, `"float16"`, or `"auto"` (bfloat16 with
            `--bf16`, float16 with `--fp16`, else float32).
        hflip_prob (`float`, *optional*, defaults to 0.5):
            Probability of a horizontal flip of a training image.
        scale_jitter (`list[float]`, *optional*, defaults to `[0.8, 1.2]`):
            Range of the factor applied to the processor's target size for training images.
        max_skipped_image_fraction (`float`, *optional*, defaults to 0.01):
            Undecodable training images are skipped (and counted: `skipped_images` in the logs and the results); the
            run stops with an error naming examples when more than this share of the images read was skipped.
        min_images_before_skip_check (`int`, *optional*, defaults to 1000):
            `max_skipped_image_fraction` is only judged once this many training images were read (all processes
            together), so that one bad file early in a run does not stop it.
        skip_bad_labeled_images (`bool`, *optional*, defaults to `False`):
            Skip (and count) undecodable labeled images too; by default such an image is an error naming it.
        max_consecutive_nonfinite_steps (`int`, *optional*, defaults to 10):
            A step whose loss or gradients are NaN/inf is skipped (no weight, optimizer-state or BatchNorm update) and
            counted (`nonfinite_steps`); this many such steps in a row stop the run with an error.
    """

    distill_loss: str = field(default="adl", metadata={"help": f"Distillation loss, one of {DISTILL_LOSSES}."})
    adl_beta: float = field(default=1.0, metadata={"help": "ADL weight of the teacher entropy (paper's beta)."})
    adl_gamma: float = field(default=2.0, metadata={"help": "ADL focusing exponent."})
    adl_variant: str = field(default="paper", metadata={"help": "'paper' (x KL) or 'released' (x soft CE)."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    distill_normalizer: str = field(default="adaptive", metadata={"help": "'adaptive' or 'positives'."})
    normalizer_power: float = field(default=1.8, metadata={"help": "Exponent of the adaptive normaliser."})
    labeled_distill_weight: float = field(default=1.0, metadata={"help": "Weight of distillation on labeled images."})
    unlabeled_distill_weight: float = field(default=1.0, metadata={"help": "Weight of distillation on unlabeled data."})
    unlabeled_ratio: float = field(default=0.5, metadata={"help": "Share of unlabeled images in the stream."})
    pseudo_label_threshold: float = field(default=0.5, metadata={"help": "Teacher score threshold of pseudo-boxes."})
    pseudo_box_weight: float = field(
        default=1.0, metadata={"help": "Weight of the box loss on teacher pseudo-boxes of unlabeled images."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "float32, bfloat16, float16 or auto."})
    hflip_prob: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    scale_jitter: list[float] = field(default_factory=lambda: [0.8, 1.2], metadata={"help": "Scale jitter range."})
    max_skipped_image_fraction: float = field(
        default=0.01, metadata={"help": "Stop when more than this share of training images could not be decoded."}
    )
    min_images_before_skip_check: int = field(
        default=1000, metadata={"help": "Judge max_skipped_image_fraction only after this many images were read."}
    )
    skip_bad_labeled_images: bool = field(
        default=False, metadata={"help": "Skip undecodable labeled images instead of stopping with an error."}
    )
    max_consecutive_nonfinite_steps: int = field(
        default=10, metadata={"help": "Stop after this many consecutive steps with a NaN/inf loss (each is skipped)."}
    )

    # Detection-correct defaults of inherited fields.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns: the collator needs them."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Per-batch predictions for COCO mAP."})
    ddp_find_unused_parameters: bool = field(default=False, metadata={"help": "Every student parameter is used."})
    label_names: list[str] = field(default_factory=lambda: ["labels"], metadata={"help": "Inputs holding labels."})
    metric_for_best_model: str = field(default="map", metadata={"help": "Best checkpoint by COCO mAP."})

    def __post_init__(self):
        # Batches hold lists of per-image dicts: let every process read its own data instead of concatenating on
        # rank 0 (which fails on such batches); accelerate then shards the stream by rank.
        if self.accelerator_config is None:
            self.accelerator_config = {"dispatch_batches": False}
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every loader otherwise
        super().__post_init__()
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"SADTrainingArguments.{name}={getattr(self, name)!r} is invalid: expected {expected}.")

        if self.distill_loss not in DISTILL_LOSSES:
            fail("distill_loss", f"one of {DISTILL_LOSSES}")
        if self.adl_variant not in ("paper", "released"):
            fail("adl_variant", "'paper' or 'released'")
        if self.distill_normalizer not in ("adaptive", "positives"):
            fail("distill_normalizer", "'adaptive' or 'positives'")
        if self.teacher_dtype not in (*_TEACHER_DTYPES, "auto"):
            fail("teacher_dtype", f"one of {(*_TEACHER_DTYPES, 'auto')}")
        for name in ("adl_beta", "adl_gamma", "labeled_distill_weight", "unlabeled_distill_weight"):
            if getattr(self, name) < 0:
                fail(name, "a non-negative number")
        for name in ("distill_temperature", "normalizer_power"):
            if getattr(self, name) <= 0:
                fail(name, "a positive number")
        if not 0 <= self.unlabeled_ratio < 1:
            fail("unlabeled_ratio", "a share in [0, 1)")
        if not 0 < self.pseudo_label_threshold < 1:
            fail("pseudo_label_threshold", "a score strictly between 0 and 1")
        if not (math.isfinite(self.pseudo_box_weight) and self.pseudo_box_weight >= 0):
            fail("pseudo_box_weight", "a finite weight >= 0")
        if not 0 <= self.hflip_prob <= 1:
            fail("hflip_prob", "a probability")
        if len(self.scale_jitter) != 2 or not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            fail("scale_jitter", "two factors 0 < low <= high")
        if not 0 <= self.max_skipped_image_fraction <= 1:
            fail("max_skipped_image_fraction", "a share in [0, 1]")
        if self.min_images_before_skip_check < 0:
            fail("min_images_before_skip_check", "a non-negative number of images")
        if self.max_consecutive_nonfinite_steps < 1:
            fail("max_consecutive_nonfinite_steps", "a number of steps >= 1")

    def __getstate__(self) -> dict:
        """Pickled arguments (`training_args.bin`, which Trainer writes next to the model and into every checkpoint)
        never carry the Hub token; `to_dict`/`to_json_string` already redact it."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    @property
    def resolved_teacher_dtype(self) -> torch.dtype:
        if self.teacher_dtype != "auto":
            return _TEACHER_DTYPES[self.teacher_dtype]
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


def check_teacher_compatible(teacher: SADForObjectDetection, student: SADForObjectDetection) -> None:
    """Raise a ValueError listing every difference that would misalign teacher and student logits.

    Distillation compares the two models anchor by anchor and class by class, so they need the same pyramid levels,
    the same anchors per location and the same classes in the same order; backbones and widths may differ.
    """
    fields = ("min_level", "max_level", "anchor_scale", "scales_per_octave", "aspect_ratios")
    diffs = [
        f"{name}: teacher {getattr(teacher.config, name)!r} vs student {getattr(student.config, name)!r}"
        for name in fields
        if getattr(teacher.config, name) != getattr(student.config, name)
    ]
    teacher_labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
    student_labels = [student.config.id2label[i] for i in range(student.config.num_labels)]
    if teacher_labels != student_labels:
        diffs.append(f"classes (by id): teacher {teacher_labels} vs student {student_labels}")
    if diffs:
        raise ValueError(
            "Teacher and student are not compatible for distillation (their logits would not line up):\n  - "
            + "\n  - ".join(diffs)
            + "\nBuild the student with the teacher's levels, anchors and id2label."
        )


def _load_model(model: SADForObjectDetection | str, role: str) -> SADForObjectDetection:
    if isinstance(model, str):
        try:
            model = AutoModelForObjectDetection.from_pretrained(model)
        except (OSError, ValueError) as err:  # missing/unreadable files; ValueError: a folder without a SAD config
            raise ValueError(f"Could not load the {role} from {model!r}: {err}") from err
    if not isinstance(model, SADForObjectDetection):
        raise TypeError(f"The {role} must be a SADForObjectDetection, got {type(model).__name__}.")
    return model


_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: Suffix of the marker file `checkpoint-N.incomplete` that exists beside a checkpoint folder while it is written.
INCOMPLETE_SUFFIX = ".incomplete"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def checkpoint_problems(checkpoint: str | Path) -> list[str]:
    """Why `checkpoint` is not a complete Trainer checkpoint (an empty list when it is).

    A checkpoint is complete when its writing finished (no `checkpoint-N.incomplete` marker beside it, see
    `SADTrainer._save_checkpoint`), its `trainer_state.json` parses and it holds model weights.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    problems = []
    if path.with_name(path.name + INCOMPLETE_SUFFIX).exists():
        problems.append("its writing was interrupted (marker file " + path.name + INCOMPLETE_SUFFIX + ")")
    try:
        json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (OSError, ValueError):
        problems.append("trainer_state.json is unreadable")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        problems.append("it holds no model weights (model.safetensors)")
    return problems


def get_last_complete_checkpoint(folder: str | Path) -> str | None:
    """The complete `checkpoint-N` with the largest N in `folder` (transformers' `get_last_checkpoint` without the
    checkpoints whose writing was interrupted, which are logged and skipped), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.match(p.name))]
    for _, path in sorted(found, reverse=True):
        problems = checkpoint_problems(path)
        if not problems:
            return str(path)
        logger.warning("Ignoring the incomplete checkpoint %s: %s.", path, "; ".join(problems))
    return None


def _rows_detection_loss(detector: SADForObjectDetection, outputs, rows: list[int], targets: list[dict]):
    """The detector's supervised loss on a subset of the batch's images (`rows`) against `targets`."""
    return detector.detection_loss(
        outputs.logits[rows], outputs.box_regression[rows], outputs.anchors, targets, outputs.image_sizes[rows]
    )


def _is_empty_batch(inputs: dict[str, Any]) -> bool:
    """Whether a collated batch is the placeholder of a batch whose images were all undecodable (`SADDataCollator`)."""
    flag = inputs.get("empty_batch")
    return flag is not None and bool(flag)


class SADTrainer(Trainer):
    """Distils `teacher_model` into `model` on `train_dataset` (labeled) and `unlabeled_dataset` (images only).

    Args:
        model: the student, a `SADForObjectDetection` or a path / Hub id.
        teacher_model: the frozen teacher, a `SADForObjectDetection` or a path / Hub id (loaded with
            `from_pretrained`). Not needed with `distill_loss="none"`.
        args: `SADTrainingArguments`.
        train_dataset: labeled data in the transformers detection schema (`image`, `objects` with `bbox` in COCO
            xywh pixels and `category`), a `datasets.Dataset` or `IterableDataset`.
        unlabeled_dataset: any `datasets.Dataset` / `IterableDataset` with an image column, streaming included.
        eval_dataset: labeled data in the same schema; evaluation reports COCO mAP.
        processing_class: the student's `SADImageProcessor` (default: loaded from the student's folder).
    """

    _tag_names = ["hf-sad", "object-detection", "knowledge-distillation"]
    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer scales it for accumulation

    def __init__(
        self,
        model: SADForObjectDetection | str,
        teacher_model: SADForObjectDetection | str | None = None,
        args: SADTrainingArguments | None = None,
        train_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        unlabeled_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        args = args or SADTrainingArguments(output_dir="sad-student")
        if not isinstance(args, SADTrainingArguments):
            raise TypeError(f"args must be SADTrainingArguments, got {type(args).__name__}.")
        model = _load_model(model, "student")
        teacher = None
        if args.distill_loss != "none":
            if teacher_model is None:
                raise ValueError(
                    f"distill_loss={args.distill_loss!r} needs a teacher_model (or use distill_loss='none')."
                )
            teacher = _load_model(teacher_model, "teacher")
            check_teacher_compatible(teacher, model)
        if processing_class is None:
            processing_class = AutoImageProcessor.from_pretrained(model.name_or_path)

        category_map = None
        if train_dataset is not None:
            category_map = category_mapping(train_dataset, model.config.id2label)
            if eval_dataset is not None and dataset_label_names(eval_dataset) != dataset_label_names(train_dataset):
                raise ValueError(
                    f"eval_dataset classes {dataset_label_names(eval_dataset)} differ from train_dataset classes "
                    f"{dataset_label_names(train_dataset)}."
                )
            if args.max_steps <= 0:
                args.max_steps = self._steps_for_epochs(args, train_dataset, unlabeled_dataset)
            train_dataset = build_training_stream(
                train_dataset,
                unlabeled_dataset,
                unlabeled_ratio=args.unlabeled_ratio,
                category_map=category_map,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                num_shards=max(8, args.world_size * max(1, args.dataloader_num_workers)),
                id2label=model.config.id2label,
            )
        elif eval_dataset is not None:
            category_map = category_mapping(eval_dataset, model.config.id2label)
        collator = SADDataCollator(
            processing_class,
            hflip_prob=args.hflip_prob,
            scale_range=tuple(args.scale_jitter),
            seed=args.seed,
            category_map=category_map,
            id2label=model.config.id2label,
            skip_bad_labeled_images=args.skip_bad_labeled_images,
        )
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or DetectionMetrics(model.config.id2label),
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        # The teacher is a plain attribute, never a submodule: not trained, not saved, not wrapped by DDP.
        self.teacher = None
        if teacher is not None:
            dtype = args.resolved_teacher_dtype
            self.teacher = teacher.requires_grad_(False).eval().to(device=self.accelerator.device, dtype=dtype)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # Robustness counters, summed over processes (see training_step); reported in the logs and train() metrics.
        self._counts = {"images_seen": 0, "skipped_images": 0, "dropped_boxes": 0, "nonfinite_steps": 0}
        self._skipped_examples: list[str] = []
        self._step_health: dict[str, Any] = {}  # the optimizer step being accumulated: non-finite loss? rows?
        self._consecutive_nonfinite = 0

    @staticmethod
    def _steps_for_epochs(args: SADTrainingArguments, labeled, unlabeled) -> int:
        """`max_steps` that shows every labeled image `num_train_epochs` times (the stream itself never ends)."""
        if not hasattr(labeled, "__len__"):
            raise ValueError("A streaming train_dataset has no length: set max_steps.")
        labeled_share = 1 - args.unlabeled_ratio if unlabeled is not None else 1.0
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        return max(1, math.ceil(args.num_train_epochs * len(labeled) / (per_step * labeled_share)))

    # ------------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        labels, is_labeled = inputs["labels"], inputs["is_labeled"]
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
        detector: SADForObjectDetection = self.accelerator.unwrap_model(model)
        labeled_idx = is_labeled.nonzero().flatten().tolist()
        unlabeled_idx = (~is_labeled).nonzero().flatten().tolist()

        # Every student output enters the loss, so DDP sees a gradient for every parameter even on odd batches.
        loss = outputs.logits.sum() * 0.0 + outputs.box_regression.sum() * 0.0
        if _is_empty_batch(inputs):  # all images undecodable: a zero loss on the placeholder (training_step skips)
            return (loss, outputs) if return_outputs else loss
        assignment_labels = torch.zeros(outputs.logits.shape[:2], dtype=torch.long, device=outputs.logits.device)
        if labeled_idx:
            loss_gt, loss_dict, assignment = _rows_detection_loss(
                detector, outputs, labeled_idx, [labels[i] for i in labeled_idx]
            )
            loss = loss + loss_gt
            assignment_labels[labeled_idx] = assignment.labels
            self._record("loss_gt", loss_gt)
            self._record("loss_cls", loss_dict["loss_cls"])
            self._record("loss_box", loss_dict["loss_box"])

        if self.teacher is not None and model.training:
            loss = loss + self._distillation(detector, inputs, outputs, labeled_idx, unlabeled_idx, assignment_labels)
        return (loss, outputs) if return_outputs else loss

    def _distillation(self, detector, inputs, outputs, labeled_idx, unlabeled_idx, assignment_labels) -> torch.Tensor:
        args: SADTrainingArguments = self.args
        with torch.no_grad(), self.accelerator.autocast():
            teacher_out = self.teacher(
                pixel_values=inputs["pixel_values"].to(next(self.teacher.parameters()).dtype),
                pixel_mask=inputs.get("pixel_mask"),
            )
        if teacher_out.logits.shape != outputs.logits.shape:
            raise RuntimeError(
                f"Teacher logits {tuple(teacher_out.logits.shape)} do not line up with student logits "
                f"{tuple(outputs.logits.shape)}."
            )
        pseudo = {}
        if unlabeled_idx:
            pseudo_list = hard_pseudo_labels(
                teacher_out.logits[unlabeled_idx].float(),
                teacher_out.pred_boxes[unlabeled_idx].float(),
                threshold=args.pseudo_label_threshold,
                nms_iou_threshold=detector.config.nms_iou_threshold,
                max_detections=detector.config.max_detections,
            )
            pseudo = dict(zip(unlabeled_idx, pseudo_list))
            self._record("pseudo_boxes_per_image", sum(len(p["boxes"]) for p in pseudo_list) / len(pseudo_list))

        loss = outputs.logits.new_zeros((), dtype=torch.float32)
        if args.distill_loss == "hard":
            if unlabeled_idx:
                loss_hard, _, _ = _rows_detection_loss(
                    detector, outputs, unlabeled_idx, [pseudo[i] for i in unlabeled_idx]
                )
                loss = loss + args.unlabeled_distill_weight * loss_hard
                self._record("loss_distill_unlabeled", loss_hard)
            return loss

        if unlabeled_idx:
            # As in the paper, the teacher's detections are hard boxes for the box loss and the ignore mask; the
            # classification of unlabeled images is left to the soft targets.
            targets, sizes = [pseudo[i] for i in unlabeled_idx], outputs.image_sizes[unlabeled_idx]
            assignment = detector.assign_anchors(outputs.anchors, targets, sizes)
            assignment_labels[unlabeled_idx] = assignment.labels
            if args.pseudo_box_weight:
                loss_box = detector.box_loss(
                    outputs.box_regression[unlabeled_idx], outputs.anchors, targets, sizes, assignment
                )
                loss = loss + args.pseudo_box_weight * loss_box
                self._record("loss_box_pseudo", loss_box)
        keep = assignment_labels >= 0  # drop anchors in the ignore band of the real or pseudo boxes
        is_labeled = inputs["is_labeled"][:, None]
        for rows, mask, weight, name in (
            (labeled_idx, keep & is_labeled, args.labeled_distill_weight, "labeled"),
            (unlabeled_idx, keep & ~is_labeled, args.unlabeled_distill_weight, "unlabeled"),
        ):
            if not rows or weight == 0:
                continue
            normalizer = "adaptive"
            if args.distill_normalizer == "positives":
                normalizer = ((assignment_labels == 1) & mask).sum().clamp(min=1).float()
            term, stats = self._distill_term(outputs.logits, teacher_out.logits, mask, normalizer)
            loss = loss + weight * term
            self._record(f"loss_distill_{name}", term)
            self._record(f"distill_normalizer_{name}", stats["normalizer"])
            if "mean_weight" in stats:
                self._record(f"adl_mean_weight_{name}", stats["mean_weight"])
        return loss

    def _distill_term(self, student_logits, teacher_logits, mask, normalizer):
        args: SADTrainingArguments = self.args
        common = dict(
            temperature=args.distill_temperature,
            normalizer=normalizer,
            power=args.normalizer_power,
            mask=mask,
            return_stats=True,
        )
        if args.distill_loss == "adl":
            return adaptive_distillation_loss(
                student_logits, teacher_logits, beta=args.adl_beta, gamma=args.adl_gamma, variant=args.adl_variant,
                **common,
            )
        if args.distill_loss == "fdl":
            return focal_distillation_loss(student_logits, teacher_logits, gamma=args.adl_gamma, **common)
        return kl_distillation_loss(student_logits, teacher_logits, **common)

    def distillation_hyperparameters(self) -> dict[str, Any]:
        """The settings that define this run, as shown in the model card."""
        args: SADTrainingArguments = self.args
        settings = {
            "distill_loss": args.distill_loss,
            "steps": args.max_steps,
            "learning_rate": args.learning_rate,
            "batch_size": args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
            "image_size": dict(self.processing_class.size) if self.processing_class is not None else None,
            "hflip_prob": args.hflip_prob,
            "scale_jitter": list(args.scale_jitter),
        }
        if args.distill_loss in ("adl", "kl", "fdl"):
            settings.update(
                temperature=args.distill_temperature,
                normalizer=f"{args.distill_normalizer} (power {args.normalizer_power})"
                if args.distill_normalizer == "adaptive" else args.distill_normalizer,
                labeled_distill_weight=args.labeled_distill_weight,
                unlabeled_distill_weight=args.unlabeled_distill_weight,
                unlabeled_ratio=args.unlabeled_ratio,
            )
        if args.distill_loss == "adl":
            settings.update(adl_beta=args.adl_beta, adl_gamma=args.adl_gamma, adl_variant=args.adl_variant)
        if args.distill_loss == "hard":
            settings.update(pseudo_label_threshold=args.pseudo_label_threshold, unlabeled_ratio=args.unlabeled_ratio)
        elif args.distill_loss != "none":
            settings.update(
                pseudo_label_threshold=args.pseudo_label_threshold, pseudo_box_weight=args.pseudo_box_weight
            )
        return {k: v for k, v in settings.items() if v is not None}

    def _record(self, name: str, value: torch.Tensor | float) -> None:
        self._metrics[name].append(float(value.detach() if isinstance(value, torch.Tensor) else value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the distillation metrics recorded since the last log (from this process's batches)."""
        if self._metrics and "loss" in logs:
            logs = {**logs, **{k: round(sum(v) / len(v), 6) for k, v in self._metrics.items() if v}}
            self._metrics.clear()
        if "loss" in logs:  # cumulative robustness counters (all processes)
            logs = {**logs, **self.robustness_counts()}
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: `resume_from_checkpoint=True` (or the strings
        "true"/"last", as the CLI passes them) picks the last complete one; an incomplete path is an error naming what
        is missing and the checkpoint to use instead. The returned metrics include the robustness counters."""
        args, kwargs = self._resolve_resume(args, kwargs)
        result = super().train(*args, **kwargs)
        self._sync_buffers_from_main_process()
        result.metrics.update(self.robustness_counts())
        return result

    def _sync_buffers_from_main_process(self) -> None:
        """Give every process rank 0's buffers (BatchNorm running statistics) after DDP training.

        DDP copies rank 0's buffers to the other ranks only at the start of a training forward, so after the last step
        each rank holds the running statistics of its own last batch: a multi-process evaluation would then mix models
        that differ from each other and from the checkpoint (which rank 0 writes). Called by every rank.
        """
        if isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel):
            for buffer in self.accelerator.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buffer.data, src=0)

    # ------------------------------------------------------------------------------------------------------------------
    # Robustness: bad images, non-finite steps, complete checkpoints
    # ------------------------------------------------------------------------------------------------------------------

    def robustness_counts(self) -> dict[str, int]:
        """Cumulative counts (all processes): undecodable images skipped, boxes dropped, non-finite steps skipped."""
        return {k: v for k, v in self._counts.items() if k != "images_seen"}

    def _sum_across_processes(self, values: list[float]) -> list[int]:
        if self.args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
            torch.distributed.all_reduce(tensor)
            values = tensor.tolist()
        return [int(v) for v in values]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """`Trainer.training_step` (forward + backward), guarded against bad batches.

        - Counts the images the collator skipped and the boxes it dropped, and stops with an error naming examples
          when more than `max_skipped_image_fraction` of the images read were skipped (judged once
          `min_images_before_skip_check` images were read). Counts come from the batch, so they work with DataLoader
          workers, and are summed over processes, so every process takes the same decision.
        - A non-finite loss (on any process) marks the optimizer step being accumulated as bad: the step is then
          skipped (see `create_optimizer`). BatchNorm statistics changed by this batch (or by the placeholder of an
          all-skipped batch) are restored, so that nothing of a skipped batch reaches the weights.
        """
        args: SADTrainingArguments = self.args
        module = self.accelerator.unwrap_model(model)
        saved_buffers = [buffer.detach().clone() for buffer in module.buffers()]
        if self._step_health.get("step") != self.state.global_step:  # first micro-batch of an optimizer step
            self._step_health = {"step": self.state.global_step, "nonfinite": False, "rows": 0,
                                 "buffers": saved_buffers}
        empty = _is_empty_batch(inputs)
        rows = 0 if empty else len(inputs["is_labeled"])
        skipped, dropped = int(inputs.get("num_skipped", 0)), int(inputs.get("num_dropped_boxes", 0))
        examples = list(inputs.get("skipped_examples", []))

        loss = super().training_step(model, inputs, num_items_in_batch)

        local_nonfinite = not bool(torch.isfinite(loss).all())
        nonfinite, rows, skipped, dropped = self._sum_across_processes([local_nonfinite, rows, skipped, dropped])
        if nonfinite or empty:
            with torch.no_grad():
                for buffer, saved in zip(module.buffers(), saved_buffers):
                    buffer.copy_(saved)
        self._step_health["nonfinite"] |= bool(nonfinite)
        self._step_health["rows"] += rows
        self._counts["images_seen"] += rows + skipped
        self._counts["skipped_images"] += skipped
        self._counts["dropped_boxes"] += dropped
        self._skipped_examples += examples[: max(0, 10 - len(self._skipped_examples))]
        seen, total_skipped = self._counts["images_seen"], self._counts["skipped_images"]
        if (
            total_skipped
            and seen >= args.min_images_before_skip_check
            and total_skipped > args.max_skipped_image_fraction * seen
        ):
            raise RuntimeError(
                f"{total_skipped} of the {seen} training images read so far could not be decoded "
                f"({total_skipped / seen:.1%}, more than max_skipped_image_fraction={args.max_skipped_image_fraction})."
                f" Examples: {'; '.join(self._skipped_examples) or '(skipped on other processes)'}. Fix or remove "
                "these files, or raise max_skipped_image_fraction."
            )
        return loss

    def create_optimizer(self, model=None):
        """`Trainer.create_optimizer`, with its `step` guarded: a step whose accumulated batches had a non-finite loss,
        whose gradients are not finite, or whose batches held no decodable image is skipped. Skipping `step` itself
        (rather than zeroing gradients) leaves the weights AND the optimizer state (moments, weight decay) untouched;
        the learning-rate schedule and `global_step` still advance. Under fp16 the GradScaler's own skip comes first."""
        optimizer = super().create_optimizer(model)
        if not getattr(optimizer, "_sad_step_guard", False):
            step, trainer = optimizer.step, self

            def guarded_step(optimizer_self, *args, **kwargs):
                if trainer._skip_optimizer_step(optimizer_self):
                    return None
                return step(*args, **kwargs)

            optimizer.step = types.MethodType(guarded_step, optimizer)
            optimizer._sad_step_guard = True
        return optimizer

    def _skip_optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        args: SADTrainingArguments = self.args
        health = self._step_health if self._step_health.get("step") == self.state.global_step else {}
        self._step_health = {}
        step = self.state.global_step + 1
        if health and not health["nonfinite"] and not health["rows"]:
            logger.warning("Step %d skipped (no weight update): every image of its batches was undecodable.", step)
            return True
        cause = "the loss was NaN or infinite" if health.get("nonfinite") else None
        if cause is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            local = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if self._sum_across_processes([local])[0]:
                cause = "the gradients were NaN or infinite"
        if cause is None:
            self._consecutive_nonfinite = 0
            return False
        if health:  # BatchNorm statistics as they were before the step's first micro-batch
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), health["buffers"]):
                    buffer.copy_(saved)
        self._counts["nonfinite_steps"] += 1
        self._consecutive_nonfinite += 1
        logger.warning(
            "Step %d skipped (no weight update): %s (%d in a row, %d in total).",
            step, cause, self._consecutive_nonfinite, self._counts["nonfinite_steps"],
        )
        if self._consecutive_nonfinite >= args.max_consecutive_nonfinite_steps:
            recent = {k: round(sum(v) / len(v), 6) for k, v in self._metrics.items() if v}
            raise RuntimeError(
                f"Stopping: {cause} for {self._consecutive_nonfinite} consecutive optimizer steps (the last is step "
                f"{step}; max_consecutive_nonfinite_steps={args.max_consecutive_nonfinite_steps}). These steps were "
                f"skipped, so the weights are not poisoned. Recent loss terms: {recent or 'none recorded'}. Lower "
                "learning_rate, set max_grad_norm, check the data (NaN pixels, extreme boxes), train in fp32 rather "
                "than fp16, or raise max_consecutive_nonfinite_steps."
            )
        return True

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint` (which writes `checkpoint-N` in place, file by file), made safe to interrupt: a
        marker file `checkpoint-N.incomplete` exists beside the folder until every process has written its part, so
        that a run killed mid-save leaves a checkpoint that resumption (`train(resume_from_checkpoint=True)`,
        `get_last_complete_checkpoint`) recognises as incomplete and never picks up."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        marker = folder.with_name(folder.name + INCOMPLETE_SUFFIX)
        if self.args.should_save:
            folder.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its files (RNG states) into the folder
        if self.args.should_save:
            marker.unlink(missing_ok=True)

    def _resolve_resume(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """`train()`'s resume_from_checkpoint, checked: see `train`."""
        positional = bool(args)
        value = args[0] if positional else kwargs.get("resume_from_checkpoint")
        if isinstance(value, str) and value.lower() in ("true", "last") and not Path(value).exists():
            value = True
        if value is True:
            value = get_last_complete_checkpoint(self.args.output_dir)
            if value is None:
                raise ValueError(
                    f"resume_from_checkpoint: there is no complete checkpoint in {self.args.output_dir} to resume from."
                )
            logger.info("Resuming from %s, the last complete checkpoint.", value)
        elif isinstance(value, (str, Path)):
            problems = checkpoint_problems(value)
            if problems:
                last = get_last_complete_checkpoint(Path(value).parent)
                hint = f"resume from {last} instead" if last else "no complete checkpoint is left beside it"
                raise ValueError(
                    f"Cannot resume from {value}: {'; '.join(problems)}. It was probably interrupted while being "
                    f"written; {hint} (resume_from_checkpoint=True picks the last complete checkpoint)."
                )
        if positional:
            return (value, *args[1:]), kwargs
        if "resume_from_checkpoint" in kwargs:
            kwargs = {**kwargs, "resume_from_checkpoint": value}
        return args, kwargs

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------------

    def evaluation_loop(self, *args, **kwargs):
        self._sync_buffers_from_main_process()  # evaluation during or after DDP training: one model on all ranks
        return super().evaluation_loop(*args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation images reach the collator undecoded (a metadata-only cast), so that an undecodable one is an
        error naming it (or skipped with `skip_bad_labeled_images`) rather than an anonymous error inside datasets."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, datasets.Dataset):
            for name, feature in dataset.features.items():
                if isinstance(feature, datasets.Image) and feature.decode:
                    dataset = dataset.cast_column(name, datasets.Image(decode=False))
            eval_dataset = dataset
        return super().get_eval_dataloader(eval_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Supervised loss, and detections + ground truth packed as padded tensors for the COCO metric."""
        labels = inputs["labels"]
        with torch.no_grad():
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"), labels=labels)
        loss = outputs.loss.detach()
        if prediction_loss_only:
            return loss, None, None
        original_sizes = torch.stack([t["orig_size"] for t in labels])
        config = self.accelerator.unwrap_model(model).config
        detections = self.processing_class.post_process_object_detection(
            outputs, threshold=config.score_threshold, target_sizes=original_sizes
        )
        if _is_empty_batch(inputs):  # the placeholder of an all-undecodable batch: no image to score
            return loss, pack_detections(detections)[:0], pack_targets(labels)[:0]
        return loss, pack_detections(detections), pack_targets(labels)
