"""Tests of the COCO mAP metric: agreement with pycocotools on real ground truth, edge cases, batching."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from hf_sad.evaluation import CocoMeanAveragePrecision, coco_map

from .utils import BCCD

BCCD_VAL = BCCD / "val.json"
STAT_KEYS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
STAT_KEYS += ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def _bccd_targets() -> tuple[list[dict], dict[int, str]]:
    """BCCD val ground truth as per-image targets: boxes xyxy absolute pixels, 0-based labels, given area/iscrowd."""
    assert BCCD_VAL.is_file(), f"{BCCD_VAL} is missing: the shared BCCD dataset must sit at ../shared"
    coco = json.loads(BCCD_VAL.read_text())
    id2label = {c["id"] - 1: c["name"] for c in coco["categories"]}
    per_image = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    targets = []
    for anns in per_image.values():
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        targets.append(
            {
                "boxes": torch.from_numpy(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)),
                "labels": torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.long),
                "area": torch.tensor([a["area"] for a in anns], dtype=torch.float64),
                "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.long),
            }
        )
    return targets, id2label


def _noisy_predictions(targets: list[dict], num_classes: int, seed: int = 0) -> list[dict]:
    """Jittered / missed / mislabelled copies of the ground truth plus random false positives, random scores."""
    rng = np.random.default_rng(seed)
    predictions = []
    for index, target in enumerate(targets):
        gt = target["boxes"].numpy()
        keep = rng.random(len(gt)) < 0.85
        boxes = gt[keep].copy()
        size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
        boxes += rng.normal(0, 0.08, boxes.shape) * size
        labels = target["labels"].numpy()[keep].copy()
        flip = rng.random(len(labels)) < 0.05
        labels[flip] = rng.integers(0, num_classes, int(flip.sum()))
        num_fp = int(rng.integers(0, 6))
        xy = rng.uniform(0, 560, (num_fp, 2))
        fp = np.concatenate([xy, xy + rng.uniform(5, 150, (num_fp, 2))], axis=1)
        boxes = np.concatenate([boxes, fp])
        labels = np.concatenate([labels, rng.integers(0, num_classes, num_fp)])
        if index % 10 == 3:  # some images without any detection
            boxes, labels = boxes[:0], labels[:0]
        predictions.append(
            {
                "boxes": torch.from_numpy(boxes).float(),
                "scores": torch.from_numpy(rng.random(len(boxes))).float(),
                "labels": torch.from_numpy(labels),
            }
        )
    return predictions


def _pycocotools_eval(ground_truth: dict, detections: list[dict]):
    """Reference: pycocotools' COCOeval on the same in-memory structures (its prints swallowed)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _assert_same(a: dict, b: dict, tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert (math.isnan(value) and math.isnan(b[key])) or abs(value - b[key]) <= tol, key


@pytest.fixture(scope="module")
def bccd():
    targets, id2label = _bccd_targets()
    # Two extra images without ground truth but with detections: pure false positives.
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    targets = targets + [empty, empty]
    return targets, _noisy_predictions(targets, len(id2label)), id2label


