"""The detector's supervised loss (`hf_sad.model.detection_loss`): sigmoid focal loss and box regression loss against an
independent computation, the GIoU box loss, images without boxes, and clear errors for bad labels."""

import pytest
import torch
from torchvision.ops import box_convert, sigmoid_focal_loss

from hf_sad.model.detection_loss import assign_anchors, box_loss, detection_loss, sigmoid_focal_loss_sum

from .utils import LABELS, make_labels, reference_detection_loss, tiny_detector, under_meta_default_device


@pytest.mark.parametrize("box_loss_weight", [1.0, 0.3])
def test_focal_and_box_loss_match_independent_computation(tiny_model, box_loss_weight):
    """`detection_loss` against RetinaNet's loss written out from its definition (tests/utils.py, its own matching
    and box coding), on random logits and deltas: with the prior-initialised head the ignored anchors' share would
    be too small to notice, here it is not."""
    model, _ = tiny_model
    labels = make_labels([(0, 0.5, 0.5, 0.4, 0.3), (2, 0.2, 0.25, 0.15, 0.2)], [(1, 0.7, 0.6, 0.3, 0.5)])
    out = model(torch.randn(2, 3, 128, 128))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(out.logits.shape, generator=generator) * 2
    deltas = torch.randn(out.box_regression.shape, generator=generator) * 0.5
    config = model.config
    config.box_loss_weight = box_loss_weight
    loss = detection_loss(logits, deltas, out.anchors, labels, out.image_sizes, config)

    boxes = [box_convert(t["boxes"] * 128, "cxcywh", "xyxy") for t in labels]
    focal, box, positives = reference_detection_loss(logits, deltas, out.anchors, boxes,
                                                     [t["class_labels"] for t in labels])
    assert positives > 0 and loss.loss_dict["num_positives"] == positives
    # float32 sums over ~2e4 entries against float64: relative error ~1e-6
    torch.testing.assert_close(loss.loss_dict["loss_cls"].double(), torch.tensor(focal).double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.loss_dict["loss_box"].double(), torch.tensor(box).double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.loss.double(), torch.tensor(focal + box_loss_weight * box).double(), rtol=1e-5,
                               atol=0)
    # Counting the ignored anchors as background would move the focal loss far beyond that tolerance.
    ignored = loss.assignment.labels == -1
    assert ignored.any()
    share = sigmoid_focal_loss(logits[ignored], torch.zeros_like(logits[ignored]), reduction="sum") / positives
    assert share > 1e-3 * focal


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.9, 1.5), (-1, 3.0), (0.0, 2.0)])
def test_sigmoid_focal_loss_sum_matches_torchvision_value_and_gradient(alpha, gamma):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 7, generator=generator, dtype=torch.float64) * 4
    logits[0, :5] = 60.0  # saturated both ways, on positive and negative entries
    logits[1, :5] = -60.0
    target_classes = torch.randint(-1, 7, (3, 50), generator=generator)
    target_classes[0, :3] = torch.tensor([0, 3, -1])
    target_classes[1, :3] = torch.tensor([2, -1, 6])
    valid = torch.rand(3, 50, generator=generator) > 0.2

    ours_input = logits.clone().requires_grad_()
    ours = sigmoid_focal_loss_sum(ours_input, target_classes, valid, alpha, gamma)
    (ours * 3.0).backward()
    ref_input = logits.clone().requires_grad_()
    onehot = torch.nn.functional.one_hot(target_classes.clamp(min=0), 7).to(logits.dtype)
    onehot[target_classes < 0] = 0
    ref = sigmoid_focal_loss(ref_input, onehot, alpha=alpha, gamma=gamma, reduction="none")
    ((ref * valid.unsqueeze(-1)).sum() * 3.0).backward()

    torch.testing.assert_close(ours, ref.detach().mul(valid.unsqueeze(-1)).sum())
    torch.testing.assert_close(ours_input.grad, ref_input.grad)
    assert ours_input.grad[~valid].abs().max() == 0


def test_sigmoid_focal_loss_sum_is_finite_in_float32_for_saturated_logits():
    logits = torch.tensor([[[-1e4, 1e4], [88.0, -88.0]]], requires_grad=True)
    loss = sigmoid_focal_loss_sum(logits, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool), 0.25, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # A confident wrong answer costs |logit| x its weight; a confident right one nothing.
    torch.testing.assert_close(loss, torch.tensor(0.25 * 1e4 + 0.75 * 1e4 + 0.25 * 88 + 0.75 * 88))


