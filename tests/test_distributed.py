"""The same distillation on 2 processes (CPU, gloo): `torchrun --standalone --nproc_per_node 2 ... --use_cpu`.

Each run but the last goes through tests/dist_worker.py, which runs the real `hf_sad.cli.distill_main` (what
scripts/distill.py runs) or `SADTrainer.evaluate`, and makes every rank write what it saw (world size, hashes of the
images its collator received, hashes of the student's weights, the evaluated images). Every subprocess has a timeout
and runs in its own process group, which is killed on timeout, so a stuck rank cannot hang the test; torchrun itself
stops all ranks and exits non-zero when one rank fails.

The last runs tests/robust_worker.py, in which one rank dies abruptly: the run exits non-zero within a bounded time
instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForObjectDetection

from hf_sad.data.synthetic import SYNTHETIC_LABELS, make_labeled_dataset, make_unlabeled_stream

from .dist_worker import evaluate as evaluate_in_this_process
from .dist_worker import tensors_hash
from .utils import (
    FAULT_WORKER,
    TINY_FLAGS,
    distill_args,
    finish,
    save_detector,
    start,
    tiny_detector,
    worker_env,
)

DIST_WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"
NUM_PARQUET_FILES, IMAGES_PER_FILE = 4, 6


def torchrun(nproc: int, *args: str, timeout: float = 150) -> str:
    """Run tests/dist_worker.py on `nproc` CPU processes; return its output, fail with its tail on error/timeout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), str(DIST_WORKER), *args]
    process = start(command, env)  # own process group: on timeout, torchrun and every rank are killed together
    output = finish(process, timeout)
    assert process.returncode == 0, f"torchrun exited with {process.returncode}:\n{output[-6000:]}"
    return output


def read_records(record_dir: Path, world_size: int) -> list[dict]:
    records = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert sorted(path.name for path in record_dir.glob("rank*.json")) == [f"rank{r}.json" for r in range(world_size)]
    return records


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, saved_teacher):
    """A saved tiny teacher and an unlabeled pool of NUM_PARQUET_FILES parquet shards (with the images' hashes)."""
    root = tmp_path_factory.mktemp("distributed")
    rows = list(make_unlabeled_stream(image_size=64, num_images=NUM_PARQUET_FILES * IMAGES_PER_FILE))
    pool = root / "unlabeled"
    pool.mkdir()
    features = datasets.Features({"image": datasets.Image()})
    hashes_per_file = []
    for k in range(NUM_PARQUET_FILES):
        shard = datasets.Dataset.from_list(rows[k::NUM_PARQUET_FILES], features=features)
        shard.to_parquet(str(pool / f"part-{k}.parquet"))
        stored = datasets.Dataset.from_parquet(str(pool / f"part-{k}.parquet")).cast_column(
            "image", datasets.Image(decode=False)
        )
        hashes_per_file.append({hashlib.sha256(row["image"]["bytes"]).hexdigest() for row in stored})
    return {"root": root, "teacher": saved_teacher, "unlabeled": pool, "hashes_per_file": hashes_per_file}


def test_distill_script_on_two_processes_reads_disjoint_data_and_keeps_ranks_in_sync(workspace):
    root = workspace["root"]
    record_dir, output_dir = root / "distill-records", root / "distill-out"
    record_dir.mkdir()
    output = torchrun(
        2, "distill", str(record_dir),
        "--teacher", str(workspace["teacher"]), "--student", "resnet18", "--image_size", "64",
        *TINY_FLAGS,
        "--train_data", "synthetic:8", "--synthetic_image_size", "64", "--eval_data", "synthetic-val:5",
        "--unlabeled_data", str(workspace["unlabeled"]),
        "--output_dir", str(output_dir), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--eval_strategy", "steps", "--eval_steps", "2",
        "--learning_rate", "1e-3", "--save_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--dataloader_num_workers", "0", "--use_cpu",
    )
    ranks = read_records(record_dir, 2)
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank
        assert record["world_size"] == record["args_world_size"] == 2, output[-3000:]  # really 2 processes
        assert record["global_step"] == 3

    # Disjoint data: every rank read its own parquet files (whole shards), none read the other's images.
    pool = set().union(*workspace["hashes_per_file"])
    seen = [set(record["unlabeled"]) for record in ranks]
    assert seen[0] and seen[1], "each rank collated unlabeled images"
    assert seen[0] <= pool and seen[1] <= pool
    assert not seen[0] & seen[1], "the two ranks read the same unlabeled images"
    files = [{k for k, hashes in enumerate(workspace["hashes_per_file"]) if hashes & s} for s in seen]
    assert not files[0] & files[1], f"parquet files read by both ranks: {files}"
    labeled = [set(record["labeled"]) for record in ranks]
    assert labeled[0] and labeled[1] and not labeled[0] & labeled[1]

    # Identical students: same parameters (DDP averages gradients) and same buffers (BatchNorm statistics), and the
    # checkpoint rank 0 saved is that student.
    assert ranks[0]["parameters"] == ranks[1]["parameters"]
    assert ranks[0]["buffers"] == ranks[1]["buffers"]
    # The evaluations inside train() (steps 2 and 3, each after the ranks' own BatchNorm updates) ran one model.
    assert len(ranks[0]["eval_buffers"]) == 2
    assert ranks[0]["eval_buffers"] == ranks[1]["eval_buffers"]
    saved = load_file(str(output_dir / "model.safetensors"))
    student = AutoModelForObjectDetection.from_pretrained(output_dir)
    assert tensors_hash({n: saved[n] for n, _ in student.named_parameters()}) == ranks[0]["parameters"]
    assert tensors_hash({n: saved[n] for n, _ in student.named_buffers() if n in saved}) == ranks[0]["buffers"]
    results = json.loads((output_dir / "results.json").read_text())
    assert "eval_map" in results and results["train_loss"] > 0


