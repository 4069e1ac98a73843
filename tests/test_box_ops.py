"""Anchors, box coding, matching and detection selection: the small pieces under the detector
(`hf_sad.model.box_ops`), each against an independent reference."""

import math

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from hf_sad.model.box_ops import (
    decode_boxes,
    encode_boxes,
    ignore_crowd_regions,
    make_anchors,
    make_cell_anchors,
    match_anchors,
    pad_boxes,
    select_detections,
)

from .utils import under_meta_default_device


def random_boxes(n: int, size: float = 200.0, generator=None) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.4 + 2
    return torch.cat([xy, xy + wh], dim=1)


def test_cell_anchors_sizes_and_ratios():
    cell = make_cell_anchors(32.0, [1.0, 2 ** (1 / 3), 2 ** (2 / 3)], [0.5, 1.0, 2.0])
    assert cell.shape == (9, 4)
    w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    # Area is (base * scale)^2 whatever the aspect ratio; h / w is the ratio; all centred on 0.
    expected_area = torch.tensor([(32.0 * s) ** 2 for s in [1.0, 2 ** (1 / 3), 2 ** (2 / 3)] for _ in range(3)])
    torch.testing.assert_close(w * h, expected_area, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0] * 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cell[:, :2] + cell[:, 2:], torch.zeros(9, 2))


def test_anchor_grid_order_and_centres():
    cell = make_cell_anchors(16.0, [1.0], [0.5, 1.0])
    anchors = make_anchors([(2, 3), (1, 2)], [8, 16], [cell, cell * 2])
    assert anchors.shape == ((2 * 3 + 1 * 2) * 2, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # Level 0, row 0, column 1, anchor 1 -> index (0 * 3 + 1) * 2 + 1 = 3; centre at ((1 + .5) * 8, .5 * 8).
    torch.testing.assert_close(centres[3], torch.tensor([12.0, 4.0]))
    # First anchor of level 1 (after 12 of level 0), row 0, column 0 of stride 16.
    torch.testing.assert_close(centres[12], torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(anchors[13] - anchors[12].new_tensor([8, 8, 8, 8]), cell[1] * 2)


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors, boxes = random_boxes(50, generator=g), random_boxes(50, generator=g)
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, rtol=1e-5, atol=1e-3)
    # Identity: a box equal to its anchor encodes to zero.
    torch.testing.assert_close(encode_boxes(anchors, anchors), torch.zeros(50, 4))


def test_encode_and_decode_known_values():
    """Worked by hand: anchor (0, 0, 10, 20) has centre (5, 10) and size 10 x 20; box (5, 5, 25, 45) has centre
    (15, 25) and size 20 x 40: deltas ((15 - 5) / 10, (25 - 10) / 20, log 2, log 2)."""
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 5.0, 25.0, 45.0]])
    expected = torch.tensor([[1.0, 0.75, math.log(2), math.log(2)]])
    torch.testing.assert_close(encode_boxes(box, anchor), expected)
    torch.testing.assert_close(decode_boxes(expected, anchor), box)
    # A wide box on a tall anchor: x and y, widths and heights are not interchangeable.
    wide = torch.tensor([[-5.0, 5.0, 15.0, 15.0]])  # centre (5, 10), 20 x 10
    torch.testing.assert_close(encode_boxes(wide, anchor), torch.tensor([[0.0, 0.0, math.log(2), math.log(0.5)]]))


def test_decode_clamps_huge_deltas():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = decode_boxes(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), anchors)
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 2] - boxes[:, 0]).item() == pytest.approx(10 * 1000 / 16, rel=1e-4)


