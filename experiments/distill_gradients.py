"""Where each distillation loss pushes the student: a diagnostic for claim C1 (ADL beats KL) of the ablation grid.

    python experiments/distill_gradients.py [--dataset synthetic] [--seed 0] [--student start|teacher_same]
                                            [--batches 8] [--quick]

At the start of an ablation row (the student's pretrained start with fresh heads, and the row's trained teacher from
`experiments/ablation.py`'s work dir), or with a trained student in its place (`--student teacher_same`: the student's
architecture trained 3x longer, as a student late in training), it takes labeled training batches and measures, for
each distillation loss of the grid, the gradient that loss sends to the student's classification logits, as it would
enter the step (the row's distillation settings, weight 1). Per loss it prints:

- `mass`: the summed |d loss / d logit| over all (anchor, class) entries, relative to the supervised focal loss's;
- where that mass goes: to foreground anchors (IoU >= 0.5 with a labeled box) on the box's class entry, on the other
  class entries, and to background anchors, split into entries the loss pushes down (the teacher's probability is
  below the student's: suppression) and up (the teacher's is above: the teacher's "dark knowledge" on background).

The mass is a sum over entries, so it says how hard each loss pulls in total, not per anchor.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import ablation
import torch

from hf_sad import SADForObjectDetection, SADImageProcessor, SADTrainer
from hf_sad.demo import training_arguments
from hf_sad.distillation.sad_loss import _normalizer, distillation_term, distilled_anchors
from hf_sad.model.detection_loss import detection_loss

#: The grid's labeled-only distillation rows.
LOSSES = ("kl", "fdl", "adl", "adl_released", "kl_background")
PARTS = ("fg_class", "fg_other", "bg_down", "bg_up")


def gradient_parts(grad: torch.Tensor, supervised_grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                   anchor_labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Summed |grad| of (B, N, C) logits over the PARTS. `anchor_labels`: (B, N) 1 foreground, 0 background, -1
    ignored. The focal loss's gradient is negative exactly on entries whose target is 1, so `supervised_grad` marks
    each foreground anchor's class entry."""
    magnitude = grad.abs()
    foreground = (anchor_labels == 1).unsqueeze(-1).expand_as(grad)
    background = (anchor_labels == 0).unsqueeze(-1).expand_as(grad)
    true_class = foreground & (supervised_grad < 0)
    down = teacher < student  # sigmoid is monotonic: comparing logits compares probabilities
    return {
        "fg_class": magnitude[true_class].sum(),
        "fg_other": magnitude[foreground & ~true_class].sum(),
        "bg_down": magnitude[background & down].sum(),
        "bg_up": magnitude[background & ~down].sum(),
    }


def measure(dataset: str, seed: int, student_from: str, batches: int, quick: bool,
            work_dir: Path) -> dict[str, dict[str, float]]:
    """Summed gradient parts of the supervised focal loss and of each of LOSSES over `batches` training batches, for
    the student at its start (`student_from="start"`) or the trained checkpoint of the row `student_from`."""
    regime = ablation.REGIMES["pretrained-miniature"]
    setting = ablation.quick(regime.datasets[dataset]) if quick else regime.datasets[dataset]
    work = work_dir / regime.name / ("quick" if quick else "full")
    folders = {row: work / f"{dataset}-{seed}" / row for row in ("teacher", student_from) if row != "start"}
    for row, folder in folders.items():
        if not (folder / "model.safetensors").is_file():
            raise SystemExit(f"No {row} in {folder}: run `python experiments/ablation.py --datasets {dataset} "
                             f"--only_seeds {seed} --rows {row}{' --quick' if quick else ''}` first.")
    train, _, _, _, id2label, size = ablation.scenario(dataset, seed, setting)
    if student_from == "start":
        init, _ = ablation.pretrain(setting, "student", work)
        student, processor = ablation.build(setting, "student", id2label, size, seed, init)
    else:
        student = SADForObjectDetection.from_pretrained(folders[student_from])
        processor = SADImageProcessor.from_pretrained(folders[student_from])
    teacher = SADForObjectDetection.from_pretrained(folders["teacher"]).eval()
    student.eval()  # the backbone's BatchNorm is frozen anyway; nothing changes while measuring
    args = {key: training_arguments(replace(setting, seed=seed), work / "gradients", 1,
                                    distill_loss=ablation.ROWS[key].distill_loss,
                                    **{**dict(setting.distillation), **dict(ablation.ROWS[key].settings)})
            for key in LOSSES}
    loader = SADTrainer(student, teacher, args["kl"], train, None, None, processing_class=processor)
    totals = {key: dict.fromkeys(("mass",) + PARTS, 0.0) for key in ("supervised",) + LOSSES}
    for i, inputs in enumerate(loader.get_train_dataloader()):
        if i == batches:
            break
        pixels = {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs.get("pixel_mask")}
        with torch.no_grad():
            outputs, teacher_logits = student(**pixels), teacher(**pixels).logits
        logits = outputs.logits.requires_grad_()
        supervised = detection_loss(logits, outputs.box_regression, outputs.anchors, inputs["labels"],
                                    outputs.image_sizes, student.config)
        anchor_labels = supervised.assignment.labels
        terms = {"supervised": supervised.loss}  # the box term does not depend on the logits
        for key in LOSSES:
            keep = distilled_anchors(anchor_labels, args[key])
            normalizer = _normalizer(teacher_logits, anchor_labels, keep, torch.ones_like(keep), args[key])
            terms[key], _ = distillation_term(logits, teacher_logits, keep, normalizer, args[key])
        grads = {key: torch.autograd.grad(term, logits, retain_graph=True)[0] for key, term in terms.items()}
        for key, grad in grads.items():
            parts = gradient_parts(grad, grads["supervised"], logits.detach(), teacher_logits, anchor_labels)
            totals[key]["mass"] += float(sum(parts.values()))
            for part, value in parts.items():
                totals[key][part] += float(value)
    return totals


def report(totals: dict[str, dict[str, float]]) -> str:
    """A markdown table: each loss's gradient mass relative to the supervised loss's, and its shares (%)."""
    reference = totals["supervised"]["mass"]
    lines = ["| loss | mass (x supervised) | " + " | ".join(PARTS) + " |", "|---|---|" + "---|" * len(PARTS)]
    for key, parts in totals.items():
        shares = " | ".join(f"{100 * parts[p] / max(parts['mass'], 1e-30):.1f}%" for p in PARTS)
        lines.append(f"| {key} | {parts['mass'] / reference:.3f} | {shares} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "bccd"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student", default="start", choices=["start", "teacher_same"],
                        help="the student at a row's start, or the student's architecture trained 3x longer")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="the grid's --quick settings (tiny data and models)")
    parser.add_argument("--work_dir", default=str(ablation.ROOT / "runs" / "ablation"))
    args = parser.parse_args(argv)
    totals = measure(args.dataset, args.seed, args.student, args.batches, args.quick, Path(args.work_dir))
    print(report(totals))
    return totals


if __name__ == "__main__":
    main()
