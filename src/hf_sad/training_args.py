"""Arguments of detection training and of SAD distillation, as TRL keeps its `*Config` beside each trainer.

- `DistillationArguments`: what the SAD loss needs (loss kind, ADL settings, weights, pseudo-boxes). A plain dataclass,
  so that `hf_sad.distillation.sad_loss` can be called without a Trainer.
- `DetectionTrainingArguments`: `transformers.TrainingArguments` with the augmentation and bad-data settings and the
  defaults detection needs (what `hf-sad train` parses).
- `SADTrainingArguments`: both (what `SADTrainer` and `hf-sad distill` take).

The settings of this package are mixin dataclasses placed after `TrainingArguments` among the bases: dataclass fields
are collected in reverse method resolution order, so they come first in `--help`, before the ~100 inherited flags.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.integrations.integration_utils import get_available_reporting_integrations

__all__ = ["DISTILL_LOSSES", "DetectionTrainingArguments", "DistillationArguments", "SADTrainingArguments"]

DISTILL_LOSSES = ("adl", "kl", "fdl", "hard", "none")
ADL_VARIANTS = ("paper", "released")
DISTILL_NORMALIZERS = ("adaptive", "positives")
NORMALIZER_ANCHORS = ("all", "distilled")
PSEUDO_BOX_LOSSES = ("full", "box")
DISTILL_ENTRIES = ("all", "background")
RECIPES = ("default", "paper")
TEACHER_AGGREGATIONS = ("mean", "era")
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fail(owner: object, name: str, expected: str) -> None:
    raise ValueError(f"{type(owner).__name__}.{name}={getattr(owner, name)!r} is invalid: expected {expected}.")


@dataclass
class DistillationArguments:
    r"""
    Settings of the SAD loss (`hf_sad.distillation.sad_loss`).

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
        distill_normalizer_anchors (`str`, *optional*, defaults to `"all"`):
            Which anchors the adaptive normaliser counts: `"all"` anchors of the images, the ignore band included (the
            authors' code), or only the `"distilled"` ones.
        distill_entries (`str`, *optional*, defaults to `"all"`):
            `"all"` anchors outside the ignore band are distilled, or only `"background"` ones (negatives of the real
            or pseudo boxes): a diagnostic of where the teacher's signal helps.
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
            Weight of the loss against the teacher's pseudo-boxes on unlabeled images (ADL, KL and focal
            distillation; without it the unlabeled images teach no localisation). 0 disables it.
        pseudo_box_loss (`str`, *optional*, defaults to `"full"`):
            The loss against the pseudo-boxes: RetinaNet's `"full"` focal + box loss, as the authors' code trains
            every unlabeled minibatch (so SAD = hard data distillation plus ADL), or the `"box"` loss only.
        drop_unlabeled_without_pseudo_boxes (`bool`, *optional*, defaults to `False`):
            Leave unlabeled images on which the teacher detects nothing out of the step (counted,
            `unlabeled_dropped`), as the authors' loader cannot load them. Off by default: with a weak or fresh
            teacher that would drop most unlabeled images.
        unlabeled_updates_batchnorm (`bool`, *optional*, defaults to `True`):
            Whether unlabeled images take part in the BatchNorm running statistics of the student (when its
            BatchNorm is not frozen); `False` updates them from the labeled images of each batch only.
        teacher_aggregation (`str`, *optional*, defaults to `"mean"`):
            With several teachers: per anchor and class, the mean of their sigmoid probabilities (`"mean"`), or the
            mean sharpened as sigmoid(logit(mean) / `era_temperature`) (`"era"`, entropy reduction averaging; see
            `hf_sad.teachers.aggregate_logits`). Box deltas are averaged.
        era_temperature (`float`, *optional*, defaults to 0.5):
            ERA's sharpening temperature: < 1 pushes each aggregated probability away from 0.5 on its own side.
        ema_teacher (`bool`, *optional*, defaults to `False`):
            No separate teacher: the teacher is an exponential moving average of the student (mean teacher), updated
            after every optimizer step and saved in each checkpoint (`ema_teacher.safetensors`), so resuming is exact.
            Kept in float32 whatever `teacher_dtype` says.
        ema_decay (`float`, *optional*, defaults to 0.999):
            The average's decay per optimizer step (an effective window of ~1 / (1 - decay) steps).
        ema_final_model (`bool`, *optional*, defaults to `False`):
            At the end of training, replace the student's weights by the average's, so that the saved, evaluated and
            pushed model is the mean teacher.
        teacher_confidence_mask (`float`, *optional*):
            Distil only anchors where the teacher is certain: every class's binary entropy H(q) (nats, at most
            ln 2 = 0.693) below this threshold (the uncertainty-aware mean teacher's mask, to compare with ADL's
            weighting). Unset: no mask.
        student_color_jitter (`float`, *optional*, defaults to 0.0):
            Strength s of a photometric augmentation seen by the student only: brightness, contrast and saturation
            each scaled by a factor drawn from [1 - s, 1 + s] per training image, after the flip and scale jitter that
            both networks share (so anchors still line up). The teacher sees the image without it. 0: off.
        teacher_label_map (`dict[str, str]` or `str`, *optional*):
            For a teacher that is a transformers detector of another kind: student class name -> the teacher's class
            name (or, for OWL-ViT / OWLv2, the text query), where they differ; a JSON object on the command line.
            Student classes map to the teacher's classes of the same name otherwise.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the teacher's weights: `"float32"`, `"bfloat16"`, `"float16"`, or `"auto"` (bfloat16 with
            `--bf16`, float16 with `--fp16`, else float32).
        resume_with_changed_settings (`bool`, *optional*, defaults to `False`):
            Resuming from a checkpoint written with other distillation settings (these fields, or another teacher)
            is refused, naming the differences; this allows it (with a warning).
    """

    distill_loss: str = field(
        default="adl", metadata={"help": "Distillation loss.", "choices": list(DISTILL_LOSSES)}
    )
    adl_beta: float = field(default=1.0, metadata={"help": "ADL weight of the teacher entropy (paper's beta)."})
    adl_gamma: float = field(default=2.0, metadata={"help": "ADL focusing exponent."})
    adl_variant: str = field(
        default="paper",
        metadata={"help": "'paper' (weight x KL) or 'released' (weight x soft CE).", "choices": list(ADL_VARIANTS)},
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})
    distill_normalizer: str = field(
        default="adaptive",
        metadata={"help": "Divisor of the distillation sum.", "choices": list(DISTILL_NORMALIZERS)},
    )
    normalizer_power: float = field(default=1.8, metadata={"help": "Exponent of the adaptive normaliser."})
    distill_normalizer_anchors: str = field(
        default="all",
        metadata={"help": "Anchors the adaptive normaliser counts.", "choices": list(NORMALIZER_ANCHORS)},
    )
    distill_entries: str = field(
        default="all", metadata={"help": "Anchors that are distilled.", "choices": list(DISTILL_ENTRIES)}
    )
    labeled_distill_weight: float = field(default=1.0, metadata={"help": "Weight of distillation on labeled images."})
    unlabeled_distill_weight: float = field(default=1.0, metadata={"help": "Weight of distillation on unlabeled data."})
    unlabeled_ratio: float = field(default=0.5, metadata={"help": "Share of unlabeled images in the stream."})
    pseudo_label_threshold: float = field(default=0.5, metadata={"help": "Teacher score threshold of pseudo-boxes."})
    pseudo_box_weight: float = field(
        default=1.0, metadata={"help": "Weight of the loss against teacher pseudo-boxes on unlabeled images."}
    )
    pseudo_box_loss: str = field(
        default="full",
        metadata={"help": "Loss against pseudo-boxes: focal + box ('full') or box only.",
                  "choices": list(PSEUDO_BOX_LOSSES)},
    )
    drop_unlabeled_without_pseudo_boxes: bool = field(
        default=False, metadata={"help": "Leave unlabeled images without a pseudo-box out of the step."}
    )
    unlabeled_updates_batchnorm: bool = field(
        default=True, metadata={"help": "Let unlabeled images update the student's BatchNorm statistics."}
    )
    teacher_aggregation: str = field(
        default="mean",
        metadata={"help": "How several teachers' probabilities combine.", "choices": list(TEACHER_AGGREGATIONS)},
    )
    era_temperature: float = field(default=0.5, metadata={"help": "ERA sharpening temperature (< 1 sharpens)."})
    ema_teacher: bool = field(
        default=False, metadata={"help": "The teacher is an exponential moving average of the student (no teacher)."}
    )
    ema_decay: float = field(default=0.999, metadata={"help": "Decay of the student average per optimizer step."})
    ema_final_model: bool = field(
        default=False, metadata={"help": "Save (and evaluate) the average's weights as the final model."}
    )
    teacher_confidence_mask: float | None = field(
        default=None, metadata={"help": "Distil only anchors whose teacher binary entropy (nats) is below this."}
    )
    student_color_jitter: float = field(
        default=0.0, metadata={"help": "Brightness/contrast/saturation jitter seen by the student only (0: off)."}
    )
    teacher_label_map: dict | str | None = field(
        default=None, metadata={"help": "JSON object: student class name -> teacher class name (or text query)."}
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the teacher's weights.", "choices": [*TEACHER_DTYPES, "auto"]},
    )
    resume_with_changed_settings: bool = field(
        default=False, metadata={"help": "Allow resuming a checkpoint written with other distillation settings."}
    )

    def __post_init__(self):
        self.validate_distillation()

    def validate_distillation(self) -> None:
        """Raise a ValueError naming the first distillation setting that is out of range."""
        choices = {
            "distill_loss": DISTILL_LOSSES,
            "adl_variant": ADL_VARIANTS,
            "distill_normalizer": DISTILL_NORMALIZERS,
            "distill_normalizer_anchors": NORMALIZER_ANCHORS,
            "distill_entries": DISTILL_ENTRIES,
            "pseudo_box_loss": PSEUDO_BOX_LOSSES,
            "teacher_dtype": (*TEACHER_DTYPES, "auto"),
            "teacher_aggregation": TEACHER_AGGREGATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                _fail(self, name, f"one of {allowed}")
        for name in ("adl_beta", "adl_gamma", "labeled_distill_weight", "unlabeled_distill_weight"):
            if getattr(self, name) < 0:
                _fail(self, name, "a non-negative number")
        for name in ("distill_temperature", "normalizer_power", "era_temperature"):
            if getattr(self, name) <= 0:
                _fail(self, name, "a positive number")
        if not 0 <= self.unlabeled_ratio < 1:
            _fail(self, "unlabeled_ratio", "a share in [0, 1)")
        if not 0 < self.pseudo_label_threshold < 1:
            _fail(self, "pseudo_label_threshold", "a score strictly between 0 and 1")
        if not (math.isfinite(self.pseudo_box_weight) and self.pseudo_box_weight >= 0):
            _fail(self, "pseudo_box_weight", "a finite weight >= 0")
        if not 0 <= self.ema_decay < 1:
            _fail(self, "ema_decay", "a decay in [0, 1)")
        if self.ema_final_model and not self.ema_teacher:
            _fail(self, "ema_final_model", "False unless ema_teacher=True (there is no average to save)")
        if self.teacher_confidence_mask is not None and not 0 < self.teacher_confidence_mask <= math.log(2):
            _fail(self, "teacher_confidence_mask", "an entropy in (0, ln 2 = 0.693] nats, or None")
        if not 0 <= self.student_color_jitter < 1:
            _fail(self, "student_color_jitter", "a strength in [0, 1)")
        try:
            label_map = self.resolved_teacher_label_map
        except json.JSONDecodeError:
            label_map = None
        if label_map is not None and not (isinstance(label_map, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in label_map.items())):
            _fail(self, "teacher_label_map", 'a mapping of class names to names, e.g. {"person": "pedestrian"}')

    @property
    def resolved_teacher_label_map(self) -> dict[str, str] | None:
        """`teacher_label_map`, a JSON string parsed."""
        value = self.teacher_label_map
        return json.loads(value) if isinstance(value, str) else value


@dataclass
class DetectionArguments:
    r"""
    Augmentation of training images and the handling of bad data.

    Parameters:
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
        recipe (`str`, *optional*, defaults to `"default"`):
            `"default"`: the optimizer and schedule of `TrainingArguments` as given (AdamW, ...). `"paper"`: the
            authors' released recipe: SGD with momentum 0.9 and weight decay 1e-4 (set here, overriding `optim` and
            `weight_decay`), a linear warm-up from lr/3 over `warmup_steps` (default: 1/90 of the steps, the paper's
            1k of 90k) and the learning rate x0.1 at 2/3 and 8/9 of the steps; a distilled student given no
            `max_steps` trains 3x the steps its teacher was trained (its `trainer_state.json`). `learning_rate`
            stays yours (the paper: 0.01 at batch 16).
    """

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
    recipe: str = field(
        default="default",
        metadata={"help": "'paper': SGD + momentum 0.9, weight decay 1e-4, warm-up from lr/3, x0.1 at 2/3 and 8/9 of "
                          "the steps (a student without max_steps trains 3x its teacher's steps).",
                  "choices": list(RECIPES)},
    )

    def validate_detection(self) -> None:
        """Raise a ValueError naming the first augmentation or bad-data setting that is out of range."""
        if not 0 <= self.hflip_prob <= 1:
            _fail(self, "hflip_prob", "a probability")
        if len(self.scale_jitter) != 2 or not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            _fail(self, "scale_jitter", "two factors 0 < low <= high")
        if not 0 <= self.max_skipped_image_fraction <= 1:
            _fail(self, "max_skipped_image_fraction", "a share in [0, 1]")
        if self.min_images_before_skip_check < 0:
            _fail(self, "min_images_before_skip_check", "a non-negative number of images")
        if self.max_consecutive_nonfinite_steps < 1:
            _fail(self, "max_consecutive_nonfinite_steps", "a number of steps >= 1")
        if self.recipe not in RECIPES:
            _fail(self, "recipe", f"one of {RECIPES}")


@dataclass
class DetectionTrainingArguments(TrainingArguments, DetectionArguments):
    r"""
    [`~transformers.TrainingArguments`] for detectors: everything it has, plus [`DetectionArguments`] (augmentation
    and bad data), with defaults changed to what detection needs: all columns kept for the collator, per-batch
    predictions for COCO mAP, the best checkpoint by mAP, every parameter used under DDP, and Hub pushes only at the
    end (`SADTrainer.push_to_hub` uploads the finished model once; checkpoints, pickles and event files never).
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
        self.validate_detection()
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
    data) plus [`DistillationArguments`] (the SAD loss). `distill_loss="none"` trains supervised only.
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
