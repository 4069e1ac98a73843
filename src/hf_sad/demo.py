"""The built-in demo: teacher -> student distillation end to end on generated data, with no network.

1. a larger teacher is trained on a small labeled set (supervised),
2. a baseline student is trained on the same labeled set (supervised only),
3. a SAD student of the same architecture is trained on the labeled set plus an unlabeled stream, with ADL from the
   frozen teacher.

All three are evaluated on the same validation set (COCO mAP). The SAD student, its card and a picture of its
detections are saved, loadable with `from_pretrained` and `pipeline("object-detection")`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .arguments import SADTrainingArguments
from .data.synthetic import make_labeled_dataset, make_unlabeled_stream, synthetic_id2label
from .inference import detect, detections_grid
from .model.builder import create_detector
from .reporting import write_json
from .training.trainer import SADTrainer


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedules of the demo."""

    image_size: int = 128
    # A labeled scene costs about 5 ms to generate: a large labeled set is nearly free, and the teacher needs one.
    num_train: int = 500
    num_val: int = 200
    # From scratch at this budget, steps matter more than depth: the teacher is the student's backbone with twice the
    # pyramid and head width, trained almost 4x as long (4 of the demo's minutes on 2 CPU cores).
    teacher_backbone: str = "resnet10t"
    teacher_width: int = 64
    student_backbone: str = "resnet10t"
    student_width: int = 32
    head_num_convs: int = 2
    # Objects are 8-64 px: RetinaNet's default anchors (32-512 px on levels 3-7, made for 800 px images) would leave
    # the smaller half of them without an anchor of IoU >= 0.5.
    anchor_scale: float = 2.0
    batch_size: int = 8
    teacher_steps: int = 1150
    student_steps: int = 300
    learning_rate: float = 2e-3
    # Batches are padded to their largest image, so any up-scaling makes nearly every batch 160 px (1.56x the
    # pixels and time of 128 px); scale jitter that only shrinks keeps the augmentation at no extra cost.
    scale_jitter: tuple[float, float] = (0.8, 1.0)
    seed: int = 0


QUICK = replace(DemoConfig(), num_train=32, num_val=16, teacher_steps=12, student_steps=12, batch_size=4)


def training_arguments(config: DemoConfig, output_dir: Path, steps: int, **kwargs) -> SADTrainingArguments:
    """The demo's optimisation recipe (AdamW, cosine schedule with warm-up) for `steps` steps; `kwargs` add to or
    override its arguments (e.g. `save_strategy`)."""
    recipe = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=16,
        learning_rate=config.learning_rate,
        weight_decay=1e-4,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        scale_jitter=list(config.scale_jitter),
    )
    return SADTrainingArguments(**{**recipe, **kwargs})