def _reference_coco_files(targets: list[dict], predictions: list[dict]) -> tuple[dict, list[dict]]:
    """BCCD's val.json as it is on disk (its own image and category ids, areas and crowd flags), plus the two extra
    images of the fixture, and the predictions as a COCO results list: built from the file and the test's own arrays,
    not by the metric's conversion."""
    coco = json.loads(BCCD_VAL.read_text())
    image_ids = [image["id"] for image in coco["images"]]
    extra = [max(image_ids) + 1, max(image_ids) + 2]
    coco["images"] += [{"id": image_id, "file_name": f"extra{image_id}.jpg", "width": 640, "height": 480}
                       for image_id in extra]
    results = []
    for image_id, prediction in zip(image_ids + extra, predictions):
        for (x1, y1, x2, y2), score, label in zip(prediction["boxes"].tolist(), prediction["scores"].tolist(),
                                                  prediction["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    assert len(targets) == len(coco["images"])
    return coco, results


def test_matches_pycocotools(bccd):
    targets, predictions, id2label = bccd
    metric = CocoMeanAveragePrecision(id2label)
    metric.update(predictions, targets)
    result = metric.compute()

    reference = _pycocotools_eval(*_reference_coco_files(targets, predictions))
    for key, expected in zip(STAT_KEYS, reference.stats):
        expected = math.nan if expected < 0 else expected
        assert (math.isnan(result[key]) and math.isnan(expected)) or result[key] == pytest.approx(expected, abs=1e-6)
    precision = reference.eval["precision"][:, :, :, 0, -1]
    for k, name in sorted(id2label.items()):
        per_class = precision[:, :, k]
        assert result[f"map_{name}"] == pytest.approx(per_class[per_class > -1].mean(), abs=1e-6)
    # The noise leaves a mediocre but non-trivial detector.
    assert 0.05 < result["map"] < 0.9 and result["map_50"] > result["map_75"]


def test_area_without_an_annotated_one_is_the_box_width_times_height():
    """COCO sorts objects into small (< 32^2 px), medium and large by area; without an annotated area it is the box's
    w x h. A 20 x 60 box (1200 px) is medium, 60 x 20 too."""
    for w, h in ((20.0, 60.0), (60.0, 20.0)):
        target = {"boxes": torch.tensor([[10.0, 10.0, 10.0 + w, 10.0 + h]]), "labels": torch.tensor([0])}
        found = {**target, "scores": torch.tensor([0.9])}
        result = coco_map([found], [target], {0: "cell"})
        assert result["map_medium"] == 1.0 and math.isnan(result["map_small"]), (w, h)
        # An annotated area wins over the box's: 900 px makes the same box small.
        result = coco_map([found], [{**target, "area": torch.tensor([900.0])}], {0: "cell"})
        assert result["map_small"] == 1.0 and math.isnan(result["map_medium"]), (w, h)


def test_batched_updates_equal_single_update(bccd):
    targets, predictions, id2label = bccd
    batched = CocoMeanAveragePrecision(id2label)
    for start in range(0, len(targets), 8):
        batched.update(predictions[start : start + 8], targets[start : start + 8])
    assert batched.num_images == len(targets)
    _assert_same(batched.compute(), coco_map(predictions, targets, id2label))


def test_compute_is_repeatable_and_reset(bccd):
    targets, predictions, id2label = bccd
    metric = CocoMeanAveragePrecision(id2label)
    metric.update(predictions[:10], targets[:10])
    first = metric.compute()
    _assert_same(first, metric.compute())  # evaluation must not alter the stored data
    metric.reset()
    assert metric.num_images == 0
    metric.update(predictions[:10], targets[:10])
    _assert_same(first, metric.compute())


def test_perfect_detections(bccd):
    targets, _, id2label = bccd
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets]
    result = coco_map(perfect, targets, id2label)
    assert result["map"] == 1.0 and result["map_50"] == 1.0 and result["mar_100"] == 1.0
    assert all(result[f"map_{name}"] == 1.0 for name in id2label.values())


def test_no_detections(bccd):
    targets, _, id2label = bccd
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * len(
        targets
    )
    result = coco_map(none, targets, id2label)
    assert result["map"] == 0.0 and result["mar_100"] == 0.0
    assert all(result[f"map_{name}"] == 0.0 for name in id2label.values())


def test_keys_nan_and_numpy_inputs():
    id2label = {0: "cat", 1: "dog", 2: "bird"}
    targets = [{"boxes": np.array([[10.0, 10.0, 50.0, 40.0]]), "labels": np.array([1])}]
    predictions = [{"boxes": np.array([[10.0, 10.0, 50.0, 40.0]]), "scores": np.array([0.7]), "labels": np.array([1])}]
    result = coco_map(predictions, targets, id2label)
    assert set(result) == set(STAT_KEYS) | {"map_cat", "map_dog", "map_bird"}
    assert result["map"] == 1.0 and result["map_dog"] == 1.0
    # No ground truth of a class or area range: nan, not COCO's -1.
    assert math.isnan(result["map_cat"]) and math.isnan(result["map_large"])
    assert all(math.isnan(v) for v in CocoMeanAveragePrecision(id2label).compute().values())


def test_prediction_target_length_mismatch():
    with pytest.raises(ValueError):
        CocoMeanAveragePrecision({0: "a"}).update([], [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}])


def test_evaluation_is_quiet(bccd, capsys):
    targets, predictions, id2label = bccd
    coco_map(predictions[:5], targets[:5], id2label)
    assert capsys.readouterr().out == ""


def test_crowd_ground_truth_is_what_pycocotools_makes_of_it():
    """A detector that finds the only real object of an image, which also holds a crowd region, scores AP 1: a
    detection on the crowd region is neither a hit nor a miss (pycocotools' iscrowd rule)."""
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 120.0, 120.0]]),
              "labels": torch.tensor([0, 0]), "iscrowd": torch.tensor([0, 1])}
    found = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0], [70.0, 70.0, 100.0, 100.0]]),
             "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}
    result = coco_map([found], [target], {0: "cell"})
    assert result["map_50"] == pytest.approx(1.0) and result["map"] == pytest.approx(1.0)
    as_objects = coco_map([found], [{k: v for k, v in target.items() if k != "iscrowd"}], {0: "cell"})
    assert as_objects["map"] < 0.9  # the flag dropped: the crowd region becomes a box to find