def reference_match(anchors, boxes, fg, bg, low_quality):
    """Per-image loop in the style of torchvision's Matcher, written independently."""
    labels, idx = [], []
    for b in boxes:
        if b.shape[0] == 0:
            labels.append(torch.zeros(anchors.shape[0], dtype=torch.long))
            idx.append(torch.zeros(anchors.shape[0], dtype=torch.long))
            continue
        iou = box_iou(b, anchors)
        best, arg = iou.max(dim=0)
        lab = torch.full_like(arg, -1)
        lab[best < bg] = 0
        lab[best >= fg] = 1
        if low_quality:
            for j in range(b.shape[0]):
                top = iou[j].max()
                if top > 0:
                    lab[iou[j] == top] = 1
        labels.append(lab)
        idx.append(torch.where(lab == 1, arg, torch.zeros_like(arg)))
    return torch.stack(labels), torch.stack(idx)


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_anchors_agrees_with_per_image_reference(low_quality):
    g = torch.Generator().manual_seed(1)
    anchors = random_boxes(400, generator=g)
    boxes = [random_boxes(n, generator=g) for n in (3, 0, 7, 1)]
    result = match_anchors(anchors, boxes, 0.5, 0.4, low_quality)
    ref_labels, ref_idx = reference_match(anchors, boxes, 0.5, 0.4, low_quality)
    assert torch.equal(result.labels, ref_labels)
    assert torch.equal(result.matched_idx, ref_idx)
    assert {-1, 0, 1} >= set(result.labels.unique().tolist())


