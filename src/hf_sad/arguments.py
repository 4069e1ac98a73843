"""The settings of hf-sad runs, grouped by what they configure, as TRL keeps a `*Config` beside each trainer.

- `LossArguments`: the distillation mode and its loss (ADL settings, weights, pseudo-boxes), read by
  `hf_sad.distillation.sad_loss.sad_loss`.
- `TeacherArguments`: how the teacher is built (ensemble aggregation, the mean teacher, class names, dtype), read by
  `hf_sad.teachers.load_teacher`.
- `DataMixArguments`: how labeled and unlabeled images mix and what the student sees of them, read by the training
  stream, the collator and the trainer.
- `DistillationArguments`: those three, what `sad_loss` and `load_teacher` take without a Trainer; the cross-field
  rules of distillation (which mode needs a teacher or unlabeled data) are checked here, once, by asking the mode.
- `AugmentationArguments`, `RobustnessArguments`, `RecipeArguments`: augmentation, bad data and bad steps, the
  optimisation recipe.
- `DetectionTrainingArguments`: `transformers.TrainingArguments` with augmentation, robustness and recipe, and the
  defaults detection needs (what `hf-sad train` parses); `SADTrainingArguments`: that plus `DistillationArguments`
  (what `SADTrainer` and `hf-sad distill` take).

A field's help is its documentation: `--help` prints it, and each class's docstring lists its fields from it. The
settings of this package are mixin dataclasses placed after `TrainingArguments` among the bases: dataclass fields
are collected in reverse method resolution order, so they come first in `--help`, before the ~100 inherited flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import textwrap
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.integrations.integration_utils import get_available_reporting_integrations

from .distillation.losses import ADL_VARIANTS
from .distillation.modes import DISTILLATION_MODES, DistillationMode, distillation_mode
from .distillation.sad_loss import DISTILL_ENTRIES, DISTILL_NORMALIZERS, NORMALIZER_ANCHORS, PSEUDO_BOX_LOSSES

__all__ = [
    "AugmentationArguments",
    "DataMixArguments",
    "DetectionTrainingArguments",
    "DistillationArguments",
    "LossArguments",
    "RecipeArguments",
    "RobustnessArguments",
    "SADTrainingArguments",
    "TeacherArguments",
]

#: How an ensemble's probabilities combine (`--teacher_aggregation`; `hf_sad.teachers.ensemble.aggregate_logits`).
TEACHER_AGGREGATIONS = ("mean", "era")
#: The teacher's weight dtypes (`--teacher_dtype`; "auto" follows mixed precision).
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The optimisation recipes (`--recipe`).
RECIPES = ("default", "paper")


def documented(cls: type) -> type:
    """Append to a dataclass's docstring a `Parameters:` section written from the help of the fields it declares, so
    that each field has one text (its `--help`)."""
    own = cls.__dict__.get("__annotations__", {})
    entries = []
    for item in dataclasses.fields(cls):
        if item.name not in own or "help" not in item.metadata:
            continue
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        entries.append(f"        {item.name} (`{item.type}`, *optional*, defaults to `{default!r}`):\n"
                       + textwrap.fill(item.metadata["help"], 120, initial_indent=" " * 12, subsequent_indent=" " * 12))
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Parameters:\n" + "\n".join(entries) + "\n"
    return cls


def _fail(owner: object, name: str, expected: str) -> None:
    raise ValueError(f"{type(owner).__name__}.{name}={getattr(owner, name)!r} is invalid: expected {expected}.")


def _check_choices(owner: object, choices: dict[str, tuple]) -> None:
    for name, allowed in choices.items():
        if getattr(owner, name) not in allowed:
            _fail(owner, name, f"one of {allowed}")


# ----------------------------------------------------------------------------------------------------------------------
# Distillation: the loss, the teacher, the data mix
# ----------------------------------------------------------------------------------------------------------------------


@documented
@dataclass
class LossArguments:
    """The distillation mode and its loss (`hf_sad.distillation.sad_loss.sad_loss`)."""

    distill_loss: str = field(default="adl", metadata={
        "help": "The distillation mode: " + "; ".join(f"'{m.name}': {m.help}" for m in DISTILLATION_MODES.values())
        + ".", "choices": list(DISTILLATION_MODES)})
    adl_beta: float = field(default=1.0, metadata={
        "help": "ADL weight of the teacher's entropy (hard-to-learn samples), in the paper's sense."})
    adl_gamma: float = field(default=2.0, metadata={"help": "ADL focusing exponent (also focal distillation's)."})
    adl_variant: str = field(default="paper", metadata={
        "help": "'paper' (weight x KL) or 'released' (weight x alpha-balanced soft cross-entropy, as the authors' "
                "code).", "choices": list(ADL_VARIANTS)})
    distill_temperature: float = field(default=1.0, metadata={
        "help": "Temperature applied to both logits; the loss is multiplied by its square."})
    distill_normalizer: str = field(default="adaptive", metadata={
        "help": "What the distillation sum is divided by: 'adaptive': max(1, sum of q ** normalizer_power), a "
                "teacher-defined soft count of positives that also exists on unlabeled images; 'positives': the "
                "number of positive anchors (ground truth or pseudo-boxes), as RetinaNet normalises its focal loss.",
        "choices": list(DISTILL_NORMALIZERS)})
    normalizer_power: float = field(default=1.8, metadata={"help": "Exponent of the adaptive normaliser."})
    distill_normalizer_anchors: str = field(default="all", metadata={
        "help": "Which anchors the adaptive normaliser counts: 'all' anchors of the images, the ignore band included "
                "(the authors' code), or only the 'distilled' ones.", "choices": list(NORMALIZER_ANCHORS)})
    distill_entries: str = field(default="all", metadata={
        "help": "'all' anchors outside the ignore band are distilled, or only 'background' ones (negatives of the "
                "real or pseudo boxes): a diagnostic of where the teacher's signal helps.",
        "choices": list(DISTILL_ENTRIES)})
    labeled_distill_weight: float = field(default=1.0, metadata={
        "help": "Weight of the distillation term on labeled images."})
    unlabeled_distill_weight: float = field(default=1.0, metadata={
        "help": "Weight of the distillation term on unlabeled images (with 'hard': of the loss against the "
                "pseudo-boxes)."})
    pseudo_label_threshold: float = field(default=0.5, metadata={
        "help": "Teacher score above which a detection becomes a pseudo-box (for 'hard', and for the pseudo-box loss "
                "and the ignore mask on unlabeled images)."})
    pseudo_box_weight: float = field(default=1.0, metadata={
        "help": "Weight of the loss against the teacher's pseudo-boxes on unlabeled images (soft-target modes; "
                "without it unlabeled images teach no localisation). 0 disables it."})
    pseudo_box_loss: str = field(default="full", metadata={
        "help": "The loss against the pseudo-boxes: RetinaNet's 'full' focal + box loss, as the authors' code trains "
                "every unlabeled minibatch (so SAD = hard data distillation plus ADL), or the 'box' loss only.",
        "choices": list(PSEUDO_BOX_LOSSES)})
    drop_unlabeled_without_pseudo_boxes: bool = field(default=False, metadata={
        "help": "Leave unlabeled images on which the teacher detects nothing out of the step (counted, "
                "unlabeled_dropped), as the authors' loader cannot load them. Off by default: with a weak or fresh "
                "teacher that would drop most unlabeled images."})
    teacher_confidence_mask: float | None = field(default=None, metadata={
        "help": "Distil only anchors where the teacher is certain: every class's binary entropy H(q) (nats, at most "
                "ln 2 = 0.693) below this threshold (the uncertainty-aware mean teacher's mask, to compare with ADL's "
                "weighting). Unset: no mask."})

    def __post_init__(self):
        self.validate_loss()

    @property
    def mode(self) -> DistillationMode:
        """The distillation mode `distill_loss` names."""
        return distillation_mode(self.distill_loss)

    def validate_loss(self) -> None:
        """Raise a ValueError naming the first loss setting that is out of range."""
        _check_choices(self, {"distill_loss": tuple(DISTILLATION_MODES), "adl_variant": ADL_VARIANTS,
                              "distill_normalizer": DISTILL_NORMALIZERS,
                              "distill_normalizer_anchors": NORMALIZER_ANCHORS, "distill_entries": DISTILL_ENTRIES,
                              "pseudo_box_loss": PSEUDO_BOX_LOSSES})
        for name in ("adl_beta", "adl_gamma", "labeled_distill_weight", "unlabeled_distill_weight"):
            if getattr(self, name) < 0:
                _fail(self, name, "a non-negative number")
        for name in ("distill_temperature", "normalizer_power"):
            if getattr(self, name) <= 0:
                _fail(self, name, "a positive number")
        if not 0 < self.pseudo_label_threshold < 1:
            _fail(self, "pseudo_label_threshold", "a score strictly between 0 and 1")
        if not (math.isfinite(self.pseudo_box_weight) and self.pseudo_box_weight >= 0):
            _fail(self, "pseudo_box_weight", "a finite weight >= 0")
        if self.teacher_confidence_mask is not None and not 0 < self.teacher_confidence_mask <= math.log(2):
            _fail(self, "teacher_confidence_mask", "an entropy in (0, ln 2 = 0.693] nats, or None")


@documented
@dataclass
class TeacherArguments:
    """How the teacher is built (`hf_sad.teachers.load_teacher`)."""

    teacher_aggregation: str = field(default="mean", metadata={
        "help": "With several teachers: per anchor and class, the mean of their sigmoid probabilities ('mean'), or the "
                "mean sharpened as sigmoid(logit(mean) / era_temperature) ('era', entropy reduction averaging; see "
                "hf_sad.teachers.aggregate_logits). Box deltas are averaged.", "choices": list(TEACHER_AGGREGATIONS)})
    era_temperature: float = field(default=0.5, metadata={
        "help": "ERA's sharpening temperature: < 1 pushes each aggregated probability away from 0.5 on its own side."})
    ema_teacher: bool = field(default=False, metadata={
        "help": "No separate teacher: the teacher is an exponential moving average of the student (mean teacher), "
                "updated after every optimizer step and saved in each checkpoint (ema_teacher.safetensors), so "
                "resuming is exact. Kept in float32 whatever teacher_dtype says."})
    ema_decay: float = field(default=0.999, metadata={
        "help": "The average's decay per optimizer step (an effective window of ~1 / (1 - decay) steps)."})
    ema_final_model: bool = field(default=False, metadata={
        "help": "At the end of training, replace the student's weights by the average's, so that the saved, "
                "evaluated and pushed model is the mean teacher."})
    teacher_label_map: dict | str | None = field(default=None, metadata={
        "help": "For a teacher that is a transformers detector of another kind: student class name -> the teacher's "
                "class name (or, for OWL-ViT / OWLv2, the text query), where they differ; a JSON object on the "
                "command line. Student classes map to the teacher's classes of the same name otherwise."})
    teacher_dtype: str = field(default="auto", metadata={
        "help": "Dtype of the teacher's weights: 'float32', 'bfloat16', 'float16', or 'auto' (bfloat16 with --bf16, "
                "float16 with --fp16, else float32).", "choices": [*TEACHER_DTYPES, "auto"]})

    def __post_init__(self):
        self.validate_teacher()

    @property
    def resolved_teacher_label_map(self) -> dict[str, str] | None:
        """`teacher_label_map`, a JSON string parsed."""
        value = self.teacher_label_map
        return json.loads(value) if isinstance(value, str) else value

    def validate_teacher(self) -> None:
        """Raise a ValueError naming the first teacher setting that is out of range."""
        _check_choices(self, {"teacher_aggregation": TEACHER_AGGREGATIONS, "teacher_dtype": (*TEACHER_DTYPES, "auto")})
        if self.era_temperature <= 0:
            _fail(self, "era_temperature", "a positive number")
        if not 0 <= self.ema_decay < 1:
            _fail(self, "ema_decay", "a decay in [0, 1)")
        if self.ema_final_model and not self.ema_teacher:
            _fail(self, "ema_final_model", "False unless ema_teacher=True (there is no average to save)")
        try:
            label_map = self.resolved_teacher_label_map
        except json.JSONDecodeError:
            label_map = None
        if label_map is not None and not (isinstance(label_map, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in label_map.items())):
            _fail(self, "teacher_label_map", 'a mapping of class names to names, e.g. {"person": "pedestrian"}')


@documented
@dataclass
class DataMixArguments:
    """How labeled and unlabeled images mix in the training stream, and what the student sees of them."""

    unlabeled_ratio: float = field(default=0.5, metadata={
        "help": "Share of unlabeled images in the training stream (0.5 alternates labeled and unlabeled, as the "
                "paper). Ignored without unlabeled data."})
    unlabeled_updates_batchnorm: bool = field(default=True, metadata={
        "help": "Whether unlabeled images take part in the BatchNorm running statistics of the student (when its "
                "BatchNorm is not frozen); False updates them from the labeled images of each batch only."})
    student_color_jitter: float = field(default=0.0, metadata={
        "help": "Strength s of a photometric augmentation seen by the student only: brightness, contrast and "
                "saturation each scaled by a factor drawn from [1 - s, 1 + s] per training image, after the flip and "
                "scale jitter that both networks share (so anchors still line up). The teacher sees the image "
                "without it. 0: off."})

    def __post_init__(self):
        self.validate_data_mix()

    def validate_data_mix(self) -> None:
        """Raise a ValueError naming the first data-mix setting that is out of range."""
        if not 0 <= self.unlabeled_ratio < 1:
            _fail(self, "unlabeled_ratio", "a share in [0, 1)")
        if not 0 <= self.student_color_jitter < 1:
            _fail(self, "student_color_jitter", "a strength in [0, 1)")


@documented
@dataclass
class DistillationArguments(LossArguments, TeacherArguments, DataMixArguments):
    """Everything a distillation needs besides the optimisation: the loss (`LossArguments`), the teacher
    (`TeacherArguments`) and the data mix (`DataMixArguments`), with the rules that tie them to each other and to the
    teacher and data a run is given.
    """

    resume_with_changed_settings: bool = field(default=False, metadata={
        "help": "Resuming from a checkpoint written with other distillation settings (these fields, or another "
                "teacher) is refused, naming the differences; this allows it (with a warning)."})

    def __post_init__(self):
        self.validate_distillation()

    def validate_distillation(self) -> None:
        """Every distillation group's checks, and the mean teacher's need of a distillation mode."""
        self.validate_loss()
        self.validate_teacher()
        self.validate_data_mix()
        if self.ema_teacher and not self.mode.needs_teacher:
            raise ValueError(f"ema_teacher=True needs a distillation loss (distill_loss is {self.distill_loss!r}).")

    def run_settings(self) -> dict:
        """The settings that define what a run trains toward (every distillation setting but the resume policy),
        recorded in each checkpoint."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DistillationArguments)
                if f.name != "resume_with_changed_settings"}

    def check_teacher(self, given: bool, flag: str = "teacher_model") -> None:
        """A ValueError when the teacher given (or not) does not fit the settings; `flag` is how the caller names it
        (`--teacher` on the command line)."""
        if self.ema_teacher and given:
            raise ValueError(f"ema_teacher=True makes the teacher an average of the student: pass no {flag}.")
        if self.mode.needs_teacher and not given and not self.ema_teacher:
            raise ValueError(f"distill_loss={self.distill_loss!r} needs a {flag} (or ema_teacher=True, or "
                             "distill_loss='none').")

    def check_unlabeled(self, given: bool) -> None:
        """A ValueError when unlabeled data is given to a run that would never use it."""
        if given and not self.mode.uses_unlabeled_data:
            raise ValueError(
                f"An unlabeled_dataset was given but distill_loss={self.distill_loss!r} trains supervised only: its "
                "images would take half of every batch and teach nothing. Distil from a teacher, or train without it."
            )
        if given and self.unlabeled_ratio == 0:
            raise ValueError("An unlabeled_dataset was given but unlabeled_ratio=0 would never read it; set "
                             "unlabeled_ratio (0.5 alternates labeled and unlabeled images, as the paper).")