def test_giou_box_loss_values_by_hand():
    """GIoU loss = 1 - IoU + (enclosing area - union) / enclosing area per positive, divided by the positives: 0 for
    deltas that decode to the box, and for a box shifted by half its width 1 - 1/3 + 0 = 2/3."""
    model, _ = tiny_detector(id2label=LABELS, box_loss="giou")
    labels = make_labels([(1, 0.5, 0.5, 0.5, 0.5)])
    out = model(torch.randn(1, 3, 128, 128), labels=labels)
    assignment = assign_anchors(out.anchors, labels, out.image_sizes, model.config)
    positive = assignment.labels[0] == 1
    target = torch.tensor([32.0, 32.0, 96.0, 96.0])  # the box in pixels
    anchors = out.anchors[positive]
    exact = torch.zeros_like(out.box_regression)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    exact[0, positive] = torch.stack([(target[0] + target[2] - anchors[:, 0] - anchors[:, 2]) / 2 / aw,
                                      (target[1] + target[3] - anchors[:, 1] - anchors[:, 3]) / 2 / ah,
                                      torch.log(64 / aw), torch.log(64 / ah)], dim=1)
    loss = box_loss(exact, out.anchors, labels, out.image_sizes, assignment, model.config)
    torch.testing.assert_close(loss, torch.tensor(0.0), rtol=0, atol=1e-6)
    shifted = exact.clone()
    shifted[0, positive, 0] += 32 / aw  # half the box's width to the right: IoU 1/3, the union fills its hull
    loss = box_loss(shifted, out.anchors, labels, out.image_sizes, assignment, model.config)
    torch.testing.assert_close(loss, torch.tensor(2 / 3), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["giou", "smooth_l1"])
def test_box_loss_gradient_matches_finite_differences(kind):
    """The box loss's gradient w.r.t. the predicted deltas against central finite differences (float64 gradcheck),
    at deltas away from smooth-L1's kink: a loss that sends no gradient, or a wrong one, to the box head fails."""
    model, _ = tiny_detector(id2label=LABELS, box_loss=kind)
    labels = make_labels([(1, 0.5, 0.5, 0.5, 0.4), (0, 0.3, 0.7, 0.2, 0.3)])
    out = model(torch.randn(1, 3, 128, 128))
    assignment = assign_anchors(out.anchors, labels, out.image_sizes, model.config)
    generator = torch.Generator().manual_seed(0)
    deltas = (torch.randn(out.box_regression.shape, generator=generator, dtype=torch.float64) * 0.3).requires_grad_()
    positive = assignment.labels[0] == 1

    def loss(d):
        return box_loss(d, out.anchors, labels, out.image_sizes, assignment, model.config)

    def loss_of_positives(values):  # gradcheck perturbs these few entries only (the others get no gradient below)
        full = deltas.detach().clone()
        full[0, positive] = values
        return loss(full)

    assert loss(deltas).dtype == torch.float64
    positives = deltas.detach()[0, positive].clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of_positives, (positives,), eps=1e-6, atol=1e-7, rtol=1e-5)
    loss(deltas).backward()
    assert deltas.grad[0, positive].abs().sum(-1).min() > 0 and not deltas.grad[0, ~positive].any()


def test_empty_targets_are_valid_negatives(tiny_model):
    model, _ = tiny_model
    out = model(torch.randn(2, 3, 128, 128), labels=make_labels([], []))
    assert torch.isfinite(out.loss)
    assert out.loss_dict["loss_box"] == 0 and out.loss_dict["num_positives"] == 1  # clamped normaliser
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_labels_raise_clear_errors(tiny_model):
    model, _ = tiny_model
    x = torch.randn(1, 3, 128, 128)
    with pytest.raises(ValueError, match=r"labels\[0\]: class id 5 is outside"):
        model(x, labels=make_labels([(5, 0.5, 0.5, 0.2, 0.2)]))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x, labels=make_labels([(0, float("nan"), 0.5, 0.2, 0.2)]))
    with pytest.raises(ValueError, match="lacks"):
        model(x, labels=[{"boxes": torch.zeros(0, 4)}])


def test_crowd_boxes_are_ignore_regions_not_targets(tiny_model):
    """Anchors inside an `iscrowd` box are neither positives nor negatives; the crowd box matches no anchor."""
    model, _ = tiny_model
    real = (0, 0.25, 0.25, 0.2, 0.2)
    crowd = (1, 0.7, 0.7, 0.5, 0.5)  # a large crowd region in the lower right
    with_crowd = make_labels([real, crowd])
    with_crowd[0]["iscrowd"] = torch.tensor([0, 1])
    without = make_labels([real])
    as_object = make_labels([real, crowd])  # what loading without the flag used to do
    pixels = torch.randn(1, 3, 128, 128)
    out = model(pixels, labels=with_crowd)
    crowd_assignment = assign_anchors(out.anchors, with_crowd, out.image_sizes, model.config)
    plain = assign_anchors(out.anchors, without, out.image_sizes, model.config)
    object_assignment = assign_anchors(out.anchors, as_object, out.image_sizes, model.config)

    crowd_xyxy = box_convert(torch.tensor(crowd[1:]) * 128, "cxcywh", "xyxy")
    anchors = out.anchors
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    inter = (torch.minimum(anchors[:, 2:], crowd_xyxy[2:]) - torch.maximum(anchors[:, :2], crowd_xyxy[:2]))
    inside = inter.clamp(min=0).prod(dim=1) / area >= model.config.crowd_ioa_threshold
    assert inside.sum() > 10
    labels = crowd_assignment.labels[0]
    assert (labels[inside] == -1).all(), "anchors inside the crowd region are ignored"
    assert torch.equal(labels[~inside], plain.labels[0][~inside]), "elsewhere the crowd box changes nothing"
    assert (object_assignment.labels[0][inside] == 1).any(), "as an ordinary box it would have made positives"
    # The loss equals the loss without the crowd box but with its region left out of the classification term.
    expected = model(pixels, labels=without).loss_dict
    assert out.loss_dict["num_positives"] == expected["num_positives"]
    assert out.loss_dict["loss_box"] == expected["loss_box"]
    assert out.loss_dict["loss_cls"] < expected["loss_cls"]  # fewer anchors counted as background


