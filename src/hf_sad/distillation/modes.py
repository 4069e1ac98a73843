"""The distillation modes a run can train with, chosen by name (`--distill_loss`), as transformers chooses a loss from
`LOSS_MAPPING`.

Each `DistillationMode` says what it needs (a teacher, unlabeled images), what it trains on unlabeled images (soft
targets, pseudo-boxes or both), its soft term (a kernel of `hf_sad.distillation.losses`) and which settings describe
it on a model card. The rest of the package asks the mode; only this module compares `distill_loss` with a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .losses import adaptive_distillation_loss, focal_distillation_loss, kl_distillation_loss

__all__ = ["DISTILLATION_MODES", "DistillationMode", "distillation_mode"]

#: A soft term: (student logits, teacher logits, the run's settings, kernel keyword arguments) -> (loss, stats).
SoftTerm = Callable[..., tuple[Tensor, dict[str, Tensor]]]

#: Settings that describe every soft-target mode on a card.
_SOFT_CARD = ("distill_temperature", "distill_normalizer", "normalizer_power", "labeled_distill_weight",
              "unlabeled_distill_weight", "unlabeled_ratio", "pseudo_label_threshold", "pseudo_box_weight")


def _adl(student: Tensor, teacher: Tensor, args: Any, **kernel) -> tuple[Tensor, dict[str, Tensor]]:
    return adaptive_distillation_loss(student, teacher, beta=args.adl_beta, gamma=args.adl_gamma,
                                      variant=args.adl_variant, **kernel)


def _kl(student: Tensor, teacher: Tensor, args: Any, **kernel) -> tuple[Tensor, dict[str, Tensor]]:
    return kl_distillation_loss(student, teacher, **kernel)


def _fdl(student: Tensor, teacher: Tensor, args: Any, **kernel) -> tuple[Tensor, dict[str, Tensor]]:
    return focal_distillation_loss(student, teacher, gamma=args.adl_gamma, **kernel)


@dataclass(frozen=True)
class DistillationMode:
    """What one `distill_loss` value trains.

    Attributes:
        name: the `distill_loss` value.
        help: one line for `--help`.
        needs_teacher: a teacher (or the mean teacher) is required; False only for supervised training.
        soft_term: the soft-target loss between student and teacher logits (None: no soft targets).
        pseudo_boxes_only: on unlabeled images, the supervised loss against the teacher's pseudo-boxes replaces any
            soft term, weighted by `unlabeled_distill_weight` (data distillation).
        logs_mean_weight: the soft term reports ADL's mean adaptive weight (`adl_mean_weight_*` in the logs).
        card_settings: the settings (argument names) a model card lists for this mode.
    """

    name: str
    help: str
    needs_teacher: bool
    soft_term: SoftTerm | None = None
    pseudo_boxes_only: bool = False
    logs_mean_weight: bool = False
    card_settings: tuple[str, ...] = ()

    @property
    def uses_unlabeled_data(self) -> bool:
        """Whether unlabeled images teach anything in this mode (every mode with a teacher)."""
        return self.needs_teacher


DISTILLATION_MODES: dict[str, DistillationMode] = {
    mode.name: mode
    for mode in (
        DistillationMode("adl", "Adaptive Distillation Loss (the paper's)", True, _adl, logs_mean_weight=True,
                         card_settings=(*_SOFT_CARD, "adl_beta", "adl_gamma", "adl_variant")),
        DistillationMode("kl", "plain binary KL between teacher and student probabilities", True, _kl,
                         card_settings=_SOFT_CARD),
        DistillationMode("fdl", "focal distillation: hard-to-mimic entries only (ADL with beta = 0)", True, _fdl,
                         card_settings=(*_SOFT_CARD, "adl_gamma")),
        DistillationMode("hard", "the teacher's detections above pseudo_label_threshold as hard targets on unlabeled "
                         "images (data distillation)", True, pseudo_boxes_only=True,
                         card_settings=("pseudo_label_threshold", "unlabeled_distill_weight", "unlabeled_ratio")),
        DistillationMode("none", "supervised training only (a baseline; no teacher)", False),
    )
}


def distillation_mode(name: str) -> DistillationMode:
    """The mode called `name`; a ValueError naming the modes there are otherwise."""
    try:
        return DISTILLATION_MODES[name]
    except KeyError:
        raise ValueError(f"distill_loss={name!r} is not a distillation mode: expected one of "
                         f"{list(DISTILLATION_MODES)}.") from None
