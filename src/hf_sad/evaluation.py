"""COCO box mAP through faster-coco-eval (a maintained, pycocotools-compatible C++ implementation).

The metric accumulates per-image predictions and ground truth in memory, exactly in the formats the image processor's
`post_process_object_detection` returns and the data collator's labels use (boxes x1, y1, x2, y2 in absolute pixels),
builds the COCO ground-truth / detection structures itself (no temporary files) and evaluates them with
`faster_coco_eval.COCOeval_faster`, which gives the same numbers as pycocotools' `COCOeval`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

# Names of COCOeval's 12 summary statistics (`COCOeval.stats`), in order.
_STAT_KEYS = (
    "map",  # AP @ IoU 0.50:0.95, all areas, 100 detections per image
    "map_50",
    "map_75",
    "map_small",  # area < 32^2
    "map_medium",  # 32^2 <= area < 96^2
    "map_large",  # area >= 96^2
    "mar_1",  # AR with 1 / 10 / 100 detections per image
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


#: COCO summary keys -> the names tables and model cards show them under.
METRIC_NAMES = {
    "map": "mAP",
    "map_50": "mAP@50",
    "map_75": "mAP@75",
    "map_small": "mAP (small)",
    "map_medium": "mAP (medium)",
    "map_large": "mAP (large)",
    "mar_100": "mAR@100",
}


def _numpy(x: Any, dtype: type, shape: tuple[int, ...] = (-1,)) -> np.ndarray:
    """A torch tensor (any device / dtype), numpy array or nested list as a numpy array of `dtype` and `shape`."""
    if hasattr(x, "detach"):  # torch.Tensor: bf16/fp16 cannot go to numpy directly
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(shape)


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) x1, y1, x2, y2 -> (n, 4) COCO x, y, w, h (same units)."""
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _silent(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing (faster-coco-eval reports every step through it)."""


class CocoMeanAveragePrecision:
    """COCO bounding-box mAP / mAR over a stream of images, evaluated by faster-coco-eval.

    Usage: call `update(predictions, targets)` once per batch (images get running internal ids, so one object can
    serve every batch of a Trainer's `compute_metrics`), then `compute()`; `reset()` starts over.

    Args:
        id2label: model label id (0-based, contiguous) -> class name; every class is evaluated, also those absent
            from the data. Internally COCO category id = label id + 1, because COCO ids start at 1.

    `compute()` returns floats in [0, 1] under `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`,
    `mar_1`, `mar_10`, `mar_100`, `mar_small`, `mar_medium`, `mar_large` (COCOeval's 12 summary statistics, same
    order) and `map_<class name>` (AP @ IoU 0.50:0.95, all areas, 100 detections, per class; see
    `class_metric_keys` for class names such as "small" that would collide with a summary key). Where COCO reports -1
    (no ground truth of that kind, e.g. no small objects or a class never present) the value is `float("nan")`.
    Area ranges use COCO's absolute pixel areas (small < 32^2 <= medium < 96^2 <= large), so they depend on the
    resolution the boxes are given in.
    """

    def __init__(self, id2label: Mapping[int, str]) -> None:
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.class_keys = class_metric_keys(self.id2label)
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        # Per image, as arrays: (xywh boxes (n, 4), labels (n,), areas (n,), iscrowd (n,)) and (xywh boxes (k, 4),
        # scores (k,), labels (k,)). COCO dicts are built only in `compute()`: the evaluators annotate them in place,
        # so they have to be fresh each time, and building them once is cheaper than copying them.
        self._ground_truth: list[tuple[np.ndarray, ...]] = []
        self._detections: list[tuple[np.ndarray, ...]] = []

    @property
    def num_images(self) -> int:
        return len(self._ground_truth)

    def update(self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch of images.

        Args:
            predictions: per image {"boxes": (k, 4) x1, y1, x2, y2 absolute pixels, "scores": (k,), "labels": (k,)
                model label ids} (the output of `post_process_object_detection`); k may be 0.
            targets: per image {"boxes": (n, 4) x1, y1, x2, y2 absolute pixels, "labels": (n,) model label ids,
                optional "iscrowd": (n,) 0/1, optional "area": (n,) pixels^2 (default box w * h)}; n may be 0.
                Tensors (any device), numpy arrays or lists.
        """
        if len(predictions) != len(targets):
            raise ValueError(f"Got {len(predictions)} predictions for {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            index = self.num_images
            ground_truth, detections = _ground_truth_arrays(index, target), _detection_arrays(index, prediction)
            self._ground_truth.append(ground_truth)
            self._detections.append(detections)

    def to_coco(self) -> tuple[dict, list[dict]]:
        """The accumulated data as new COCO structures (all boxes xywh, absolute pixels).

        Returns:
            `(ground_truth, detections)`: a COCO dataset dict ({"images", "annotations", "categories"}) and a
            results list of {"image_id", "category_id", "bbox", "score"} as `COCO.loadRes` takes it. Image ids are
            1-based in `update` order; category id = label id + 1.
        """
        annotations, detections = [], []
        for image_id, ((boxes, labels, areas, crowd), (det_boxes, scores, det_labels)) in enumerate(
            zip(self._ground_truth, self._detections), start=1
        ):
            for box, label, area, iscrowd in zip(boxes.tolist(), labels.tolist(), areas.tolist(), crowd.tolist()):
                # faster-coco-eval reserves annotation id 0 for "unmatched", so ids start at 1.
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": box, "area": area, "iscrowd": iscrowd})
            for box, score, label in zip(det_boxes.tolist(), scores.tolist(), det_labels.tolist()):
                detections.append({"image_id": image_id, "category_id": label + 1, "bbox": box, "score": score})
        ground_truth = {
            "images": [{"id": i} for i in range(1, self.num_images + 1)],
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in sorted(self.id2label.items())],
        }
        return ground_truth, detections

    def compute(self) -> dict[str, float]:
        """COCO metrics over every image added since the last `reset()` (see the class docstring for the keys)."""
        if not self._ground_truth:
            return self._nan_result()
        ground_truth, detections = self.to_coco()
        coco_gt = COCO(print_function=_silent)
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        evaluator = COCOeval_faster(coco_gt, _box_results(detections), iouType="bbox",
                                    print_function=_silent)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

        result = {key: _nan_if_missing(value) for key, value in zip(_STAT_KEYS, evaluator.stats)}
        # precision: (iou thresholds, recall thresholds, classes in sorted id order, area ranges, max dets)
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        for k, label in enumerate(sorted(self.id2label)):
            valid = precision[:, :, k][precision[:, :, k] > -1]
            result[self.class_keys[label]] = float(valid.mean()) if valid.size else math.nan
        return result

    def _nan_result(self) -> dict[str, float]:
        keys = list(_STAT_KEYS) + [self.class_keys[k] for k in sorted(self.id2label)]
        return dict.fromkeys(keys, math.nan)


def class_metric_keys(id2label: Mapping[int, str]) -> dict[int, str]:
    """Label id -> the key of its AP in the metrics: `map_<name>`, except for names whose key is a summary metric's
    (a class called "small", "50", "75", ...: `map_class_<name>`) or another class's (then `_<id>` is appended)."""
    keys: dict[int, str] = {}
    taken = set(_STAT_KEYS)
    for label in sorted(id2label, key=int):
        name = str(id2label[label])
        key = f"map_{name}" if f"map_{name}" not in taken else f"map_class_{name}"
        if key in taken:
            key = f"{key}_{label}"
        keys[int(label)] = key
        taken.add(key)
    return keys


def _nan_if_missing(value: float) -> float:
    """COCOeval's -1 ("no ground truth of this kind") -> nan; anything else -> float."""
    return math.nan if value < 0 else float(value)


def _ground_truth_arrays(index: int, target: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """(xywh boxes (n, 4), labels, areas, iscrowd) of one image's target; `index` names the image in errors."""
    boxes = _xyxy_to_xywh(_numpy(target["boxes"], np.float64, (-1, 4)))
    labels = _numpy(target["labels"], np.int64)
    n = len(labels)
    area = _numpy(target["area"], np.float64) if "area" in target else boxes[:, 2] * boxes[:, 3]
    iscrowd = _numpy(target["iscrowd"], np.int64) if "iscrowd" in target else np.zeros(n, dtype=np.int64)
    if not len(boxes) == len(area) == len(iscrowd) == n:
        raise ValueError(f"Target of image {index} has inconsistent numbers of boxes/labels/area/iscrowd")
    return boxes, labels, area, iscrowd


def _detection_arrays(index: int, prediction: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """(xywh boxes (k, 4), scores, labels) of one image's prediction; `index` names the image in errors."""
    boxes = _xyxy_to_xywh(_numpy(prediction["boxes"], np.float64, (-1, 4)))
    scores = _numpy(prediction["scores"], np.float64)
    labels = _numpy(prediction["labels"], np.int64)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"Prediction of image {index} has inconsistent numbers of boxes/scores/labels")
    return boxes, scores, labels


def _box_results(detections: list[dict]) -> COCO:
    """The detections as a COCO results object with what box evaluation reads of them (ids, boxes, areas, scores),
    where `coco_gt.loadRes(detections)` would also copy the images and attach a polygon "segmentation" to every box:
    at thousands of images a sizeable share of the evaluation time."""
    for index, detection in enumerate(detections, start=1):
        w, h = detection["bbox"][2:]
        detection.update(id=index, area=w * h)
    results = COCO(print_function=_silent)
    results.dataset = {"annotations": detections}
    results.createIndex()
    return results


def coco_map(
    predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]
) -> dict[str, float]:
    """One-shot `CocoMeanAveragePrecision`: same inputs as its `update`, same outputs as its `compute`."""
    metric = CocoMeanAveragePrecision(id2label)
    metric.update(predictions, targets)
    return metric.compute()


# ----------------------------------------------------------------------------------------------------------------------
# Trainer glue: detections and ground truth travel through `Trainer.evaluate` as padded tensors, which it pads across
# processes (with -100) and gathers like any logits; `DetectionMetrics` unpacks them.
# ----------------------------------------------------------------------------------------------------------------------


def pack_detections(detections: Sequence[Mapping[str, Any]]) -> Any:
    """Per-image `{"scores", "labels", "boxes"}` -> (B, K, 6) float tensor of rows (x1, y1, x2, y2, score, label).

    Boxes are xyxy absolute pixels; padding rows have label -1.
    """
    import torch

    size = max(1, max((len(d["scores"]) for d in detections), default=0))
    packed = torch.full((len(detections), size, 6), -1.0, device=detections[0]["boxes"].device)
    for i, d in enumerate(detections):
        n = len(d["scores"])
        packed[i, :n, :4] = d["boxes"].float()
        packed[i, :n, 4] = d["scores"].float()
        packed[i, :n, 5] = d["labels"].float()
    return packed


def pack_targets(labels: Sequence[Mapping[str, Any]]) -> Any:
    """Collator labels -> (B, M, 7) float tensor of rows (x1, y1, x2, y2, label, iscrowd, area) in original-image
    pixels.

    The labels' boxes are normalised cxcywh, scaled here by each image's `orig_size` (height, width); their `area`
    (resized pixels, the data's own where it gives one) is scaled back by the resize, and without `area` or `size` it
    is the box's area. Padding rows have label -1.
    """
    import torch
    from torchvision.ops import box_convert

    size = max(1, max((len(t["class_labels"]) for t in labels), default=0))
    packed = torch.full((len(labels), size, 7), -1.0, device=labels[0]["boxes"].device)
    for i, t in enumerate(labels):
        n = len(t["class_labels"])
        height, width = t["orig_size"].tolist()
        scale = t["boxes"].new_tensor([width, height, width, height])
        boxes = box_convert(t["boxes"].float() * scale, "cxcywh", "xyxy")
        packed[i, :n, :4] = boxes
        packed[i, :n, 4] = t["class_labels"].float()
        packed[i, :n, 5] = t["iscrowd"].float() if "iscrowd" in t else 0.0
        if "area" in t and "size" in t:
            resized_height, resized_width = t["size"].tolist()
            packed[i, :n, 6] = t["area"].float() * (height * width / (resized_height * resized_width))
        else:
            packed[i, :n, 6] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return packed


class DetectionMetrics:
    """`compute_metrics` for `Trainer`: COCO mAP from the packed tensors of `pack_detections` / `pack_targets`.

    Accepts an `EvalPrediction` whose `predictions` and `label_ids` are lists of per-batch arrays
    (`eval_do_concat_batches=False`) or single arrays.
    """

    def __init__(self, id2label: Mapping[int, str]):
        self.id2label = {int(k): v for k, v in id2label.items()}

    def __call__(self, eval_prediction: Any) -> dict[str, float]:
        metric = CocoMeanAveragePrecision(self.id2label)
        predictions, label_ids = eval_prediction.predictions, eval_prediction.label_ids
        if not isinstance(predictions, (list, tuple)):
            predictions, label_ids = [predictions], [label_ids]
        for batch_pred, batch_gt in zip(predictions, label_ids):
            batch_pred, batch_gt = np.asarray(batch_pred), np.asarray(batch_gt)
            for pred, gt in zip(batch_pred, batch_gt):
                pred, gt = pred[pred[:, 5] >= 0], gt[gt[:, 4] >= 0]
                metric.update(
                    [{"boxes": pred[:, :4], "scores": pred[:, 4], "labels": pred[:, 5].astype(np.int64)}],
                    [{"boxes": gt[:, :4], "labels": gt[:, 4].astype(np.int64), "iscrowd": gt[:, 5].astype(np.int64),
                      "area": gt[:, 6]}],
                )
        return metric.compute()