def test_sigmoid_focal_loss_sum_stays_fp32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 30, 5, generator=generator) * 3).requires_grad_()
    target_classes = torch.randint(-1, 5, (2, 30), generator=generator)
    valid = torch.ones(2, 30, dtype=torch.bool)
    expected = sigmoid_focal_loss_sum(logits, target_classes, valid, 0.25, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sigmoid_focal_loss_sum(logits, target_classes, valid, 0.25, 2.0)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, expected)


def test_low_precision_outputs_give_a_float32_loss_and_labels_are_checked_to_their_edges():
    model, _ = tiny_detector(id2label=LABELS)
    out = model(torch.randn(1, 3, 64, 64))
    labels = make_labels([(2, 0.5, 0.5, 0.4, 0.3)])
    low = detection_loss(out.logits.bfloat16(), out.box_regression.bfloat16(), out.anchors, labels, out.image_sizes,
                         model.config)
    assert low.loss.dtype == torch.float32 and low.loss_dict["loss_box"].dtype == torch.float32
    x = torch.randn(1, 3, 64, 64)
    for bad, message in [
        (make_labels([(3, 0.5, 0.5, 0.2, 0.2)]), r"class id 3 is outside the model's 3 classes \(0..2\)"),
        ([{"class_labels": torch.tensor([0, 1]), "boxes": torch.zeros(1, 4)}], r"boxes must be \(M, 4\)"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.zeros(1, 1, 4)}], r"boxes must be \(M, 4\)"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.zeros(1, 5)}], r"boxes must be \(M, 4\)"),
        ([{**make_labels([(0, 0.5, 0.5, 0.2, 0.2)])[0], "iscrowd": torch.tensor([0, 0])}], "iscrowd has 2 entries"),
    ]:
        with pytest.raises(ValueError, match=message):
            model(x, labels=bad)


def test_the_focal_loss_with_alpha_0_weighs_negatives_only():
    logits = torch.tensor([[[2.0, -1.0], [0.5, 3.0]]], dtype=torch.float64)
    target_classes, valid = torch.tensor([[0, -1]]), torch.ones(1, 2, dtype=torch.bool)
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    expected = sigmoid_focal_loss(logits, onehot, alpha=0.0, gamma=2.0, reduction="sum")
    torch.testing.assert_close(sigmoid_focal_loss_sum(logits, target_classes, valid, 0.0, 2.0), expected)


def test_assignment_follows_the_configs_low_quality_minimum():
    """A box whose best anchor's IoU is below the config's `low_quality_match_min_iou` gives no positive."""
    model, _ = tiny_detector(id2label=LABELS, low_quality_match_min_iou=0.4)
    out = model(torch.randn(1, 3, 128, 128))
    tiny = make_labels([(0, 0.5, 0.5, 0.02, 0.02)])  # 2.5 px: IoU far below 0.4 with every anchor
    assert not (assign_anchors(out.anchors, tiny, out.image_sizes, model.config).labels == 1).any()
    model.config.low_quality_match_min_iou = 0.0
    assert (assign_anchors(out.anchors, tiny, out.image_sizes, model.config).labels == 1).any()


def test_every_tensor_the_loss_makes_is_on_its_inputs_device():
    """Under a "meta" default device (see `under_meta_default_device`) the loss of CPU outputs is the same CPU loss."""
    model, _ = tiny_detector(id2label=LABELS)
    out = model(torch.randn(2, 3, 64, 64))
    labels = make_labels([(0, 0.5, 0.5, 0.4, 0.3), (1, 0.2, 0.2, 0.3, 0.3)], [])
    labels[0]["iscrowd"] = torch.tensor([0, 1])

    def loss():
        return detection_loss(out.logits, out.box_regression, out.anchors, labels, out.image_sizes, model.config)

    expected = loss()
    with under_meta_default_device():
        got = loss()
    assert got.loss.device.type == "cpu" and torch.equal(got.loss, expected.loss)
