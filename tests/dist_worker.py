"""Worker of tests/test_distributed.py, launched by `torchrun` (one copy per rank); not a test module.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py distill RECORD_DIR [hf-sad distill arguments...]
    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py evaluate RECORD_DIR MODEL_DIR EVAL_DATA

`distill` runs the real `hf_sad.cli.distill_main` (what `scripts/distill.py` runs) with `SADTrainer` swapped for a
subclass that only records, per rank, into RECORD_DIR/rank<k>.json: the world size (torch.distributed and
TrainingArguments), a hash of every image the data collator received (unlabeled and labeled apart), hashes of the
student's parameters and buffers after training (and of the mean teacher with `--ema_teacher`), and of the buffers
each evaluation during training ran with.
`evaluate` runs `SADTrainer.evaluate` on a saved model and records the metrics and, per evaluated image, the ground
truth and the number of detections that reached `compute_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForObjectDetection  # noqa: E402

import hf_sad.cli  # noqa: E402
from hf_sad.arguments import SADTrainingArguments  # noqa: E402
from hf_sad.data import load_labeled_dataset  # noqa: E402
from hf_sad.evaluation import DetectionMetrics  # noqa: E402
from hf_sad.training.trainer import SADTrainer  # noqa: E402


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def image_hash(value) -> str:
    """Hash of an undecoded image (`{"bytes", "path"}`) as the collator receives it."""
    data = value.get("bytes") or Path(value["path"]).read_bytes()
    return hashlib.sha256(data).hexdigest()


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_record(record_dir: str, record: dict) -> None:
    path = Path(record_dir) / f"rank{rank()}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True))


class RecordingCollator:
    """Wraps the trainer's collator: remembers a hash of each image it collates, then collates as before."""

    def __init__(self, collator):
        self.collator = collator
        self.unlabeled: list[str] = []
        self.labeled: list[str] = []

    def __call__(self, rows):
        for row in rows:
            if "sample_index" in row:  # a training-stream row (evaluation rows have none)
                (self.labeled if row["is_labeled"] else self.unlabeled).append(image_hash(row["image"]))
        return self.collator(rows)


class RecordingSADTrainer(SADTrainer):
    record_dir = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = RecordingCollator(self.data_collator)
        self.eval_buffers: list[str] = []  # per evaluation: hash of the buffers the student evaluated with

    def evaluation_loop(self, *args, **kwargs):
        self._eval_recorded = False
        return super().evaluation_loop(*args, **kwargs)

    def prediction_step(self, model, *args, **kwargs):
        if not self._eval_recorded:
            self.eval_buffers.append(tensors_hash(dict(self.accelerator.unwrap_model(model).named_buffers())))
            self._eval_recorded = True
        return super().prediction_step(model, *args, **kwargs)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        write_record(self.record_dir, {
            "rank": rank(),
            "world_size": world_size(),
            "args_world_size": self.args.world_size,
            "global_step": self.state.global_step,
            "unlabeled": self.data_collator.unlabeled,
            "labeled": self.data_collator.labeled,
            "parameters": tensors_hash(dict(student.named_parameters())),
            "buffers": tensors_hash(dict(student.named_buffers())),
            "eval_buffers": self.eval_buffers,
            "ema": tensors_hash(self.teacher.average.state_dict()) if self.args.ema_teacher else None,
            "ema_updates": int(self.teacher.n_averaged) if self.args.ema_teacher else None,
        })
        return result


class RecordingMetrics(DetectionMetrics):
    """COCO mAP as usual; also keeps, per image that reached the metric, its ground truth and detections."""

    def __init__(self, id2label):
        super().__init__(id2label)
        self.images: list[dict] = []

    def __call__(self, eval_prediction):
        for batch_pred, batch_gt in zip(eval_prediction.predictions, eval_prediction.label_ids):
            for pred, gt in zip(np.asarray(batch_pred), np.asarray(batch_gt)):
                pred, gt = pred[pred[:, 5] >= 0], gt[gt[:, 4] >= 0]
                self.images.append({"gt": gt.round(3).tolist(), "num_detections": len(pred)})
        return super().__call__(eval_prediction)


def distill(record_dir: str, argv: list[str]) -> None:
    RecordingSADTrainer.record_dir = record_dir
    hf_sad.cli.SADTrainer = RecordingSADTrainer
    hf_sad.cli.distill_main(argv)


def evaluate(record_dir: str, model_dir: str, eval_data: str) -> None:
    eval_dataset = load_labeled_dataset(eval_data)
    args = SADTrainingArguments(
        output_dir=str(Path(record_dir) / "eval-out"), distill_loss="none", use_cpu=True, report_to="none",
        per_device_eval_batch_size=2, dataloader_num_workers=0, disable_tqdm=True,
    )
    model = AutoModelForObjectDetection.from_pretrained(model_dir)
    metrics = RecordingMetrics(model.config.id2label)
    trainer = SADTrainer(model, None, args, eval_dataset=eval_dataset, compute_metrics=metrics)
    result = trainer.evaluate()
    write_record(record_dir, {
        "rank": rank(), "world_size": world_size(), "metrics": result, "images": metrics.images,
    })


if __name__ == "__main__":
    # datasets sleeps this long (default 5 s) for PyArrow's reader threads when a stream mixing in parquet shards is
    # closed (once per rank at the end of training); a short wait keeps the test fast.
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0.5
    mode, record_dir, *rest = sys.argv[1:]
    if mode == "distill":
        distill(record_dir, rest)
    elif mode == "evaluate":
        evaluate(record_dir, *rest)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
