"""`TrainerCallback`s that keep a detection run safe from bad data, bad steps and interrupted checkpoints.

- `TrainingGuard`: the one per-batch guard `SADTrainer.compute_loss` wraps each training batch in; it drives the
  three below, in their order, and warns when the teacher's pseudo-boxes dry up.
- `SkipBadStepsCallback`: an optimizer step whose batches had a non-finite loss, whose gradients are not finite, or
  whose batches held no decodable image changes nothing (weights, optimizer state, BatchNorm statistics), through
  `on_pre_optimizer_step`, the hook transformers runs right before `optimizer.step()`.
- `SkippedImagesCallback`: counts undecodable images and dropped boxes from the batches, and stops the run when too
  many images were bad.
- `LabeledBatchNormCallback`: optionally, only the labeled images of a batch move the BatchNorm statistics.
- `CompleteCheckpointCallback`: a `checkpoint-N.incomplete` marker beside a checkpoint folder while it is written, so
  that resumption never picks up a checkpoint whose writing was interrupted.
- `SyncBuffersCallback`: after DDP training, every process gets rank 0's BatchNorm statistics before evaluation.
- `RunSettingsCallback`: each checkpoint records the distillation settings it was trained with, so that resuming
  with other settings is noticed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..arguments import RobustnessArguments

logger = logging.getLogger(__name__)

__all__ = [
    "INCOMPLETE_SUFFIX",
    "CompleteCheckpointCallback",
    "LabeledBatchNormCallback",
    "RunSettingsCallback",
    "SkipBadStepsCallback",
    "SkippedImagesCallback",
    "SyncBuffersCallback",
    "TrainingGuard",
    "TrainingStopped",
    "broadcast_buffers",
    "changed_run_settings",
    "checkpoint_folder",
    "checkpoint_problems",
    "get_last_complete_checkpoint",
    "resolve_resume_checkpoint",
]

#: The file in each checkpoint that records the settings of its run (`RunSettingsCallback`).
RUN_SETTINGS = "run_settings.json"
#: Suffix of the marker file `checkpoint-N.incomplete` that exists beside a checkpoint folder while it is written.
INCOMPLETE_SUFFIX = ".incomplete"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors")


def checkpoint_folder(args, state) -> Path:
    """The folder transformers writes the checkpoint of `state.global_step` into (`output_dir/checkpoint-N`)."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


class TrainingStopped(RuntimeError):
    """A run stopped on purpose because of what it met (too many undecodable images, too many non-finite steps); its
    message says why and what to change."""