def train_and_evaluate(
    name: str, model, processor, args: SADTrainingArguments, train, val, teacher=None, unlabeled=None,
    resume_from_checkpoint: str | None = None, callbacks: list | None = None,
) -> tuple[SADTrainer, dict, float]:
    """Train with `SADTrainer` (from a checkpoint folder when given), then evaluate on `val`; returns the trainer, COCO
    metrics and the seconds this call trained."""
    print(f"\n== {name}: {args.max_steps} steps ==", flush=True)
    trainer = SADTrainer(model, teacher, args, train, unlabeled, val, processing_class=processor, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    seconds = time.perf_counter() - start
    return trainer, {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}, seconds


def _summary(metrics: dict, model, seconds: float) -> dict:
    return {
        "map": metrics["map"],
        "map_50": metrics["map_50"],
        "map_75": metrics["map_75"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(seconds, 1),
    }


def run_demo(output_dir: str | Path = "sad-demo", quick: bool = False, config: DemoConfig | None = None) -> dict:
    """Train teacher, baseline student and SAD student; write results, the student, its card and a picture.

    Returns the results dict also written to `output_dir/results.json`.
    """
    config = config or (QUICK if quick else DemoConfig())
    output_dir = Path(output_dir)
    id2label = synthetic_id2label()
    size = {"height": config.image_size, "width": config.image_size}
    train = make_labeled_dataset(config.num_train, seed=config.seed, image_size=config.image_size)
    val = make_labeled_dataset(config.num_val, seed=config.seed + 1000, image_size=config.image_size)
    unlabeled = make_unlabeled_stream(seed=config.seed, image_size=config.image_size)

    def detector(backbone: str, width: int):
        torch.manual_seed(config.seed)
        return create_detector(backbone, id2label, image_size=size, fpn_channels=width, head_channels=width,
                               head_num_convs=config.head_num_convs, anchor_scale=config.anchor_scale)

    def student():
        return detector(config.student_backbone, config.student_width)

    teacher, processor = detector(config.teacher_backbone, config.teacher_width)
    args = training_arguments(config, output_dir / "teacher", config.teacher_steps, distill_loss="none")
    teacher_trainer, teacher_metrics, teacher_seconds = train_and_evaluate(
        "teacher (supervised)", teacher, processor, args, train, val
    )
    teacher_trainer.save_model()  # the SAD student's teacher is this folder, named so in its card

    baseline, processor = student()
    args = training_arguments(config, output_dir / "student_baseline", config.student_steps, distill_loss="none")
    _, baseline_metrics, baseline_seconds = train_and_evaluate(
        "student baseline (supervised)", baseline, processor, args, train, val
    )

    sad, processor = student()
    # Twice the batch with half of it unlabeled: the SAD student sees as many labeled images per step as the baseline.
    sad_config = replace(config, batch_size=2 * config.batch_size)
    args = training_arguments(
        sad_config, output_dir / "student", config.student_steps, distill_loss="adl", unlabeled_ratio=0.5
    )
    trainer, sad_metrics, sad_seconds = train_and_evaluate(
        "SAD student (ADL, labeled + unlabeled)", sad, processor, args, train, val, teacher=str(output_dir / "teacher"),
        unlabeled=unlabeled,
    )

    results = {
        "teacher": {"backbone": config.teacher_backbone, **_summary(teacher_metrics, teacher, teacher_seconds)},
        "student_baseline": {"backbone": config.student_backbone,
                             **_summary(baseline_metrics, baseline, baseline_seconds)},
        "student_sad": {"backbone": config.student_backbone, **_summary(sad_metrics, sad, sad_seconds)},
        "config": asdict(config),
        "quick": quick,
    }
    _save_student(trainer, processor, output_dir / "student", val, results, teacher_metrics, baseline_metrics,
                  sad_metrics)
    write_json(output_dir / "results.json", results)
    print(format_results(results), flush=True)
    return results


def _save_student(trainer, processor, folder: Path, val, results, teacher_metrics, baseline_metrics, sad_metrics):
    trainer.save_model(str(folder))
    model = trainer.model
    images = [val[i]["image"] for i in range(min(8, len(val)))]
    picture = detections_grid(images, detect(model, processor, images, threshold=0.4), model.config.id2label)
    picture.save(folder / "detections.png")
    picture.save(folder.parent / "detections.png")
    trainer.create_model_card(
        model_name="sad-demo-student",
        dataset_name="hf-sad synthetic shapes",
        teacher_metrics=teacher_metrics,
        baseline_metrics=baseline_metrics,
        detections_image="detections.png",
    )


def format_results(results: dict) -> str:
    rows = [("teacher", "teacher"), ("student_baseline", "student, supervised"), ("student_sad", "student, SAD")]
    lines = [
        "",
        f"{'model':<22}{'backbone':<12}{'mAP':>7}{'mAP@50':>8}{'params':>9}{'train s':>9}",
        "-" * 67,
    ]
    for key, name in rows:
        r = results[key]
        lines.append(f"{name:<22}{r['backbone']:<12}{100 * r['map']:>7.1f}{100 * r['map_50']:>8.1f}"
                     f"{r['parameters'] / 1e6:>8.1f}M{r['train_seconds']:>9.0f}")
    return "\n".join(lines)