# ----------------------------------------------------------------------------------------------------------------------
# Training: augmentation, robustness, recipe
# ----------------------------------------------------------------------------------------------------------------------


@documented
@dataclass
class AugmentationArguments:
    """Augmentation of training images (`hf_sad.data.collator.SADDataCollator`)."""

    hflip_prob: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip of a training image."})
    scale_jitter: list[float] = field(default_factory=lambda: [0.8, 1.2], metadata={
        "help": "Range of the factor applied to the processor's target size for training images."})

    def validate_augmentation(self) -> None:
        if not 0 <= self.hflip_prob <= 1:
            _fail(self, "hflip_prob", "a probability")
        if len(self.scale_jitter) != 2 or not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            _fail(self, "scale_jitter", "two factors 0 < low <= high")


@documented
@dataclass
class RobustnessArguments:
    """Bad data and bad steps (`hf_sad.training.callbacks`)."""

    max_skipped_image_fraction: float = field(default=0.01, metadata={
        "help": "Undecodable training images are skipped (and counted: skipped_images in the logs and the results); "
                "the run stops with an error naming examples when more than this share of the images read was "
                "skipped."})
    min_images_before_skip_check: int = field(default=1000, metadata={
        "help": "max_skipped_image_fraction is only judged once this many training images were read (all processes "
                "together), so that one bad file early in a run does not stop it."})
    skip_bad_labeled_images: bool = field(default=False, metadata={
        "help": "Skip (and count) undecodable labeled images too; by default such an image is an error naming it."})
    max_consecutive_nonfinite_steps: int = field(default=10, metadata={
        "help": "A step whose loss or gradients are NaN/inf is skipped (no weight, optimizer-state or BatchNorm "
                "update) and counted (nonfinite_steps); this many such steps in a row stop the run with an error."})

    def validate_robustness(self) -> None:
        if not 0 <= self.max_skipped_image_fraction <= 1:
            _fail(self, "max_skipped_image_fraction", "a share in [0, 1]")
        if self.min_images_before_skip_check < 0:
            _fail(self, "min_images_before_skip_check", "a non-negative number of images")
        if self.max_consecutive_nonfinite_steps < 1:
            _fail(self, "max_consecutive_nonfinite_steps", "a number of steps >= 1")