def test_match_anchors_no_boxes_anywhere():
    anchors = random_boxes(10)
    result = match_anchors(anchors, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert result.labels.shape == (2, 10) and (result.labels == 0).all()


def test_low_quality_match_rescues_small_box():
    anchors = torch.tensor([[0.0, 0.0, 100.0, 100.0], [200.0, 200.0, 300.0, 300.0]])
    tiny = torch.tensor([[10.0, 10.0, 20.0, 20.0]])  # IoU 0.01 with anchor 0: below both thresholds
    assert match_anchors(anchors, [tiny], allow_low_quality_matches=False).labels.tolist() == [[0, 0]]
    assert match_anchors(anchors, [tiny], allow_low_quality_matches=True).labels.tolist() == [[1, 0]]
    assert math.isclose(box_iou(tiny, anchors)[0, 0].item(), 0.01, rel_tol=1e-5)


def test_low_quality_matches_below_a_minimum_iou_stay_background():
    """Detectron's rule: a box's best anchor becomes positive only with IoU >= the minimum (its bg threshold)."""
    anchors = torch.tensor([[0.0, 0.0, 100.0, 100.0], [200.0, 200.0, 300.0, 300.0]])
    tiny = torch.tensor([[10.0, 10.0, 20.0, 20.0]])  # IoU 0.01 with anchor 0
    near = torch.tensor([[0.0, 0.0, 70.0, 64.0]])  # IoU 0.448 with anchor 0: in the ignore band
    assert match_anchors(anchors, [tiny], low_quality_min_iou=0.4).labels.tolist() == [[0, 0]]
    assert match_anchors(anchors, [tiny], low_quality_min_iou=0.0).labels.tolist() == [[1, 0]]
    assert match_anchors(anchors, [near], low_quality_min_iou=0.4).labels.tolist() == [[1, 0]]
    assert match_anchors(anchors, [near], allow_low_quality_matches=False).labels.tolist() == [[-1, 0]]


def _reference_select(scores, boxes, score_threshold, nms_iou_threshold, pre_nms_top_k, max_detections):
    results = []
    for image_scores, image_boxes in zip(scores, boxes):
        num_classes = image_scores.shape[1]
        top, index = image_scores.flatten().topk(min(pre_nms_top_k or image_scores.numel(), image_scores.numel()))
        keep = top > score_threshold
        top, index = top[keep], index[keep]
        labels, candidate_boxes = index % num_classes, image_boxes[index // num_classes]
        kept = batched_nms(candidate_boxes, top, labels, nms_iou_threshold)[:max_detections]
        results.append({"scores": top[kept], "labels": labels[kept], "boxes": candidate_boxes[kept]})
    return results


@pytest.mark.parametrize(
    "seed,pre_nms_top_k,max_detections",
    [(0, 100, 15), (1, 100, 15), (2, 100, 15), (0, 25, 15), (1, 7, 15), (0, None, 2), (3, 200, 40), (1, 100, None)],
)
def test_select_detections_matches_per_image_reference(seed, pre_nms_top_k, max_detections):
    # pre_nms_top_k below the 60 anchors takes the path that first keeps the k anchors with the best class score.
    # NMS runs on chunks of 2 x max_detections candidates, doubling, until each image has its detections: small
    # max_detections take several rounds, with the images finishing in different rounds.
    generator = torch.Generator().manual_seed(seed)
    batch_size, num_anchors, num_classes = 3, 60, 4
    scores = torch.rand(batch_size, num_anchors, num_classes, generator=generator)
    scores[1] *= 0.3  # an image with few candidates above the threshold
    top_left = torch.rand(batch_size, num_anchors, 2, generator=generator) * 80
    sizes = torch.rand(batch_size, num_anchors, 2, generator=generator) * 40 + 1
    boxes = torch.cat([top_left, top_left + sizes], dim=-1)
    settings = {"score_threshold": 0.2, "nms_iou_threshold": 0.4, "pre_nms_top_k": pre_nms_top_k,
                "max_detections": max_detections}

    results = select_detections(scores, boxes, **settings)
    expected = _reference_select(scores, boxes, **settings)
    assert len(results) == batch_size
    for result, reference in zip(results, expected):
        assert result.keys() == reference.keys()
        for key in reference:
            assert torch.equal(result[key], reference[key]), key
        assert result["labels"].dtype == torch.int64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_select_detections_on_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 200, 5, generator=generator)
    top_left = torch.rand(4, 200, 2, generator=generator) * 300 - 20  # some negative coordinates
    boxes = torch.cat([top_left, top_left + torch.rand(4, 200, 2, generator=generator) * 60 + 1], dim=-1)
    on_cpu = select_detections(scores, boxes, score_threshold=0.3)
    on_cuda = select_detections(scores.cuda(), boxes.cuda(), score_threshold=0.3)
    for cpu_result, cuda_result in zip(on_cpu, on_cuda):
        for key in cpu_result:
            torch.testing.assert_close(cuda_result[key].cpu(), cpu_result[key])


def test_select_detections_empty_and_shape_errors():
    results = select_detections(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), score_threshold=0.5)
    assert [r["boxes"].shape for r in results] == [(0, 4), (0, 4)]
    with pytest.raises(ValueError, match="num_anchors"):
        select_detections(torch.zeros(2, 5, 3), torch.zeros(2, 4, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Defaults, boundaries and device placement
# ----------------------------------------------------------------------------------------------------------------------


def test_every_tensor_the_box_operations_make_is_on_their_inputs_device():
    """Run with the default device set to "meta": a tensor made without naming its device would land there, so CPU
    inputs must give exactly the CPU results (what running on a GPU needs, checked without one). Detection
    selection calls torchvision's NMS, which makes tensors of its own: test_select_detections_on_cuda_matches_cpu
    checks it where a GPU is."""
    cells = [make_cell_anchors(16.0, [1.0, 1.26], [0.5, 1.0]), make_cell_anchors(32.0, [1.0, 1.26], [0.5, 1.0])]
    shapes, strides = [(4, 6), (2, 3)], [8, 16]
    anchors = make_anchors(shapes, strides, cells, torch.device("cpu"))
    boxes = [torch.tensor([[10.0, 10.0, 40.0, 30.0], [20.0, 4.0, 44.0, 28.0]]), torch.zeros(0, 4)]
    crowd = [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 30.0, 20.0]])]
    labels = torch.zeros(2, len(anchors), dtype=torch.long)
    classes, no_boxes = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 4)] * 2
    calls = {
        "make_anchors": lambda: make_anchors(shapes, strides, cells, torch.device("cpu")),
        "match_anchors": lambda: tuple(match_anchors(anchors, boxes)),
        "match_no_boxes": lambda: tuple(match_anchors(anchors, no_boxes)),
        "ignore_crowd": lambda: ignore_crowd_regions(labels, anchors, crowd, 0.7),
        "pad_boxes": lambda: pad_boxes(boxes, classes),
    }
    for name, call in calls.items():
        expected = call()
        with under_meta_default_device():
            got = call()
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            assert a.device.type == "cpu" and torch.equal(a, b), name


