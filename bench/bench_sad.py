"""B2 (SAD training step), B6 (training data pipeline) and B7 (peak memory of a SAD step).

Data: a labeled synthetic set (`hf_sad.data.synthetic.make_labeled_dataset`, PNG-encoded in Arrow) and an unlabeled pool
of shifted-domain synthetic scenes stored as JPEG in parquet shards, streamed with `hf_sad.data.load_unlabeled_images`
(what a user with a folder of parquet shards gets). Both are written once per scale into a work folder.

The teacher is a bigger detector (`Scale.teacher_backbone`) whose class scores are spread so that ~100 (anchor, class)
entries per image score above the 0.5 pseudo-label threshold (a fresh head predicts the 0.01 prior everywhere, which
would leave the pseudo-label path with nothing to do).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path

import torch
from common import (
    Scale,
    build_student,
    build_teacher,
    calibrate_scores,
    interleaved_times,
    num_parameters,
    peak_rss_bytes,
    ratio_row,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
)

LR = 0.01
PSEUDO_PER_IMAGE = 100  # teacher entries per image above the 0.5 pseudo-label threshold
NUM_SHARDS = 8


# ----------------------------------------------------------------------------------------------------------------------
# Data and trainer
# ----------------------------------------------------------------------------------------------------------------------


def make_sources(scale: Scale, workdir: str | Path, num_labeled: int = 48, num_unlabeled: int = 48):
    """(labeled `datasets.Dataset`, unlabeled streaming `IterableDataset`), created on first use in `workdir`."""
    import datasets

    from hf_sad.data import load_unlabeled_images
    from hf_sad.data.synthetic import generate_scene, make_labeled_dataset

    workdir = Path(workdir)
    labeled = make_labeled_dataset(
        num_labeled, seed=0, image_size=scale.image_size, cache_dir=str(workdir / "hf-cache")
    )
    folder = workdir / f"unlabeled-{scale.image_size}-{num_unlabeled}"
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(num_unlabeled):
            image, _ = generate_scene(10_000_000 + i, image_size=scale.image_size, shifted=True)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            rows.append({"bytes": buffer.getvalue(), "path": None})
        features = datasets.Features({"image": datasets.Image()})
        pool = datasets.Dataset.from_dict({"image": rows}, features=features)
        for shard in range(NUM_SHARDS):
            pool.shard(NUM_SHARDS, shard, contiguous=True).to_parquet(str(folder / f"part-{shard:03d}.parquet"))
        (folder / "done").write_text("ok")
    unlabeled = load_unlabeled_images(folder)
    return labeled, unlabeled


def make_trainer(scale: Scale, student, teacher, processor, labeled, unlabeled, workdir, workers: int = 0,
                 device: str = "cpu", bf16: bool = False):
    """A `SADTrainer` for timing steps; on a non-CPU `device` it places both models there (teacher in bf16 with
    `bf16`)."""
    from hf_sad.training.trainer import SADTrainer, SADTrainingArguments

    args = SADTrainingArguments(
        output_dir=str(Path(workdir) / "trainer-out"),
        per_device_train_batch_size=scale.batch_size,
        max_steps=1000,
        learning_rate=LR,
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        seed=0,
        dataloader_num_workers=workers,
        disable_tqdm=True,
        save_strategy="no",
        logging_strategy="no",
    )
    return SADTrainer(student, teacher, args, labeled, unlabeled, processing_class=processor)


def prepared_batch(scale: Scale, trainer, labeled, unlabeled) -> dict:
    """One collated mixed batch (labeled / unlabeled alternating) at exactly the scale's image size: the collator with
    its flip but no scale jitter, so that the step sees `image_size` x `image_size` inputs."""
    from hf_sad.data import SADDataCollator, build_training_stream, category_mapping

    mapping = category_mapping(labeled, trainer.model.config.id2label)
    stream = build_training_stream(labeled, unlabeled, unlabeled_ratio=0.5, category_map=mapping, seed=0)
    rows = list(stream.take(scale.batch_size))
    collator = SADDataCollator(trainer.processing_class, hflip_prob=0.5, scale_range=(1.0, 1.0), category_map=mapping)
    return collator(rows)


def setup_sad(scale: Scale, workdir, workers: int = 0, device: str = "cpu", bf16: bool = False):
    """(student, trainer, prepared batch on `device`, teacher's fraction of scores above 0.5) for timing SAD steps."""
    student, processor = build_student(scale)
    teacher = build_teacher(scale)
    labeled, unlabeled = make_sources(scale, workdir)
    trainer = make_trainer(scale, student, teacher, processor, labeled, unlabeled, workdir, workers, device, bf16)
    batch = prepared_batch(scale, trainer, labeled, unlabeled)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch["labels"] = [{k: v.to(device) for k, v in label.items()} for label in batch["labels"]]
    pixel_values = batch["pixel_values"].to(next(trainer.teacher.parameters()).dtype)
    above = calibrate_scores(teacher, pixel_values, threshold=0.5, per_image=PSEUDO_PER_IMAGE)
    student.to(device).train()
    return student, trainer, batch, above


def _sad_step_fn(student, trainer, batch, optimizer):
    def step():
        trainer._metrics.clear()
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _supervised_step_fn(student, batch, optimizer):
    def step():
        out = student(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------------------------------------------------
# B2
# ----------------------------------------------------------------------------------------------------------------------


def bench_sad_step(scale: Scale, workdir) -> dict:
    """B2: SADTrainer.compute_loss + backward + SGD step vs the same networks' compute on the same tensors (student
    forward + backward of fixed random output gradients, teacher forward under no_grad, the same SGD step)."""
    student, trainer, batch, above = setup_sad(scale, workdir)
    teacher = trainer.teacher.detector  # the network alone
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    with torch.no_grad():
        out = student(pixel_values=pixel_values, pixel_mask=pixel_mask)
    generator = torch.Generator().manual_seed(0)
    grad_logits = torch.randn(out.logits.shape, generator=generator) * 1e-4
    grad_boxes = torch.randn(out.box_regression.shape, generator=generator) * 1e-4

    sad = _sad_step_fn(student, trainer, batch, optimizer)

    def pure():
        out = student(pixel_values=pixel_values, pixel_mask=pixel_mask)
        torch.autograd.backward([out.logits, out.box_regression], [grad_logits, grad_boxes])
        with torch.no_grad():
            teacher(pixel_values=pixel_values.to(next(teacher.parameters()).dtype), pixel_mask=pixel_mask)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = interleaved_times({"ours": sad, "reference": pure}, scale.repeats, scale.warmup)
    sad()
    metrics = {k: round(sum(v) / len(v), 6) for k, v in trainer._metrics.items() if v}
    alone = _sad_specific_times(student, trainer, batch, repeats=max(8, scale.repeats))
    row = {
        "sizes": {
            "student": f"{scale.backbone} FPN/heads {scale.channels} x {scale.num_convs} convs",
            "teacher": f"{scale.teacher_backbone} FPN/heads {scale.teacher_channels} x {scale.num_convs} convs",
            "student_parameters": num_parameters(student),
            "teacher_parameters": num_parameters(teacher),
            "image_size": scale.image_size,
            "batch_size": scale.batch_size,
            "labeled_in_batch": int(batch["is_labeled"].sum()),
            "num_classes": scale.num_classes,
            "num_anchors": int(out.anchors.shape[0]),
            "teacher_fraction_above_0.5": above,
        },
        "repeats": scale.repeats,
        "warmup": scale.warmup,
        "times": times,
        "step_metrics": metrics,
        "overhead_s": times["ours"]["time_s"] - times["reference"]["time_s"],
        "overhead_cpu_s": times["ours"]["cpu_time_s"] - times["reference"]["cpu_time_s"],
        "consumption_images_per_s": scale.batch_size / times["ours"]["time_s"],
        "breakdown": {
            "what": "hf_sad.distillation.sad_loss.sad_loss + backward on cached student and teacher outputs: "
                    "supervised loss, pseudo-labels, anchor matching, ADL, and their backward to the outputs",
            "repeats": max(8, scale.repeats),
            "times": alone,
            "share_of_pure_compute": alone["cpu_time_s"] / times["reference"]["cpu_time_s"],
        },
    }
    row.update(ratio_row(times, "ours", "reference"))
    return row


def _sad_specific_times(student, trainer, batch, repeats: int) -> dict:
    """CPU/wall time of `hf_sad.distillation.sad_loss.sad_loss` + its backward to the outputs, on the student's and the
    teacher's outputs computed once (what the SAD step adds to the two networks)."""
    from hf_sad.distillation.sad_loss import sad_loss

    with torch.no_grad():
        student_out = student(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        teacher_out = trainer.teacher(
            pixel_values=batch["pixel_values"].to(next(trainer.teacher.parameters()).dtype),
            pixel_mask=batch["pixel_mask"],
        )

    def step():
        outputs = type(student_out)(
            logits=student_out.logits.detach().requires_grad_(),
            pred_boxes=student_out.pred_boxes,
            box_regression=student_out.box_regression.detach().requires_grad_(),
            anchors=student_out.anchors,
            spatial_shapes=student_out.spatial_shapes,
            image_sizes=student_out.image_sizes,
        )
        result = sad_loss(student.config, outputs, teacher_out, batch["labels"], batch["is_labeled"], trainer.args,
                          trainer.processing_class)
        result.loss.backward()

    return interleaved_times({"alone": step}, repeats, 2)["alone"]


# ----------------------------------------------------------------------------------------------------------------------
# B6
# ----------------------------------------------------------------------------------------------------------------------


def bench_pipeline(scale: Scale, workdir, workers: int, batches: int) -> dict:
    """B6: images/s out of `SADTrainer.get_train_dataloader()` (build_training_stream of the labeled set and the
    streamed unlabeled parquet pool, SADDataCollator with the default flip and 0.8-1.2 scale jitter, torch DataLoader
    with `workers` workers, through accelerate as in training), consumed as fast as possible."""
    student, processor = build_student(scale)
    teacher = build_teacher(scale)
    labeled, unlabeled = make_sources(scale, workdir)
    trainer = make_trainer(scale, student, teacher, processor, labeled, unlabeled, workdir, workers)
    loader = trainer.get_train_dataloader()
    iterator = iter(loader)
    start = time.perf_counter()
    warm = max(2, workers + 1)
    for _ in range(warm):  # worker start-up, shuffle buffer, first decode
        next(iterator)
    startup = time.perf_counter() - start
    per_batch, images, labeled_rows, pixels = [], 0, 0, []
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(iterator)
        per_batch.append(time.perf_counter() - t0)
        images += len(batch["is_labeled"])
        labeled_rows += int(batch["is_labeled"].sum())
        pixels.append(tuple(batch["pixel_values"].shape[-2:]))
    total = sum(per_batch)
    # Median rate over three consecutive segments of the timed batches.
    thirds = [per_batch[i::3] for i in range(3)]
    segment_rates = [len(seg) * scale.batch_size / sum(seg) for seg in thirds if seg]
    del iterator
    return {
        "workers": workers,
        "batches": batches,
        "images": images,
        "labeled_share": labeled_rows / max(images, 1),
        "startup_s": startup,
        "images_per_s": images / total,
        "images_per_s_median_segment": statistics.median(segment_rates),
        "padded_sizes": sorted(set(pixels)),
        "batch_times_s": [round(t, 5) for t in per_batch],
    }


# ----------------------------------------------------------------------------------------------------------------------
# B7 (each case in its own fresh process)
# ----------------------------------------------------------------------------------------------------------------------


def memory_case(scale: Scale, workdir, case: str, steps: int = 1) -> dict:
    """Peak resident memory of `steps` steps of `case` ("sad" or "supervised") in this (fresh) process.

    Both cases build the same student, teacher (kept in memory, fp32), trainer, batch and SGD optimizer, whose
    momentum buffers are created up front (as after a first step); "sad" runs SADTrainer.compute_loss + backward +
    step, "supervised" the student's own supervised loss on the same batch (the teacher weights only sit in memory).
    VmHWM is reset after the setup; reported: peak - RSS after imports (models, batch, optimizer state and the step's
    transient memory) and peak - RSS after setup (the step's own memory). Freed heap memory is handed back to the OS
    (malloc_trim) before both baselines, so RSS counts live memory.
    """
    torch.zeros(1).add_(1)  # initialise torch's thread pool before the baseline
    release_free_memory()
    base = rss_bytes()
    student, trainer, batch, _ = setup_sad(scale, workdir)
    optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9)
    for p in student.parameters():  # a zero step creates the momentum buffers, as a first step would
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if case == "sad":
        step = _sad_step_fn(student, trainer, batch, optimizer)
    elif case == "supervised":
        step = _supervised_step_fn(student, batch, optimizer)
    else:
        raise ValueError(case)
    release_free_memory()  # what setup freed (calibration, collation) must not be reused unseen by the step
    setup = rss_bytes()
    exact = reset_peak_rss()
    for _ in range(steps):
        step()
    peak = peak_rss_bytes()
    return {
        "case": case,
        "pid": os.getpid(),
        "hwm_reset": exact,
        "rss_after_imports": base,
        "rss_after_setup": setup,
        "peak_rss": peak,
        "peak_over_imports": peak - base,
        "peak_over_setup": peak - setup,
        "student_weight_bytes": sum(p.numel() * p.element_size() for p in student.parameters()),
        "teacher_weight_bytes": sum(p.numel() * p.element_size() for p in trainer.teacher.parameters()),
        "steps": steps,
    }