@documented
@dataclass
class RecipeArguments:
    """The optimisation recipe (`SADTrainer.create_scheduler`, `hf_sad.data.prepare_training_data`)."""

    recipe: str = field(default="default", metadata={
        "help": "'default': the optimizer and schedule of TrainingArguments as given (AdamW, ...). 'paper': the "
                "authors' released recipe: SGD with momentum 0.9 and weight decay 1e-4 (set here, overriding optim "
                "and weight_decay), a linear warm-up from lr/3 over warmup_steps (default: 1/90 of the steps, the "
                "paper's 1k of 90k) and the learning rate x0.1 at 2/3 and 8/9 of the steps; a distilled student given "
                "no max_steps trains 3x the steps its teacher was trained (its trainer_state.json). learning_rate "
                "stays yours (the paper: 0.01 at batch 16).", "choices": list(RECIPES)})


# ----------------------------------------------------------------------------------------------------------------------
# TrainingArguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionTrainingArguments(TrainingArguments, AugmentationArguments, RobustnessArguments, RecipeArguments):
    r"""
    [`~transformers.TrainingArguments`] for detectors: everything it has, plus augmentation, robustness and the recipe
    (`AugmentationArguments`, `RobustnessArguments`, `RecipeArguments`), with defaults changed to what detection
    needs: all columns kept for the collator, per-batch predictions for COCO mAP, the best checkpoint by mAP, every
    parameter used under DDP, and Hub pushes only at the end (`SADTrainer.push_to_hub` uploads the finished model
    once; checkpoints, pickles and event files never).
    """

    # Its flags' group in `--help` (HfArgumentParser), listed after the command's data and model flags.
    _argument_group_name = "training: augmentation and bad data, then transformers.TrainingArguments"

    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns: the collator needs them."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Per-batch predictions for COCO mAP."})
    ddp_find_unused_parameters: bool = field(default=False, metadata={"help": "Every student parameter is used."})
    label_names: list[str] = field(default_factory=lambda: ["labels"], metadata={"help": "Inputs holding labels."})
    metric_for_best_model: str = field(default="map", metadata={"help": "Best checkpoint by COCO mAP."})
    hub_strategy: str = field(
        default="end", metadata={"help": "Only 'end': the finished model is pushed once, at the end of training."}
    )

    def __post_init__(self):
        # Batches hold lists of per-image dicts: let every process read its own data instead of concatenating on
        # rank 0 (which fails on such batches); accelerate then shards the stream by rank.
        if self.accelerator_config is None:
            self.accelerator_config = {"dispatch_batches": False}
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on every loader otherwise
        if self.recipe == "paper":
            self.optim, self.optim_args, self.weight_decay = "sgd", "momentum=0.9", 1e-4
        super().__post_init__()
        self.validate_augmentation()
        self.validate_robustness()
        _check_choices(self, {"recipe": RECIPES})
        missing = [name for name in self.report_to if name not in get_available_reporting_integrations()]
        if missing:
            install = {"tensorboard": "pip install 'hf-sad[tensorboard]'"}.get(missing[0], f"pip install {missing[0]}")
            raise ValueError(
                f"report_to includes {missing}, but the package is not installed here: {install}, or choose another "
                "--report_to (none, or one that is installed)."
            )
        if self.hub_strategy != "end":
            raise ValueError(
                f"hub_strategy={self.hub_strategy!r} is not supported: hf-sad pushes the finished model once, at the "
                "end (hub_strategy='end'), so that checkpoints, pickles and event files never reach the Hub."
            )
        self._check_launch()

    def _check_launch(self) -> None:
        """A launcher that started several processes which do not form one distributed run would train independent
        copies into the same output folder; on a CPU that is what `torchrun`/`accelerate launch` do without
        `use_cpu`."""
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.world_size != launched:
            hint = " Pass --use_cpu (use_cpu=True) to train on the CPU with several processes." if (
                not torch.cuda.is_available() and not self.use_cpu) else ""
            raise ValueError(
                f"This process was launched as one of {launched} (WORLD_SIZE={launched}) but the run would have "
                f"world size {self.world_size}: each process would train on its own into {self.output_dir}.{hint}"
            )

    def __getstate__(self) -> dict:
        """Pickled arguments (`training_args.bin`, which Trainer writes next to the model and into every checkpoint)
        never carry the Hub token; `to_dict`/`to_json_string` already redact it."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


@dataclass
class SADTrainingArguments(DetectionTrainingArguments, DistillationArguments):
    r"""
    Arguments of [`SADTrainer`]: [`DetectionTrainingArguments`] (all of `TrainingArguments`, augmentation, bad
    data, recipe) plus [`DistillationArguments`] (loss, teacher, data mix). `distill_loss="none"` trains supervised
    only.
    """

    _argument_group_name = "training: distillation, augmentation and bad data, then transformers.TrainingArguments"

    def __post_init__(self):
        super().__post_init__()
        self.validate_distillation()

    @property
    def resolved_teacher_dtype(self) -> torch.dtype:
        """The teacher's weight dtype: `teacher_dtype`, or with "auto" the dtype of mixed precision (else fp32)."""
        if self.teacher_dtype != "auto":
            return TEACHER_DTYPES[self.teacher_dtype]
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32
