"""SADTrainer: a transformers `Trainer` that distils a frozen teacher detector into a student.

One training step takes a mixed batch of labeled and unlabeled images, runs the student once and the teacher once
(no gradients) over the same augmented pixels, and adds the distillation terms of
`hf_sad.distillation.sad_loss.sad_loss` to the supervised loss. The trainer wires things up: the data, prepared before
it (`hf_sad.data.prepare_training_data`), the teacher (`hf_sad.teachers.load_teacher`), the loss, the safety against
bad data, bad steps and interrupted checkpoints (`hf_sad.training.callbacks`), COCO mAP (`hf_sad.evaluation`) and
the model card (`hf_sad.hub`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from functools import partial
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoImageProcessor, Trainer

from ..arguments import SADTrainingArguments
from ..data import SADDataCollator, TrainingData, check_labeled_dataset, prepare_training_data
from ..data.loading import category_mapping, with_model_categories
from ..distillation.sad_loss import sad_loss, zero_loss
from ..evaluation import DetectionMetrics, pack_detections, pack_targets
from ..model.builder import load_detector
from ..model.modeling_sad import SADForObjectDetection
from ..reporting import json_safe
from ..teachers import load_teacher
from .callbacks import (
    CompleteCheckpointCallback,
    RunSettingsCallback,
    SyncBuffersCallback,
    TrainingGuard,
    changed_run_settings,
    resolve_resume_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = ["SADTrainer", "paper_schedule"]


class SADTrainer(Trainer):
    """Distils `teacher_model` into `model` on `train_dataset` (labeled) and `unlabeled_dataset` (images only).

    Args:
        model: the student, a `SADForObjectDetection` or a path / Hub id.
        teacher_model: the frozen teacher, a `SADForObjectDetection` or a path / Hub id (loaded with
            `from_pretrained`), or any transformers object detector (DETR family, OWL-ViT / OWLv2: its boxes become
            soft targets on the student's anchors); or a list of hf-sad detectors, an ensemble whose probabilities
            are combined as `args.teacher_aggregation` says (`hf_sad.teachers.load_teacher`). Not needed with
            `distill_loss="none"`, and not given with `args.ema_teacher` (the teacher is then an average of the
            student).
        args: `SADTrainingArguments`; never changed by the trainer.
        train_dataset: the prepared training data (`hf_sad.data.prepare_training_data`), or labeled data in the
            transformers detection schema (`image`, `objects` with `bbox` in COCO xywh pixels and `category`), a
            `datasets.Dataset` or `IterableDataset`, which the trainer prepares itself with `unlabeled_dataset`.
        unlabeled_dataset: any `datasets.Dataset` / `IterableDataset` with an image column, streaming included.
        eval_dataset: labeled data in the same schema; evaluation reports COCO mAP.
        processing_class: the student's `SADImageProcessor` (default: loaded from the student's folder). Its
            post-processing settings are used for evaluation and for the teacher's pseudo-boxes.
        data_collator: how rows become batches (default: `SADDataCollator` with `args`' augmentation).
        teacher_processor: the teacher's processor, where it is not saved with the teacher: a transformers detector
            of another kind needs one (see `hf_sad.teachers.transformers_detector`); for an hf-sad teacher it says
            how the teacher normalises its inputs (the student's pixels are renormalised when that differs, e.g. a
            CLIP tower's mean and std; without a processor, the student's normalisation is assumed).
    """

    _tag_names = ["hf-sad", "object-detection", "knowledge-distillation"]
    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer scales it for accumulation

    def __init__(
        self,
        model: SADForObjectDetection | str,
        teacher_model=None,
        args: SADTrainingArguments | None = None,
        train_dataset: TrainingData | datasets.Dataset | datasets.IterableDataset | None = None,
        unlabeled_dataset: datasets.Dataset | datasets.IterableDataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class=None,
        data_collator=None,
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
        teacher = load_teacher(teacher_model, model, args, processing_class, teacher_processor)
        id2label = model.config.id2label
        if train_dataset is not None and not isinstance(train_dataset, TrainingData):
            train_dataset = prepare_training_data(train_dataset, unlabeled_dataset, args, id2label, teacher_model)
        if isinstance(train_dataset, TrainingData) and train_dataset.max_steps != args.max_steps:
            args = dataclasses.replace(args, max_steps=train_dataset.max_steps)  # a copy: the caller's stay as given
        if eval_dataset is not None:
            check_labeled_dataset(eval_dataset, "eval_dataset", category_mapping(eval_dataset, id2label,
                                  "eval_dataset"), id2label, skip_undecodable=args.skip_bad_labeled_images)
        # Categories become the model's ids where data enters: in the training stream, and for evaluation sets in
        # get_eval_dataloader (an evaluation set may order or subset its classes differently).
        data_collator = data_collator or SADDataCollator(
            processing_class, hflip_prob=args.hflip_prob, scale_range=tuple(args.scale_jitter), seed=args.seed,
            id2label=id2label, skip_bad_labeled_images=args.skip_bad_labeled_images,
            student_color_jitter=args.student_color_jitter,
        )
        self.guard = TrainingGuard(args, not args.unlabeled_updates_batchnorm, args.pseudo_label_threshold)
        self.teacher = teacher
        # The run settings and the mean teacher are written before a checkpoint is marked complete.
        own_callbacks = [self.guard, RunSettingsCallback(self.run_settings(args)), SyncBuffersCallback(),
                         *(teacher.callbacks(model) if teacher is not None else []), CompleteCheckpointCallback()]
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset.stream if isinstance(train_dataset, TrainingData) else train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or DetectionMetrics(id2label),
            callbacks=own_callbacks + list(callbacks or []),
            optimizers=optimizers,
            **kwargs,
        )
        # The teacher is a plain attribute, never a submodule: not trained, not saved, not wrapped by DDP.
        self._teacher_call = None
        if teacher is not None:
            teacher.prepare(self.accelerator.device, args.resolved_teacher_dtype)
            # With --torch_compile the Trainer compiles the student; the teacher's forward is compiled the same way.
            compile_teacher = args.torch_compile and teacher.compilable
            self._teacher_call = torch.compile(teacher, backend=args.torch_compile_backend,
                                               mode=args.torch_compile_mode) if compile_teacher else teacher
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._evaluating_teacher = False

    # ------------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------------

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None
    ):
        detector: SADForObjectDetection = self.accelerator.unwrap_model(model)
        with self.guard.batch(detector, inputs, self.state.global_step, self.accelerator.device) as batch:
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
            if inputs.get("empty_batch", False):  # every image undecodable: a placeholder (see the collator)
                batch.loss = zero_loss(outputs)
            else:
                teacher_outputs = self._teacher_forward(inputs, outputs) if self.teacher is not None else None
                result = sad_loss(detector.config, outputs, teacher_outputs, inputs["labels"], inputs["is_labeled"],
                                  self.args, self.processing_class)
                batch.loss = result.loss
                batch.terms = {**result.metrics, **(teacher_outputs.diagnostics() if teacher_outputs else {})}
                for name, value in batch.terms.items():
                    self._metrics[name].append(float(value))
        return (batch.loss, outputs) if return_outputs else batch.loss

    def _teacher_forward(self, inputs: dict[str, Any], student_outputs, labels=None):
        """The teacher's output on the batch (its pixels without the student's jitter), on the student's anchors."""
        with torch.no_grad(), self.accelerator.autocast():
            return self._teacher_call(
                pixel_values=inputs.get("teacher_pixel_values", inputs["pixel_values"]),
                pixel_mask=inputs.get("pixel_mask"),
                labels=labels,
                anchors=student_outputs.anchors if student_outputs is not None else None,
                image_sizes=student_outputs.image_sizes if student_outputs is not None else None,
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the means of the loss terms recorded since the last log (from this process's batches) and the
        cumulative bad-data counters; NaN metrics (a class absent from the evaluation set) are logged as None, so
        that `trainer_state.json` stays strict JSON."""
        if "loss" in logs:
            logs = {**logs, **{k: round(sum(v) / len(v), 6) for k, v in self._metrics.items() if v}}
            logs.update(self.guard.counts())
            self._metrics.clear()
        super().log(json_safe(logs), start_time)

    def run_settings(self, args: SADTrainingArguments | None = None) -> dict[str, Any]:
        """The settings that define what a run trains toward: the distillation settings and the teacher."""
        return {**(args or self.args).run_settings(), "teacher": self.teacher.source if self.teacher else None}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`, resuming only from complete checkpoints: `resume_from_checkpoint=True` (or the strings
        "true"/"last", as the CLI passes them) picks the last complete one; an incomplete path is an error naming what
        is missing and the checkpoint to use instead. The returned metrics include the bad-data counters."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if isinstance(checkpoint, str):
            if changes := changed_run_settings(checkpoint, self.run_settings()):
                message = f"{checkpoint} was written with other distillation settings: {'; '.join(changes)}."
                if not self.args.resume_with_changed_settings:
                    raise ValueError(f"{message} Resume with the settings it was trained with, or pass "
                                     "resume_with_changed_settings=True (--resume_with_changed_settings) to continue.")
                logger.warning("%s Continuing with the new settings (resume_with_changed_settings=True).", message)
            if self.teacher is not None:
                self.teacher.resume(checkpoint)
        result = super().train(checkpoint, *args, **kwargs)
        if self.args.ema_final_model:
            self.accelerator.unwrap_model(self.model).load_state_dict(self.teacher.state_dict())
        result.metrics.update(self.guard.counts())
        return result

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """With `recipe="paper"`, the authors' schedule (`paper_schedule`); otherwise `Trainer.create_scheduler`."""
        if self.args.recipe != "paper" or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.warmup_steps if self.args.warmup_steps else math.ceil(num_training_steps / 90)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer or self.optimizer, partial(paper_schedule, total=num_training_steps, warmup=warmup)
        )
        return self.lr_scheduler

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
        with the processor's post-processing settings). Evaluating the teacher, its output on the student's anchors
        takes the student's place."""
        labels = inputs["labels"]
        with torch.no_grad(), self.accelerator.autocast():
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"), labels=labels)
            if self._evaluating_teacher:
                outputs = self._teacher_forward(inputs, outputs, labels=labels)
        loss = outputs.loss.detach()
        if prediction_loss_only:
            return loss, None, None
        detections = self.processing_class.post_process_object_detection(
            outputs.detections(), threshold=None, target_sizes=torch.stack([t["orig_size"] for t in labels])
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

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Write the model card (`README.md`) into `args.output_dir`: a SAD card for a distilled student, a
        supervised one otherwise, with the last evaluation's metrics (and the teacher's, after `evaluate_teacher`).
        The options are `hf_sad.hub.write_run_card`'s."""
        from ..hub import write_run_card

        if self.is_world_process_zero():
            write_run_card(self, model_name=model_name, dataset_name=dataset_name, **kwargs)

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
        from ..hub import push_to_hub

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

    def distillation_hyperparameters(self) -> dict[str, Any]:
        """The settings that define this run, as shown in the model card (`hf_sad.hub.run_card_settings`)."""
        from ..hub import run_card_settings

        return run_card_settings(self.args, self.processing_class)


def paper_schedule(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate factor at `step` of the authors' recipe (Detectron's): a linear warm-up from 1/3 over `warmup`
    steps, then 1, x0.1 from 2/3 of `total` steps and x0.01 from 8/9."""
    if step < warmup:
        return 1 / 3 + (2 / 3) * step / warmup
    return 0.01 if step >= total * 8 / 9 else 0.1 if step >= total * 2 / 3 else 1.0