def test_mean_teacher_on_two_processes_is_updated_once_per_step_and_identical_on_both(workspace):
    root = workspace["root"]
    record_dir = root / "ema-records"
    record_dir.mkdir()
    output = torchrun(
        2, "distill", str(record_dir),
        "--ema_teacher", "--ema_decay", "0.5", "--pseudo_label_threshold", "0.01",
        "--student", "resnet18", "--image_size", "64", *TINY_FLAGS,
        "--train_data", "synthetic:8", "--synthetic_image_size", "64",
        "--unlabeled_data", str(workspace["unlabeled"]),
        "--output_dir", str(root / "ema-out"), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--save_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--dataloader_num_workers", "0", "--use_cpu",
    )
    ranks = read_records(record_dir, 2)
    assert all(record["world_size"] == 2 for record in ranks), output[-3000:]
    assert [record["ema_updates"] for record in ranks] == [3, 3]  # per optimizer step, not per micro-batch
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["parameters"] == ranks[1]["parameters"]


def pseudo_labeled_eval_set(model_dir: Path, folder: Path, num_images: int = 5) -> Path:
    """`num_images` synthetic images whose ground truth is part of the fixed model's own detections, saved to disk.

    Every third detection (from the best) becomes a box, with the predicted class: mAP is then well inside (0, 1),
    and any mix-up of images, predictions and ground truth across processes changes it.
    """
    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = list(make_labeled_dataset(num_images, seed=3, image_size=64)["image"])
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    detections = processor.post_process_object_detection(outputs, threshold=0.05, target_sizes=[(64, 64)] * num_images)
    objects = []
    for k, d in enumerate(detections):
        boxes, labels = d["boxes"][k % 3::3][:6], d["labels"][k % 3::3][:6]  # a different subset per image
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        keep = (xywh[:, 2] > 1) & (xywh[:, 3] > 1)
        objects.append({"bbox": xywh[keep].round(decimals=2).tolist(), "category": labels[keep].tolist()})
    assert all(o["bbox"] for o in objects)
    features = datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "objects": {
            "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
            "category": datasets.List(datasets.ClassLabel(names=SYNTHETIC_LABELS)),
        },
    })
    dataset = datasets.Dataset.from_dict(
        {"image_id": list(range(num_images)), "image": images, "objects": objects}, features=features
    )
    dataset.save_to_disk(str(folder))
    return folder


def test_evaluation_map_is_the_same_on_one_and_two_processes(workspace):
    """5 eval images on 2 processes x 2 per batch: the last global batch is padded by the sampler and must be
    deduplicated; per-rank detections of different lengths are padded before the gather."""
    root = workspace["root"]
    model, processor = tiny_detector(anchor_scale=1.5)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fresh head predicts the prior everywhere; make scores vary so detections are ranked
        weight = model.class_head.predictor.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 2.0)
        model.class_head.predictor.bias.fill_(-1.0)
    model_dir = save_detector((model, processor), root / "fixed-model")
    eval_dir = pseudo_labeled_eval_set(model_dir, root / "eval-set")

    one_dir, two_dir = root / "eval-1", root / "eval-2"
    one_dir.mkdir()
    two_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): the same floating-point results
    try:
        evaluate_in_this_process(str(one_dir), str(model_dir), str(eval_dir))
    finally:
        torch.set_num_threads(threads)
    torchrun(2, "evaluate", str(two_dir), str(model_dir), str(eval_dir))
    (single,) = read_records(one_dir, 1)
    ranks = read_records(two_dir, 2)
    assert single["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]

    # Exactly the 5 images reached the metric on 2 processes (no sampler duplicate, none lost), with the same
    # ground truth and numbers of detections as on one process.
    def images(record):
        return sorted(json.dumps(image) for image in record["images"])

    assert len(single["images"]) == 5
    for record in ranks:
        assert images(record) == images(single)
    expected = single["metrics"]
    assert 0.05 < expected["eval_map"] < 0.95, expected
    for record in ranks:
        for key, value in expected.items():
            if key.startswith("eval_ma"):  # eval_map*, eval_mar*
                got = record["metrics"][key]
                assert (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value, abs=1e-9), key


def test_a_dying_process_fails_a_two_process_run_within_bounded_time(tmp_path, saved_teacher):
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(FAULT_WORKER), "die", "2",
               *distill_args(saved_teacher, tmp_path / "out"), "--ddp_timeout", "60"]
    started = time.monotonic()
    process = start(command, worker_env(tmp_path))
    output = finish(process, timeout=150)
    elapsed = time.monotonic() - started
    assert process.returncode != 0, output[-4000:]
    assert "rank 1: exiting abruptly at step 2" in output
    assert elapsed < 120, f"took {elapsed:.0f} s"
    print(f"torchrun exited with {process.returncode} after {elapsed:.1f} s")