def test_matching_thresholds_defaults_and_boundaries():
    """fg 0.5 and bg 0.4 by default; IoU exactly 0.5 is positive, exactly 0.4 ignored (not background); an anchor no box
    touches is never a low-quality match, even for a box that touches no anchor at all."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 25.0], [0.0, 0.0, 10.0, 20.0],
                            [100.0, 100.0, 110.0, 110.0]])
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # IoU 1, 0.4 and 0.5 with the first three anchors, 0 with the last
    iou = box_iou(box, anchors)[0]
    assert iou[:3].tolist() == [1.0, pytest.approx(0.4), 0.5]
    assert match_anchors(anchors, [box], allow_low_quality_matches=False).labels.tolist() == [[1, -1, 1, 0]]
    nowhere = torch.tensor([[500.0, 500.0, 510.0, 510.0]])  # IoU 0 with every anchor
    assert match_anchors(anchors, [nowhere]).labels.tolist() == [[0, 0, 0, 0]]
    # A box's best anchor counts from exactly the minimum IoU on.
    assert match_anchors(anchors[1:2], [box], low_quality_min_iou=float(iou[1])).labels.tolist() == [[1]]


def test_crowd_regions_ignore_what_lies_inside_them_image_by_image():
    """An anchor at least `ioa_threshold` inside a crowd box (by its own area: IoA) is ignored unless it is a positive;
    images are handled each with its own crowd boxes, an image without any included."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 12.0, 10.0, 22.0],
                            [30.0, 30.0, 40.0, 40.0]])
    crowd = torch.tensor([[0.0, 0.0, 12.0, 30.0]])  # a tall region: IoA 1, 0.7 and 1 for the first three anchors
    labels = torch.tensor([[0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]])
    result = ignore_crowd_regions(labels, anchors, [torch.zeros(0, 4), crowd, crowd.double()], ioa_threshold=0.7)
    assert result.tolist() == [[0, 0, 1, 0], [-1, -1, 1, 0], [-1, -1, 1, 0]]
    assert labels.tolist() == [[0, 0, 1, 0]] * 3  # a new tensor
    assert ignore_crowd_regions(labels[1:2], anchors, [crowd], 0.71).tolist() == [[-1, 0, 1, 0]]


def test_pad_boxes_pads_to_the_most_boxes_and_at_least_one():
    boxes, classes = pad_boxes([torch.ones(2, 4), torch.zeros(0, 4)], [torch.tensor([3, 4]), torch.zeros(0).long()])
    assert boxes.shape == (2, 2, 4) and classes.tolist() == [[3, 4], [0, 0]]
    assert pad_boxes([torch.zeros(0, 4)], [torch.zeros(0).long()])[0].shape == (1, 1, 4)


def test_encode_and_decode_work_on_single_boxes_too():
    anchor, box = torch.tensor([0.0, 0.0, 10.0, 20.0]), torch.tensor([5.0, 5.0, 25.0, 45.0])
    torch.testing.assert_close(encode_boxes(box, anchor), torch.tensor([1.0, 0.75, math.log(2), math.log(2)]))
    torch.testing.assert_close(decode_boxes(encode_boxes(box, anchor), anchor), box)


def test_select_detections_defaults_and_threshold_is_strict():
    """Defaults: score > 0.05, 1000 candidates into NMS, NMS at IoU 0.5, 100 detections; a score equal to the threshold
    is not kept."""
    side = 34  # 1156 disjoint boxes, one class, every score above 0.05: NMS removes none
    grid = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    corners = torch.stack(grid, -1).reshape(-1, 2) * 10.0
    boxes = torch.cat([corners, corners + 8], -1)[None]
    scores = torch.linspace(0.06, 0.99, len(corners))[None, :, None]
    assert len(select_detections(scores, boxes)[0]["scores"]) == 100
    assert len(select_detections(scores, boxes, max_detections=None)[0]["scores"]) == 1000
    overlapping = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 30.0]]])
    three = torch.tensor([[[0.9], [0.8], [0.04]]])  # IoU 0.83 with the first: suppressed; 0.04: below 0.05
    assert select_detections(three, overlapping)[0]["scores"].tolist() == [pytest.approx(0.9)]
    at = torch.tensor([[[0.5], [0.7]]])
    far = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    assert select_detections(at, far, score_threshold=0.5)[0]["scores"].tolist() == [pytest.approx(0.7)]


def test_class_wise_nms_keeps_classes_apart_also_at_negative_coordinates():
    """torchvision's batched NMS offsets each group by its index times the largest coordinate plus one: at negative
    coordinates that offset would put the groups on top of each other, so boxes are first shifted to >= 0."""
    box = torch.tensor([[-30.0, -30.0, -10.0, -10.0]])
    scores = torch.tensor([[[0.9, 0.8]]])
    result = select_detections(scores, box[None], score_threshold=0.1)[0]
    assert sorted(result["labels"].tolist()) == [0, 1]
    torch.testing.assert_close(result["boxes"], box.expand(2, 4))