def sum_across_processes(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """`values` summed over all processes of an initialised `torch.distributed` group (unchanged otherwise), so that
    every process takes the same decision from them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    ):
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        values = tensor.tolist()
    return values


def _buffers(module: nn.Module) -> list[torch.Tensor]:
    return [buffer.detach().clone() for buffer in module.buffers()]


def _restore_buffers(module: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)


# ----------------------------------------------------------------------------------------------------------------------
# Bad optimizer steps
# ----------------------------------------------------------------------------------------------------------------------


class SkipBadStepsCallback(TrainerCallback):
    """Skips the optimizer steps that would poison the model, and stops a run that keeps producing them.

    A step is skipped when any of its (accumulated) batches had a NaN/inf loss on any process, when its gradients are
    not finite, or when every image of its batches was undecodable. Skipping sets every gradient to `None` right
    before `optimizer.step()`: torch optimizers then leave those parameters and their state (moments, weight decay,
    step counts) untouched, while the learning-rate schedule and `global_step` advance. BatchNorm statistics are
    restored to what they were before the step's first batch. Under fp16 the GradScaler's own overflow skip still
    comes first.

    `TrainingGuard` calls `start_batch` before each training forward and `end_batch` after its loss; the statistics
    of a bad batch are restored after its backward (`on_substep_end` / `on_pre_optimizer_step`).

    Args:
        max_consecutive_nonfinite_steps: this many non-finite steps in a row raise a RuntimeError naming the cause.
    """

    def __init__(self, max_consecutive_nonfinite_steps: int = RobustnessArguments.max_consecutive_nonfinite_steps):
        self.max_consecutive_nonfinite_steps = max_consecutive_nonfinite_steps
        self.nonfinite_steps = 0
        self._consecutive = 0
        self._step: int | None = None  # the global step whose batches are being accumulated
        self._step_buffers: list[torch.Tensor] = []  # BatchNorm statistics before that step's first batch
        self._batch_buffers: list[torch.Tensor] = []
        self._batch_bad = False  # the last batch had a non-finite loss or no image
        self._nonfinite = False
        self._rows = 0
        self._bad_terms: dict[str, float] = {}

    def start_batch(self, module: nn.Module, global_step: int) -> None:
        """Before a training forward of step `global_step + 1`: remember the BatchNorm statistics."""
        self._batch_buffers = _buffers(module)
        self._batch_bad = False
        if self._step != global_step:  # the first batch of a new optimizer step
            self._step, self._step_buffers = global_step, self._batch_buffers
            self._nonfinite, self._rows = False, 0

    def end_batch(self, module: nn.Module, loss: torch.Tensor, rows: int, terms: Mapping[str, Any]) -> None:
        """After a training batch's loss (`rows` decodable images; `terms`: its loss terms, for the error message).

        A batch with a non-finite loss (on any process) or without images will leave no trace in the BatchNorm
        statistics (restored once its backward has run: autograd still needs them), and a non-finite one makes its
        optimizer step skipped (see `on_pre_optimizer_step`)."""
        local_nonfinite = not bool(torch.isfinite(loss.detach()).all())
        nonfinite, rows = sum_across_processes([float(local_nonfinite), float(rows)], loss.device)
        self._batch_bad = bool(nonfinite) or not rows
        if local_nonfinite:
            self._bad_terms = {k: round(float(v), 6) for k, v in terms.items()}
        self._nonfinite |= bool(nonfinite)
        self._rows += int(rows)

    def _forget_bad_batch(self, model: nn.Module) -> None:
        if self._batch_bad:
            _restore_buffers(model, self._batch_buffers)
            self._batch_bad = False

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._forget_bad_batch(model)  # a micro-batch of gradient accumulation, after its backward

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._forget_bad_batch(model)
        cause = self._cause(optimizer, state.global_step)
        self._step = None
        if cause is None:
            self._consecutive = 0
            return
        step = state.global_step + 1
        _restore_buffers(model, self._step_buffers)
        _drop_gradients(optimizer)
        if cause == "empty":
            logger.warning("Step %d skipped (no weight update): every image of its batches was undecodable.", step)
            return
        self.nonfinite_steps += 1
        self._consecutive += 1
        logger.warning(
            "Step %d skipped (no weight update): %s (%d in a row, %d in total).",
            step, cause, self._consecutive, self.nonfinite_steps,
        )
        if self._consecutive >= self.max_consecutive_nonfinite_steps:
            raise TrainingStopped(
                f"Stopping: {cause} for {self._consecutive} consecutive optimizer steps (the last is step {step}; "
                f"max_consecutive_nonfinite_steps={self.max_consecutive_nonfinite_steps}). These steps were skipped, "
                f"so the weights are not poisoned. Loss terms of the last bad batch: {self._bad_terms or 'finite'}. "
                "Lower learning_rate, set max_grad_norm, check the data (NaN pixels, extreme boxes), train in fp32 "
                "rather than fp16, or raise max_consecutive_nonfinite_steps."
            )

    def _cause(self, optimizer, global_step: int) -> str | None:
        """Why the step about to be taken must be skipped: a message, "empty", or None (take it)."""
        if self._step == global_step:
            if self._nonfinite:
                return "the loss was NaN or infinite"
            if not self._rows:
                return "empty"
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        device = grads[0].device if grads else "cpu"
        if sum_across_processes([float(local)], device)[0]:
            return "the gradients were NaN or infinite"
        return None


def _drop_gradients(optimizer) -> None:
    """Make the coming `optimizer.step()` a no-op for every parameter: torch optimizers skip parameters whose `.grad`
    is None. `optimizer` may be accelerate's wrapper, whose GradScaler (fp16) needs its inf checks recorded while
    gradients still exist."""
    inner = getattr(optimizer, "optimizer", optimizer)
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        with contextlib.suppress(RuntimeError):  # raised when gradient clipping already unscaled them
            scaler.unscale_(inner)
    for group in inner.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


# ----------------------------------------------------------------------------------------------------------------------
# BatchNorm statistics from the labeled images only
# ----------------------------------------------------------------------------------------------------------------------


class LabeledBatchNormCallback(TrainerCallback):
    """Lets only the labeled images of a mixed batch move the student's BatchNorm running statistics
    (`unlabeled_updates_batchnorm=False`); the batch is still normalised with its own statistics, as usual.

    `TrainingGuard` calls `start_batch` before the student's forward (forward pre-hooks record the mean and
    unbiased variance of the labeled rows at every BatchNorm layer in training mode) and `end_batch` after it. Once
    the batch's backward has run (autograd still needs the buffers the forward used), `on_substep_end` /
    `on_pre_optimizer_step` put the statistics back as they were before the batch and apply the labeled rows'
    update instead, with each layer's momentum. A batch without labeled images leaves them unchanged.
    """

    def __init__(self):
        self._saved: dict[nn.Module, tuple[torch.Tensor, ...]] = {}
        self._stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._hooks: list = []

    def start_batch(self, model: nn.Module, is_labeled: torch.Tensor) -> None:
        layers = [m for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        self._saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                       for m in layers}
        self._stats = {}

        def record(module, inputs):
            x = inputs[0].detach()
            rows = x[is_labeled.to(x.device)].float()
            dims = [0, *range(2, x.dim())]
            self._stats[module] = (rows.mean(dims), rows.var(dims)) if rows.numel() > rows.shape[1] else None

        self._hooks = [m.register_forward_pre_hook(record) for m in layers]

    def end_batch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _apply(self) -> None:
        with torch.no_grad():
            for layer, (mean, var, count) in self._saved.items():
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
                layer.num_batches_tracked.copy_(count)
                stats = self._stats.get(layer)
                if stats is None:
                    continue
                layer.num_batches_tracked.add_(1)
                momentum = layer.momentum if layer.momentum is not None else 1.0 / float(layer.num_batches_tracked)
                layer.running_mean.lerp_(stats[0].to(layer.running_mean.dtype), momentum)
                layer.running_var.lerp_(stats[1].to(layer.running_var.dtype), momentum)
        self._saved, self._stats = {}, {}

    def on_substep_end(self, args, state, control, **kwargs):
        self._apply()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._apply()


# ----------------------------------------------------------------------------------------------------------------------
# Undecodable images and dropped boxes
# ----------------------------------------------------------------------------------------------------------------------


class SkippedImagesCallback(TrainerCallback):
    """Counts, over all processes, the training images the collator could not decode and the boxes it dropped, and
    stops the run when more than `max_fraction` of the images read were undecodable (judged once `min_images` were
    read). Counts come from each batch (`num_skipped`, `skipped_examples`, `num_dropped_boxes`, see
    `hf_sad.data.collator.SADDataCollator`), so they also work with DataLoader workers.

    `TrainingGuard` calls `record_batch` for each training batch.
    """

    def __init__(self, max_fraction: float = RobustnessArguments.max_skipped_image_fraction,
                 min_images: int = RobustnessArguments.min_images_before_skip_check):
        self.max_fraction = max_fraction
        self.min_images = min_images
        self.images_seen = 0
        self.skipped_images = 0
        self.dropped_boxes = 0
        self.examples: list[str] = []

    def record_batch(self, inputs: Mapping[str, Any], rows: int, device: torch.device | str = "cpu") -> None:
        skipped, dropped = int(inputs.get("num_skipped", 0)), int(inputs.get("num_dropped_boxes", 0))
        rows, skipped, dropped = (int(v) for v in sum_across_processes([rows, skipped, dropped], device))
        self.images_seen += rows + skipped
        self.skipped_images += skipped
        self.dropped_boxes += dropped
        self.examples += list(inputs.get("skipped_examples", []))[: max(0, 10 - len(self.examples))]
        if (
            self.skipped_images
            and self.images_seen >= self.min_images
            and self.skipped_images > self.max_fraction * self.images_seen
        ):
            raise TrainingStopped(
                f"{self.skipped_images} of the {self.images_seen} training images read so far could not be decoded "
                f"({self.skipped_images / self.images_seen:.1%}, more than max_skipped_image_fraction="
                f"{self.max_fraction}). Examples: {'; '.join(self.examples) or '(skipped on other processes)'}. Fix "
                "or remove these files, or raise max_skipped_image_fraction."
            )


# ----------------------------------------------------------------------------------------------------------------------
# The per-batch guard
# ----------------------------------------------------------------------------------------------------------------------

#: Training batches in a row without a single pseudo-box on their unlabeled images before a warning.
PSEUDO_BOX_DROUGHT = 50


@dataclass
class BatchRecord:
    """What a guarded training batch gave: its loss (a scalar tensor) and its loss terms by name."""

    loss: torch.Tensor | None = None
    terms: dict[str, Any] = field(default_factory=dict)


class TrainingGuard(TrainerCallback):
    """Everything that watches a training batch, in one place and one order: its undecodable images are counted
    (`SkippedImagesCallback`), the BatchNorm statistics before it are kept (`SkipBadStepsCallback`), unlabeled images
    are kept out of them when asked (`LabeledBatchNormCallback`), and once its loss is known a non-finite batch is
    marked and a teacher that stopped finding objects is warned about. Its hooks then, once the batch's backward has
    run, first apply the labeled-only statistics and then restore the statistics of a bad batch and skip a bad step.

    Args:
        robustness: the bad-data and bad-step settings.
        labeled_batchnorm_only: only labeled images move the student's BatchNorm statistics
            (`unlabeled_updates_batchnorm=False`).
        pseudo_label_threshold: the threshold named in the warning about pseudo-boxes.
    """

    def __init__(self, robustness: RobustnessArguments, labeled_batchnorm_only: bool = False,
                 pseudo_label_threshold: float | None = None):
        self.images = SkippedImagesCallback(robustness.max_skipped_image_fraction,
                                            robustness.min_images_before_skip_check)
        self.steps = SkipBadStepsCallback(robustness.max_consecutive_nonfinite_steps)
        self.labeled_batchnorm = LabeledBatchNormCallback() if labeled_batchnorm_only else None
        self.pseudo_label_threshold = pseudo_label_threshold
        self._drought = [0, 0]  # training batches in a row without a pseudo-box, their unlabeled images

    @contextlib.contextmanager
    def batch(self, model: nn.Module, inputs: Mapping[str, Any], global_step: int,
              device: torch.device | str = "cpu") -> Iterator[BatchRecord]:
        """Guard the training batch `inputs` of step `global_step + 1`: the caller runs the student's forward and the
        loss inside and sets the yielded record's `loss` and `terms`."""
        empty = bool(inputs.get("empty_batch", False))  # every image undecodable: a placeholder (see the collator)
        rows = 0 if empty else len(inputs["is_labeled"])
        self.images.record_batch(inputs, rows, device)
        self.steps.start_batch(model, global_step)
        if self.labeled_batchnorm is not None and rows:
            self.labeled_batchnorm.start_batch(model, inputs["is_labeled"])
        record = BatchRecord()
        try:
            yield record
        finally:
            if self.labeled_batchnorm is not None:
                self.labeled_batchnorm.end_batch()
        self.steps.end_batch(model, record.loss, rows, record.terms)
        if "pseudo_boxes_per_image" in record.terms:
            self._watch_pseudo_boxes(float(record.terms["pseudo_boxes_per_image"]), int((~inputs["is_labeled"]).sum()))

    def _watch_pseudo_boxes(self, per_image: float, unlabeled: int) -> None:
        """Warn once the teacher has found no pseudo-box on `PSEUDO_BOX_DROUGHT` training batches in a row: their
        unlabeled images then teach no localisation and have no ignore band."""
        if per_image > 0:
            self._drought = [0, 0]
            return
        self._drought[0] += 1
        self._drought[1] += unlabeled
        if self._drought[0] == PSEUDO_BOX_DROUGHT:
            logger.warning(
                "The teacher found no object above pseudo_label_threshold=%s on the last %d unlabeled images (%d "
                "batches in a row): they give no box targets. Lower --pseudo_label_threshold, or check that the "
                "teacher suits these images (pseudo_boxes_per_image in the logs).",
                self.pseudo_label_threshold, self._drought[1], self._drought[0],
            )

    def counts(self) -> dict[str, int]:
        """Cumulative counts (all processes): undecodable images skipped, boxes dropped, non-finite steps skipped."""
        return {
            "skipped_images": self.images.skipped_images,
            "dropped_boxes": self.images.dropped_boxes,
            "nonfinite_steps": self.steps.nonfinite_steps,
        }

    def on_substep_end(self, args, state, control, **kwargs):
        self._after_backward("on_substep_end", args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._after_backward("on_pre_optimizer_step", args, state, control, **kwargs)

    def _after_backward(self, hook: str, *args, **kwargs) -> None:
        # The labeled-only statistics first: a skipped step then restores the statistics from before the batch.
        for part in (self.labeled_batchnorm, self.steps):
            if part is not None:
                getattr(part, hook)(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Complete checkpoints
# ----------------------------------------------------------------------------------------------------------------------


class CompleteCheckpointCallback(TrainerCallback):
    """Marks each checkpoint folder as incomplete (`checkpoint-N.incomplete` beside it) until every process has
    written its part.

    transformers writes `checkpoint-N` in place, file by file; a run killed while saving would leave a folder that
    `get_last_checkpoint` happily resumes from. The marker is created when the step's save is decided
    (`on_step_end` / `on_epoch_end`, or at evaluation for `save_strategy="best"`) and removed in `on_save`, which
    runs once the checkpoint is written; `get_last_complete_checkpoint` and `checkpoint_problems` honour it.
    """

    def __init__(self):
        self._pending: Path | None = None

    def _marker(self, args, state) -> Path:
        folder = checkpoint_folder(args, state)
        return folder.with_name(folder.name + INCOMPLETE_SUFFIX)

    def _begin(self, args, state) -> None:
        if args.should_save:
            marker = self._marker(args, state)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            self._pending = marker

    def _drop_unused_marker(self) -> None:
        """A save decided but not made (`save_strategy="best"` without a new best) leaves no folder: no marker."""
        if self._pending is not None and not self._pending.with_suffix("").is_dir():
            self._pending.unlink(missing_ok=True)
        self._pending = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._drop_unused_marker()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._begin(args, state)

    on_epoch_end = on_step_end

    def on_evaluate(self, args, state, control, **kwargs):
        if args.save_strategy == "best" and state.global_step > 0:
            self._begin(args, state)

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()  # every process has written its files (RNG states) into the folder
        if args.should_save:
            self._marker(args, state).unlink(missing_ok=True)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        self._drop_unused_marker()


class RunSettingsCallback(TrainerCallback):
    """Writes the settings that define a distillation run (`settings`: name -> JSON value, e.g. the loss and its
    weights, the teacher) into every checkpoint as `run_settings.json`, so that a resumed run can be checked against
    them (`changed_run_settings`)."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            settings = json.dumps(self.settings, indent=2, sort_keys=True)
            (checkpoint_folder(args, state) / RUN_SETTINGS).write_text(settings)


def changed_run_settings(checkpoint: str | Path, settings: dict[str, Any]) -> list[str]:
    """`name: checkpoint value -> new value` for every setting that differs from those a checkpoint was written
    with (nothing for a checkpoint without `run_settings.json`, e.g. one written by plain transformers)."""
    path = Path(checkpoint) / RUN_SETTINGS
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(settings))  # the same JSON round trip as the saved values
    return [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


def checkpoint_problems(checkpoint: str | Path) -> list[str]:
    """Why `checkpoint` is not a complete Trainer checkpoint (an empty list when it is).

    A checkpoint is complete when its writing finished (no `checkpoint-N.incomplete` marker beside it, see
    `CompleteCheckpointCallback`), its `trainer_state.json` parses and it holds model weights.
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


def resolve_resume_checkpoint(value: str | bool | Path | None, output_dir: str | Path) -> str | bool | None:
    """`Trainer.train`'s `resume_from_checkpoint`, checked: True (or the strings "true"/"last", as a command line
    passes them) becomes the last complete checkpoint in `output_dir`; a path to an incomplete checkpoint is a
    ValueError naming what is missing and the checkpoint to use instead. Other values pass through."""
    if isinstance(value, str) and value.lower() in ("true", "last") and not Path(value).exists():
        value = True
    if value is True:
        last = get_last_complete_checkpoint(output_dir)
        if last is None:
            raise ValueError(f"resume_from_checkpoint: there is no complete checkpoint in {output_dir} to resume from.")
        logger.info("Resuming from %s, the last complete checkpoint.", last)
        return last
    if isinstance(value, (str, Path)):
        problems = checkpoint_problems(value)
        if problems:
            last = get_last_complete_checkpoint(Path(value).parent)
            hint = f"resume from {last} instead" if last else "no complete checkpoint is left beside it"
            raise ValueError(
                f"Cannot resume from {value}: {'; '.join(problems)}. It was probably interrupted while being "
                f"written; {hint} (resume_from_checkpoint=True picks the last complete checkpoint)."
            )
        return str(value)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# BatchNorm statistics across processes
# ----------------------------------------------------------------------------------------------------------------------


def broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's buffers of `module` (a no-op outside a multi-process run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


class SyncBuffersCallback(TrainerCallback):
    """Gives every process rank 0's buffers (BatchNorm running statistics) before an evaluation during training and
    at the end of training.

    DDP copies rank 0's buffers to the other ranks only at the start of a training forward, so after the last step
    each rank holds the statistics of its own last batch: a multi-process evaluation would mix models that differ
    from each other and from the checkpoint (which rank 0 writes).
    """

    @staticmethod
    def _sync(model: nn.Module | None) -> None:
        if model is not None:
            broadcast_buffers(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._sync(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._sync(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._sync(model)
