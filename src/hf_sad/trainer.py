"""SADTrainer: a transformers `Trainer` that distils a frozen teacher detector into a student.

One training step takes a mixed batch of labeled and unlabeled images, runs the student once and the teacher once
(no gradients) over the same augmented pixels, and adds the distillation terms of `hf_sad.distillation.sad_loss` to
the supervised loss. The trainer itself only wires things up: data (`hf_sad.data`, `hf_sad.collator`), the loss
(`hf_sad.distillation`), safety against bad data, bad steps and interrupted checkpoints (`hf_sad.callbacks`), COCO
mAP (`hf_sad.evaluation`) and the model card (`hf_sad.hub`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoImageProcessor, Trainer

from .callbacks import (
    INCOMPLETE_SUFFIX,
    CompleteCheckpointCallback,
    LabeledBatchNormCallback,
    RunSettingsCallback,
    SkipBadStepsCallback,
    SkippedImagesCallback,
    SyncBuffersCallback,
    changed_run_settings,
    checkpoint_problems,
    get_last_complete_checkpoint,
    resolve_resume_checkpoint,
)
from .collator import SADDataCollator
from .data import (
    build_training_stream,
    category_mapping,
    check_labeled_dataset,
    check_unlabeled_dataset,
    with_model_categories,
)
from .distillation import (
    check_teacher_compatible,
    load_detector,
    renormalize,
    sad_loss,
    saved_image_processor,
    teacher_input_transform,
    zero_loss,
)
from .evaluation import DetectionMetrics, pack_detections, pack_targets
from .modeling_sad import SADForObjectDetection
from .reporting import json_safe
from .teachers import EMATeacher, EMATeacherCallback, SADTeacherEnsemble
from .training_args import DistillationArguments, SADTrainingArguments
from .transformers_teacher import TransformersDetectorTeacher, is_sad_source, load_transformers_teacher

logger = logging.getLogger(__name__)

#: Training batches in a row without a single pseudo-box on their unlabeled images before a warning.
PSEUDO_BOX_DROUGHT = 50

# Besides SADTrainer, the names that lived here before the trainer was split into modules stay importable from here.
__all__ = [
    "INCOMPLETE_SUFFIX",
    "SADTrainer",
    "SADTrainingArguments",
    "check_teacher_compatible",
    "checkpoint_problems",
    "get_last_complete_checkpoint",
    "steps_for_epochs",
]


class SADTrainer(Trainer):
    """Distils `teacher_model` into `model` on `train_dataset` (labeled) and `unlabeled_dataset` (images only).

    Args:
        model: the student, a `SADForObjectDetection` or a path / Hub id.
        teacher_model: the frozen teacher, a `SADForObjectDetection` or a path / Hub id (loaded with
            `from_pretrained`), or any transformers object detector (DETR family, OWL-ViT / OWLv2: its boxes become
            soft targets on the student's anchors, `TransformersDetectorTeacher`); or a list of hf-sad detectors,
            an ensemble whose probabilities are combined as `args.teacher_aggregation` says. Not needed with
            `distill_loss="none"`, and not given with `args.ema_teacher` (the teacher is then an average of the
            student, `trainer.ema`).
        args: `SADTrainingArguments`.
        train_dataset: labeled data in the transformers detection schema (`image`, `objects` with `bbox` in COCO
            xywh pixels and `category`), a `datasets.Dataset` or `IterableDataset`.
        unlabeled_dataset: any `datasets.Dataset` / `IterableDataset` with an image column, streaming included.
        eval_dataset: labeled data in the same schema; evaluation reports COCO mAP.
        processing_class: the student's `SADImageProcessor` (default: loaded from the student's folder). Its
            post-processing settings are used for evaluation and for the teacher's pseudo-boxes.
        teacher_processor: the teacher's processor, where it is not saved with the teacher: a transformers detector
            of another kind needs one (see `hf_sad.transformers_teacher`); for an hf-sad teacher it says how the
            teacher normalises its inputs (the student's pixels are renormalised when that differs, e.g. a CLIP
            tower's mean and std; without a processor, the student's normalisation is assumed).
    """

    _tag_names = ["hf-sad", "object-detection", "knowledge-distillation"]
    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer scales it for accumulation

    def __init__(
        self,
        model: SADForObjectDetection | str,
        teacher_model: SADForObjectDetection | str | list[SADForObjectDetection | str] | None = None,
        args: SADTrainingArguments | None = None,
        train_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        unlabeled_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        teacher_processor=None,
        **kwargs,
    ):
        args = args or SADTrainingArguments(output_dir="sad-student")
        if not isinstance(args, SADTrainingArguments):
            raise TypeError(f"args must be SADTrainingArguments, got {type(args).__name__}.")
        model = load_detector(model, "student")
        if processing_class is None:
            processing_class = AutoImageProcessor.from_pretrained(model.name_or_path)
        teacher = self._build_teacher(teacher_model, model, args, processing_class, teacher_processor)
        # A teacher normalising its inputs otherwise (e.g. a CLIP tower's mean and std) gets the student's pixels
        # renormalised in `_teacher_forward` (an ensemble does this per member).
        teacher_input = None
        if isinstance(teacher, SADForObjectDetection):
            teacher_input = teacher_input_transform(
                processing_class, teacher_processor or saved_image_processor(teacher_model))

        if train_dataset is not None:
            category_map = category_mapping(train_dataset, model.config.id2label, "train_dataset")
            check_labeled_dataset(train_dataset, "train_dataset", category_map, model.config.id2label,
                                  skip_undecodable=args.skip_bad_labeled_images)
            if unlabeled_dataset is not None:
                check_unlabeled_dataset(unlabeled_dataset, args)
            if args.max_steps <= 0 and args.recipe == "paper" and teacher_model is not None:
                args.max_steps = 3 * teacher_steps(teacher_model)
            if args.max_steps <= 0:
                args.max_steps = steps_for_epochs(args, train_dataset, unlabeled_dataset)
            train_dataset = build_training_stream(
                train_dataset,
                unlabeled_dataset,
                unlabeled_ratio=args.unlabeled_ratio,
                category_map=category_map,
                seed=args.data_seed if args.data_seed is not None else args.seed,
                num_shards=max(8, args.world_size * max(1, args.dataloader_num_workers)),
                id2label=model.config.id2label,
            )
        if eval_dataset is not None:
            eval_map = category_mapping(eval_dataset, model.config.id2label, "eval_dataset")
            check_labeled_dataset(eval_dataset, "eval_dataset", eval_map, model.config.id2label,
                                  skip_undecodable=args.skip_bad_labeled_images)
        # Categories become the model's ids where data enters: in the training stream, and for evaluation sets in
        # get_eval_dataloader (an evaluation set may order or subset its classes differently).
        collator = SADDataCollator(
            processing_class,
            hflip_prob=args.hflip_prob,
            scale_range=tuple(args.scale_jitter),
            seed=args.seed,
            id2label=model.config.id2label,
            skip_bad_labeled_images=args.skip_bad_labeled_images,
            student_color_jitter=args.student_color_jitter,
        )
        self.step_guard = SkipBadStepsCallback(args.max_consecutive_nonfinite_steps)
        self.image_counter = SkippedImagesCallback(args.max_skipped_image_fraction, args.min_images_before_skip_check)
        self.teacher_source = teacher_sources(teacher_model, teacher, args)
        # The mean teacher: a frozen average of the student, never a submodule of it (not in the optimizer).
        self.ema = EMATeacher(model, args.ema_decay) if args.ema_teacher else None
        self.labeled_batchnorm = LabeledBatchNormCallback()
        # Order matters where two callbacks touch the same step: the labeled-only BatchNorm update comes before a
        # skipped step restores the statistics, and the run settings and the mean teacher are written before a
        # checkpoint is complete.
        own_callbacks = [self.labeled_batchnorm, self.step_guard, self.image_counter,
                         RunSettingsCallback(self.run_settings(args)), SyncBuffersCallback()]
        if self.ema is not None:
            own_callbacks.append(EMATeacherCallback(self.ema, model))
        own_callbacks.append(CompleteCheckpointCallback())
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or DetectionMetrics(model.config.id2label),
            callbacks=own_callbacks + list(callbacks or []),
            optimizers=optimizers,
            **kwargs,
        )
        # The teacher is a plain attribute, never a submodule: not trained, not saved, not wrapped by DDP.
        self.teacher = None
        if teacher is not None:
            dtype = args.resolved_teacher_dtype
            self.teacher = teacher.requires_grad_(False).eval().to(device=self.accelerator.device, dtype=dtype)
        elif self.ema is not None:  # kept in float32: an average of small updates needs the precision
            self.teacher = self.ema.to(self.accelerator.device).teacher
        self._teacher_input = teacher_input
        # With --torch_compile the Trainer compiles the student; the teacher's forward is compiled the same way (a
        # transformers teacher's forward runs its image processor in Python: left eager).
        self._teacher_call = self.teacher
        if self.teacher is not None and args.torch_compile and not isinstance(self.teacher,
                                                                              TransformersDetectorTeacher):
            self._teacher_call = torch.compile(self.teacher, backend=args.torch_compile_backend,
                                               mode=args.torch_compile_mode)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._evaluating_teacher = False
        self._pseudo_box_drought = [0, 0]  # training batches in a row without a pseudo-box, their unlabeled images

    # ------------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        detector: SADForObjectDetection = self.accelerator.unwrap_model(model)
        empty = bool(inputs.get("empty_batch", False))  # every image undecodable: a placeholder (see the collator)
        rows = 0 if empty else len(inputs["is_labeled"])
        labeled_batchnorm = model.training and not self.args.unlabeled_updates_batchnorm and not empty
        if model.training:
            self.image_counter.record_batch(inputs, rows, self.accelerator.device)
            self.step_guard.start_batch(detector, self.state.global_step)
        if labeled_batchnorm:
            self.labeled_batchnorm.start_batch(detector, inputs["is_labeled"])
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
        if labeled_batchnorm:
            self.labeled_batchnorm.end_batch()
        if empty:
            loss, terms = zero_loss(outputs), {}
        else:
            teacher_outputs = None
            if self.teacher is not None and model.training:
                teacher_outputs = self._teacher_forward(inputs, outputs)
            result = sad_loss(detector.config, outputs, teacher_outputs, inputs["labels"], inputs["is_labeled"],
                              self.args, self.processing_class)
            loss, terms = result.loss, result.metrics
            for name, value in terms.items():
                self._metrics[name].append(float(value))
            if model.training and "pseudo_boxes_per_image" in terms:
                self._watch_pseudo_boxes(float(terms["pseudo_boxes_per_image"]), int((~inputs["is_labeled"]).sum()))
        if model.training:
            self.step_guard.end_batch(detector, loss, rows, terms)
        return (loss, outputs) if return_outputs else loss

    def _watch_pseudo_boxes(self, per_image: float, unlabeled: int) -> None:
        """Warn once the teacher has found no pseudo-box on `PSEUDO_BOX_DROUGHT` training batches in a row: their
        unlabeled images then teach no localisation and have no ignore band."""
        if per_image > 0:
            self._pseudo_box_drought = [0, 0]
            return
        self._pseudo_box_drought[0] += 1
        self._pseudo_box_drought[1] += unlabeled
        if self._pseudo_box_drought[0] == PSEUDO_BOX_DROUGHT:
            logger.warning(
                "The teacher found no object above pseudo_label_threshold=%s on the last %d unlabeled images (%d "
                "batches in a row): they give no box targets. Lower --pseudo_label_threshold, or check that the "
                "teacher suits these images (pseudo_boxes_per_image in the logs).",
                self.args.pseudo_label_threshold, self._pseudo_box_drought[1], self._pseudo_box_drought[0],
            )

    def _teacher_forward(self, inputs: dict[str, Any], student_outputs, labels=None):
        """The teacher's output on the batch (its pixels without the student's jitter); a transformers teacher gets
        the student's anchors and valid image sizes to put its boxes on."""
        pixel_values = renormalize(inputs.get("teacher_pixel_values", inputs["pixel_values"]), self._teacher_input)
        extra = {}
        if isinstance(self.teacher, TransformersDetectorTeacher):
            extra = {"anchors": student_outputs.anchors, "image_sizes": student_outputs.image_sizes}
        if labels is not None:
            extra["labels"] = labels
        with torch.no_grad(), self.accelerator.autocast():
            return self._teacher_call(
                pixel_values=pixel_values.to(next(self.teacher.parameters()).dtype),
                pixel_mask=inputs.get("pixel_mask"),
                **extra,
            )

    @staticmethod
    def _build_teacher(teacher_model, student: SADForObjectDetection, args: SADTrainingArguments,
                       student_processor, teacher_processor=None):
        """The frozen teacher of `teacher_model` (one detector, an ensemble of a list of them, or a transformers
        detector of another kind behind `TransformersDetectorTeacher`), checked against the student; None for
        supervised training and for the mean teacher (built from the student later)."""
        if args.ema_teacher:
            if teacher_model is not None:
                raise ValueError("ema_teacher=True makes the teacher an average of the student: pass no teacher_model.")
            if args.distill_loss == "none":
                raise ValueError("ema_teacher=True needs a distillation loss (distill_loss is 'none').")
            return None
        if args.distill_loss == "none":
            return None
        if teacher_model is None:
            raise ValueError(
                f"distill_loss={args.distill_loss!r} needs a teacher_model (or ema_teacher=True, or distill_loss="
                "'none')."
            )
        if isinstance(teacher_model, (list, tuple)):
            members = [load_detector(t, f"teacher {i}") for i, t in enumerate(teacher_model)]
            for i, member in enumerate(members):
                try:
                    check_teacher_compatible(member, student)
                except ValueError as error:
                    name = teacher_model[i] if isinstance(teacher_model[i], str) else member.name_or_path
                    raise ValueError(f"Teacher {i} ({name or 'a model object'}): {error}") from error
            transforms = [teacher_input_transform(student_processor, saved_image_processor(t)) for t in teacher_model]
            return SADTeacherEnsemble(members, args.teacher_aggregation, args.era_temperature, transforms)
        if not is_sad_source(teacher_model):
            model = load_transformers_teacher(teacher_model) if isinstance(teacher_model, str) else teacher_model
            return TransformersDetectorTeacher(model, teacher_processor, student.config, student_processor,
                                               label_map=args.resolved_teacher_label_map)
        teacher = load_detector(teacher_model, "teacher")
        check_teacher_compatible(teacher, student)
        return teacher

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the loss terms recorded since the last log (from this process's batches) and the
        cumulative bad-data counters; NaN metrics (a class absent from the evaluation set) are logged as None, so
        that `trainer_state.json` stays strict JSON."""
        if "loss" in logs:
            logs = {**logs, **{k: round(sum(v) / len(v), 6) for k, v in self._metrics.items() if v}}
            logs.update(self.robustness_counts())
            self._metrics.clear()
        super().log(json_safe(logs), start_time)

    def run_settings(self, args: SADTrainingArguments | None = None) -> dict[str, Any]:
        """The settings that define what a run trains toward: the distillation settings and the teacher."""
        args = args or self.args
        settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillationArguments)
                    if f.name != "resume_with_changed_settings"}
        return {**settings, "teacher": self.teacher_source}

    def robustness_counts(self) -> dict[str, int]:
        """Cumulative counts (all processes): undecodable images skipped, boxes dropped, non-finite steps skipped."""
        return {
            "skipped_images": self.image_counter.skipped_images,
            "dropped_boxes": self.image_counter.dropped_boxes,
            "nonfinite_steps": self.step_guard.nonfinite_steps,
        }

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: `resume_from_checkpoint=True` (or the strings
        "true"/"last", as the CLI passes them) picks the last complete one; an incomplete path is an error naming what
        is missing and the checkpoint to use instead. The returned metrics include the bad-data counters."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if isinstance(checkpoint, str) and (changes := changed_run_settings(checkpoint, self.run_settings())):
            message = f"{checkpoint} was written with other distillation settings: {'; '.join(changes)}."
            if not self.args.resume_with_changed_settings:
                raise ValueError(f"{message} Resume with the settings it was trained with, or pass "
                                 "resume_with_changed_settings=True (--resume_with_changed_settings) to continue.")
            logger.warning("%s Continuing with the new settings (resume_with_changed_settings=True).", message)
        if isinstance(checkpoint, str) and self.ema is not None:
            self.ema.load(checkpoint)
        result = super().train(checkpoint, *args, **kwargs)
        if self.args.ema_final_model:
            self.accelerator.unwrap_model(self.model).load_state_dict(self.ema.teacher.state_dict())
        result.metrics.update(self.robustness_counts())
        return result

    # ------------------------------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------------------------------

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation images reach the collator undecoded (a metadata-only cast), so that an undecodable one is an
        error naming it (or skipped with `skip_bad_labeled_images`) rather than an anonymous error inside datasets;
        their categories become the model's label ids by class name."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)) and dataset.features:
            for name, feature in dataset.features.items():
                if isinstance(feature, datasets.Image) and feature.decode:
                    dataset = dataset.cast_column(name, datasets.Image(decode=False))
            eval_dataset = with_model_categories(dataset, self.model.config.id2label)
        return super().get_eval_dataloader(eval_dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Supervised loss, and detections + ground truth packed as padded tensors for the COCO metric (detections
        with the processor's post-processing settings)."""
        labels = inputs["labels"]
        pixel_values, pixel_mask = inputs["pixel_values"], inputs.get("pixel_mask")
        with torch.no_grad(), self.accelerator.autocast():
            if self._evaluating_teacher:
                # A transformers teacher puts its boxes on the student's anchors: the student's output gives them.
                student_outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask) if isinstance(
                    self.teacher, TransformersDetectorTeacher) else None
                outputs = self._teacher_forward(inputs, student_outputs, labels=labels)
            else:
                outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        loss = outputs.loss.detach()
        if prediction_loss_only:
            return loss, None, None
        original_sizes = torch.stack([t["orig_size"] for t in labels])
        if hasattr(outputs, "detections"):  # a transformers teacher: its own set of boxes
            outputs = outputs.detections()
        detections = self.processing_class.post_process_object_detection(
            outputs, threshold=None, target_sizes=original_sizes
        )
        if inputs.get("empty_batch", False):  # the placeholder of an all-undecodable batch: no image to score
            return loss, pack_detections(detections)[:0], pack_targets(labels)[:0]
        return loss, pack_detections(detections), pack_targets(labels)

    def evaluate_teacher(self, eval_dataset=None) -> dict[str, float]:
        """COCO metrics of the teacher on the evaluation data, through the student's processor (the pixels the
        teacher saw in training), logged and returned with the prefix `teacher_`; the model card shows them beside
        the student's."""
        if self.teacher is None:
            raise ValueError("This trainer has no teacher (distill_loss='none').")
        self._evaluating_teacher = True
        try:
            return self.evaluate(eval_dataset, metric_key_prefix="teacher")
        finally:
            self._evaluating_teacher = False

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """With `recipe="paper"`, the authors' schedule (`paper_schedule`); otherwise `Trainer.create_scheduler`."""
        if self.args.recipe != "paper" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.warmup_steps if self.args.warmup_steps else math.ceil(num_training_steps / 90)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, partial(paper_schedule, total=num_training_steps, warmup=warmup)
        )
        return self.lr_scheduler

    def save_metrics(self, split: str, metrics: dict[str, float], combined: bool = True) -> None:
        """`Trainer.save_metrics` (`{split}_results.json`, `all_results.json`) as strict JSON: NaN becomes null."""
        super().save_metrics(split, json_safe(metrics), combined)

    # ------------------------------------------------------------------------------------------------------------------
    # Saving, model card, Hub
    # ------------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (weights as safetensors, image processor, remote code) without the Hub push that
        transformers makes there under `push_to_hub=True`: SADTrainer pushes once, with `push_to_hub()`."""
        super().save_model(output_dir, _internal_call=True)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        datasets: list[str] | None = None,
        baseline_metrics: dict[str, float] | None = None,
        teacher_metrics: dict[str, float] | None = None,
        detections_image: str | None = None,
        **kwargs,
    ) -> None:
        """Write the model card (`README.md`) into `args.output_dir`: a SAD card for a distilled student, a
        supervised one otherwise, with the last evaluation's metrics (and the teacher's, after `evaluate_teacher`).

        Args:
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
        from .hub import create_model_card, framework_versions

        unknown = set(kwargs) - {"finetuned_from", "dataset", "language", "tasks", "dataset_tags", "dataset_args"}
        if unknown:
            raise TypeError(f"create_model_card() got unexpected arguments {sorted(unknown)}.")
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        repo_id = self.hub_model_id if getattr(self, "hub_model_id", None) else self.args.hub_model_id
        model_name = model_name or (repo_id.split("/")[-1] if repo_id else output_dir.name)
        dataset_name = dataset_name or kwargs.get("dataset")
        distilled = self.args.distill_loss != "none"
        if detections_image is None and (output_dir / "detections.png").is_file():
            detections_image = "detections.png"
        card = create_model_card(
            model_name=model_name,
            id2label=self.model.config.id2label,
            backbone=self.model.config.backbone,
            teacher=self.teacher_source if distilled else None,
            teacher_backbone=teacher_backbones(self.teacher),
            datasets=datasets,
            metrics=self._last_metrics("eval_"),
            teacher_metrics=teacher_metrics if teacher_metrics is not None else self._last_metrics("teacher_"),
            baseline_metrics=baseline_metrics,
            hyperparameters=self.distillation_hyperparameters(),
            dataset_name=dataset_name or "custom",
            detections_image=detections_image,
            repo_id=repo_id,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            base_model=kwargs.get("finetuned_from"),
            method="sad" if distilled else "supervised",
            versions=framework_versions(),
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        card.save(str(output_dir / "README.md"))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> str | None:
        """Upload the finished model to `args.hub_model_id`, in one commit: weights (safetensors), image processor,
        remote code, results and the model card (`create_model_card(**kwargs)`). Checkpoints, pickles
        (`training_args.bin`) and TensorBoard event files are never uploaded. Always blocking. Returns the commit URL
        (None on processes other than the main one)."""
        from .hub import push_to_hub

        token = token if token is not None else self.args.hub_token
        if getattr(self, "hub_model_id", None) is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model()
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        return push_to_hub(
            self.args.output_dir,
            self.hub_model_id,
            private=bool(self.args.hub_private_repo if private is None else private),
            token=token,
            commit_message=commit_message or "Upload SAD detector with hf-sad",
            revision=revision if revision is not None else self.args.hub_revision,
        )

    def _last_metrics(self, prefix: str) -> dict[str, float]:
        """The metrics of the last log entry holding `{prefix}map`, prefix stripped (empty when there is none)."""
        for entry in reversed(self.state.log_history):
            if f"{prefix}map" in entry:
                return {k.removeprefix(prefix): v for k, v in entry.items() if k.startswith(prefix)}
        return {}

    def distillation_hyperparameters(self) -> dict[str, Any]:
        """The settings that define this run, as shown in the model card."""
        args: SADTrainingArguments = self.args
        settings = {
            "distill_loss": args.distill_loss if args.distill_loss != "none" else None,
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


def teacher_sources(teacher_model, teacher, args: SADTrainingArguments) -> str | list[str] | None:
    """What the teacher is, for the model card and the resume check: a path / Hub id (absolute for a local folder),
    a list of them for an ensemble, a description of the mean teacher, or None."""
    if args.ema_teacher:
        return f"exponential moving average of the student (decay {args.ema_decay})"
    if teacher is None:
        return None
    if isinstance(teacher, SADTeacherEnsemble):
        return [_source(given, member) for given, member in zip(teacher_model, teacher.members)]
    return _source(teacher_model, teacher)


def _source(given, teacher: SADForObjectDetection) -> str:
    source = given if isinstance(given, str) else teacher.name_or_path
    if source and Path(source).exists():  # one spelling of a local folder
        source = str(Path(source).resolve())
    return source


def teacher_backbones(teacher) -> str | None:
    """The teacher's backbone name(s), comma-separated for an ensemble."""
    if teacher is None:
        return None
    if isinstance(teacher, SADTeacherEnsemble):
        return ", ".join(member.config.backbone for member in teacher.members)
    if isinstance(teacher, TransformersDetectorTeacher):  # e.g. DETR's "resnet50"; OWL-ViT has no separate one
        return getattr(teacher.config, "backbone", None) or teacher.model_type
    return teacher.config.backbone


def paper_schedule(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate factor at `step` of the authors' recipe (Detectron's): a linear warm-up from 1/3 over `warmup`
    steps, then 1, x0.1 from 2/3 of `total` steps and x0.01 from 8/9."""
    if step < warmup:
        return 1 / 3 + (2 / 3) * step / warmup
    return 0.01 if step >= total * 8 / 9 else 0.1 if step >= total * 2 / 3 else 1.0


def teacher_steps(teacher: str | SADForObjectDetection) -> int:
    """How many steps the saved `teacher` was trained (its folder's `trainer_state.json`), for a 3x student schedule."""
    state = Path(teacher) / "trainer_state.json" if isinstance(teacher, str) else None
    if state is None or not state.is_file():
        raise ValueError(
            "recipe='paper' without max_steps trains the student 3x its teacher's steps, but the teacher's "
            f"trainer_state.json ({state or 'a teacher given as a model object'}) is not there: set max_steps."
        )
    return int(json.loads(state.read_text())["global_step"])


def steps_for_epochs(args: SADTrainingArguments, labeled, unlabeled) -> int:
    """`max_steps` that shows every labeled image `num_train_epochs` times (the training stream itself never ends)."""
    if not hasattr(labeled, "__len__"):
        raise ValueError("A streaming train_dataset has no length: set max_steps.")
    labeled_share = 1 - args.unlabeled_ratio if unlabeled is not None else 1.0
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return max(1, math.ceil(args.num_train_epochs * len(labeled) / (per_step * labeled_share)))

