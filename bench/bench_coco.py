"""B5: COCO box mAP of the same detections, `hf_sad.evaluation` (faster-coco-eval) vs pycocotools' `COCOeval`.

Synthetic data: `num_images` images of 640 x 480 with COCO's 80 classes, 0-12 ground-truth boxes each (small, medium
and large; ~2% crowd), and exactly 100 detections per image: jittered, sometimes mislabelled copies of the ground
truth plus random false positives, random scores. Both sides start from the same per-image torch tensors (what
`post_process_object_detection` and the collator produce) and do the whole job:

- ours: `CocoMeanAveragePrecision.update(...)` + `compute()`;
- reference: the same tensors to COCO dicts in plain Python, `pycocotools.coco.COCO` + `createIndex` + `loadRes`, then
  `COCOeval.evaluate()` + `accumulate()` + `summarize()`.

The 12 summary statistics must agree to 1e-4 (COCO's -1 for "no such ground truth" is nan on our side).
"""

from __future__ import annotations

import contextlib
import io
import math
import time

import numpy as np
import torch

from hf_sad.evaluation import _STAT_KEYS, CocoMeanAveragePrecision

NUM_CLASSES = 80
WIDTH, HEIGHT = 640, 480
DETECTIONS_PER_IMAGE = 100


def make_data(num_images: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(predictions, targets): per image torch tensors, boxes x1, y1, x2, y2 in absolute pixels."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 13))
        # Side lengths log-uniform over 8..400 px: a mix of small (< 32^2), medium and large boxes.
        wh = np.exp(rng.uniform(np.log(8), np.log(400), (n, 2)))
        wh = np.minimum(wh, [WIDTH - 1, HEIGHT - 1])
        xy = rng.uniform(0, 1, (n, 2)) * ([WIDTH, HEIGHT] - wh)
        gt = np.concatenate([xy, xy + wh], axis=1)
        gt_labels = rng.integers(0, NUM_CLASSES, n)
        crowd = (rng.random(n) < 0.02).astype(np.int64)
        targets.append({
            "boxes": torch.from_numpy(gt).float(),
            "labels": torch.from_numpy(gt_labels),
            "iscrowd": torch.from_numpy(crowd),
        })
        # True-positive-like detections: up to 3 jittered copies per object.
        copies = np.repeat(np.arange(n), rng.integers(1, 4, n)) if n else np.zeros(0, dtype=np.int64)
        copies = copies[:DETECTIONS_PER_IMAGE]
        boxes = gt[copies].copy()
        size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes += rng.normal(0, 0.1, boxes.shape) * size
        labels = gt_labels[copies].copy()
        flip = rng.random(len(labels)) < 0.1
        labels[flip] = rng.integers(0, NUM_CLASSES, int(flip.sum()))
        scores = rng.uniform(0.3, 1.0, len(boxes))
        # False positives fill the image up to 100 detections.
        k = DETECTIONS_PER_IMAGE - len(boxes)
        fwh = np.exp(rng.uniform(np.log(8), np.log(300), (k, 2)))
        fxy = rng.uniform(0, 1, (k, 2)) * np.maximum([WIDTH, HEIGHT] - fwh, 1)
        boxes = np.concatenate([boxes, np.concatenate([fxy, fxy + fwh], axis=1)])
        labels = np.concatenate([labels, rng.integers(0, NUM_CLASSES, k)])
        scores = np.concatenate([scores, rng.uniform(0.05, 0.6, k)])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, WIDTH)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, HEIGHT)
        order = np.argsort(-scores, kind="stable")
        predictions.append({
            "boxes": torch.from_numpy(boxes[order]).float(),
            "scores": torch.from_numpy(scores[order]).float(),
            "labels": torch.from_numpy(labels[order]),
        })
    return predictions, targets


def ours(predictions: list[dict], targets: list[dict]) -> dict[str, float]:
    metric = CocoMeanAveragePrecision({i: f"class_{i}" for i in range(NUM_CLASSES)})
    metric.update(predictions, targets)
    return metric.compute()


def reference(predictions: list[dict], targets: list[dict], timings: dict | None = None) -> dict[str, float]:
    """pycocotools from the same tensors; `timings` receives the evaluate+accumulate+summarize share."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for image_id, (prediction, target) in enumerate(zip(predictions, targets), start=1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        boxes = target["boxes"].double().tolist()
        for (x1, y1, x2, y2), label, crowd in zip(boxes, target["labels"].tolist(), target["iscrowd"].tolist()):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd,
            })
        boxes = prediction["boxes"].double().tolist()
        for (x1, y1, x2, y2), label, score in zip(
            boxes, prediction["labels"].tolist(), prediction["scores"].double().tolist()
        ):
            results.append({
                "image_id": image_id, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score,
            })
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": f"class_{k}"} for k in range(NUM_CLASSES)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        start = time.perf_counter()
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        if timings is not None:
            timings["eval_s"] = time.perf_counter() - start
    return {key: (math.nan if value < 0 else float(value)) for key, value in zip(_STAT_KEYS, evaluator.stats)}


def max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float:
    worst = 0.0
    for key in _STAT_KEYS:
        x, y = a[key], b[key]
        if math.isnan(x) or math.isnan(y):
            if not (math.isnan(x) and math.isnan(y)):
                return math.inf
            continue
        worst = max(worst, abs(x - y))
    return worst