def test_class_names_that_are_metric_keys_get_their_own_keys():
    id2label = {0: "small", 1: "50", 2: "cell", 3: "class_small"}
    target = {"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0]]), "labels": torch.tensor([2])}
    found = {**target, "scores": torch.tensor([0.9])}
    result = coco_map([found], [target], id2label)
    # The summary keys keep their meaning: the 50 x 50 px box is a medium object, there are no small ones.
    assert result["map_medium"] == pytest.approx(1.0) and math.isnan(result["map_small"])
    assert {"map_class_small", "map_class_50", "map_cell", "map_class_class_small"} <= set(result)
    assert result["map_cell"] == pytest.approx(1.0)
    assert math.isnan(result["map_class_small"]) and math.isnan(result["map_class_50"])  # absent from the data


def test_packed_targets_and_detections_for_the_trainer():
    """`pack_targets` gives original-image pixels, the crowd flag and the annotated area scaled back from the resized
    image (or the box's area without one); `pack_detections` pads with label -1; `DetectionMetrics` reads both, as
    lists of batches or single arrays."""
    from hf_sad.evaluation import DetectionMetrics, pack_detections, pack_targets

    labels = [
        {"class_labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.1, 0.1]]),
         "orig_size": torch.tensor([40, 80]), "size": torch.tensor([20, 40]), "area": torch.tensor([30.0, 4.0]),
         "iscrowd": torch.tensor([0, 1])},
        {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
         "orig_size": torch.tensor([10, 20])},
    ]
    packed = pack_targets(labels)
    assert packed.shape == (2, 2, 7)
    torch.testing.assert_close(packed[0], torch.tensor([[20.0, 15.0, 60.0, 25.0, 1.0, 0.0, 120.0],
                                                        [16.0, 8.0, 24.0, 12.0, 0.0, 1.0, 16.0]]))
    torch.testing.assert_close(packed[1, 0], torch.tensor([5.0, 2.5, 15.0, 7.5, 2.0, 0.0, 50.0]))
    assert packed[1, 1].tolist() == [-1.0] * 7  # padding
    detections = [{"scores": torch.tensor([0.9]), "labels": torch.tensor([1]),
                   "boxes": torch.tensor([[20.0, 15.0, 60.0, 25.0]])},
                  {"scores": torch.zeros(0), "labels": torch.zeros(0).long(), "boxes": torch.zeros(0, 4)}]
    packed_detections = pack_detections(detections)
    assert packed_detections.shape == (2, 1, 6) and packed_detections[1, 0].tolist() == [-1.0] * 6
    assert packed_detections[0, 0].tolist() == pytest.approx([20.0, 15.0, 60.0, 25.0, 0.9, 1.0])
    metrics = DetectionMetrics({0: "a", 1: "b", 2: "c"})
    as_lists = metrics(type("P", (), {"predictions": [packed_detections.numpy()], "label_ids": [packed.numpy()]}))
    as_array = metrics(type("P", (), {"predictions": packed_detections.numpy(), "label_ids": packed.numpy()}))
    assert as_lists == as_array and as_lists["map_b"] == 1.0 and as_lists["map_c"] == 0.0
    assert math.isnan(as_lists["map_a"])  # its only box is a crowd region


def test_coco_structures_and_metric_keys():
    metric = CocoMeanAveragePrecision({0: "cell", 1: "debris"})
    box = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 9.0, 9.0]]), "labels": torch.tensor([1, 0])}
    metric.update([{**box, "scores": torch.tensor([0.5, 0.6], dtype=torch.bfloat16)}], [box])
    metric.update([{**box, "scores": torch.ones(2)}], [{**box, "iscrowd": [0, 1], "area": [10.0, 20.0]}])
    ground_truth, detections = metric.to_coco()
    assert ground_truth["images"] == [{"id": 1}, {"id": 2}]
    assert ground_truth["categories"] == [{"id": 1, "name": "cell"}, {"id": 2, "name": "debris"}]
    assert [a["id"] for a in ground_truth["annotations"]] == [1, 2, 3, 4]
    assert ground_truth["annotations"][3] == {"id": 4, "image_id": 2, "category_id": 1, "bbox": [5.0, 5.0, 4.0, 4.0],
                                              "area": 20.0, "iscrowd": 1}
    assert detections[0] == {"image_id": 1, "category_id": 2, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 0.5}
    with pytest.raises(ValueError, match="Target of image 2 has inconsistent"):
        metric.update([box | {"scores": torch.ones(2)}], [{**box, "iscrowd": [0]}])
    with pytest.raises(ValueError, match="Prediction of image 2 has inconsistent"):
        metric.update([{**box, "scores": torch.ones(1)}], [box])
    from hf_sad.evaluation import class_metric_keys

    # by id in numeric order: the first "x" gets map_x, the second map_class_x, a third also its id
    assert class_metric_keys({"10": "x", "2": "x", "3": "x", "4": "map"}) == {
        2: "map_x", 3: "map_class_x", 4: "map_map", 10: "map_class_x_10"}


def test_a_class_absent_from_the_data_is_nan_without_a_numpy_warning():
    import warnings

    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([0])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = coco_map([{**target, "scores": torch.ones(1)}], [target], {0: "a", 1: "b"})
    assert result["map_a"] == 1.0 and math.isnan(result["map_b"])


def test_packing_makes_its_tensors_on_its_inputs_device():
    from hf_sad.evaluation import pack_detections, pack_targets

    from .utils import under_meta_default_device

    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
               "orig_size": torch.tensor([40, 80]), "iscrowd": torch.tensor([0])}]
    detections = [{"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": torch.tensor([[1.0, 2, 3, 4]])}]
    calls = {"targets": lambda: pack_targets(labels), "detections": lambda: pack_detections(detections)}
    for name, call in calls.items():
        expected = call()
        with under_meta_default_device():
            got = call()
        assert got.device.type == "cpu" and torch.equal(got, expected), name
