"""Distillation (`hf_sad.distillation`): which teachers are accepted, and the SAD loss of a training step.

Teachers: one whose classes (names, order or count), pyramid levels or anchors differ from the student's is refused
with the differences, by `check_teacher_compatible`, `SADTrainer` and `hf_sad.cli.main([...])` (after a CLI failure the
output folder holds no weights and no checkpoint); so are a missing or unloadable teacher, a teacher of the wrong kind,
and a distillation loss without a teacher.

The loss: identical teacher and student start with near-zero distillation; unlabeled rows get no supervised loss
(only distillation, which does not train the box head); the teacher's detections (pseudo-boxes) train box regression
on unlabeled rows, weighted by `pseudo_box_weight`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from hf_sad.arguments import DistillationArguments
from hf_sad.cli import main
from hf_sad.data import build_training_stream
from hf_sad.data.synthetic import SYNTHETIC_LABELS, make_labeled_dataset, make_unlabeled_stream
from hf_sad.distillation.sad_loss import sad_loss
from hf_sad.model.detection_loss import assign_anchors
from hf_sad.teachers.base import check_teacher_compatible
from hf_sad.training.trainer import SADTrainer

from .utils import (
    IMAGE_SIZE,
    TINY_CLI,
    TWO_LABELS,
    assert_nothing_trained,
    make_args,
    save_detector,
    student_and_teacher,
    tiny_detector,
)

REVERSED = dict(enumerate(reversed(SYNTHETIC_LABELS)))


RENAMED = {i: f"class{i}" for i in range(len(SYNTHETIC_LABELS))}


FEWER = dict(enumerate(SYNTHETIC_LABELS[:3]))


#: name -> (teacher overrides, what the error must mention)
INCOMPATIBLE_TEACHERS = {
    "class_names": ({"id2label": RENAMED}, "classes (by id)"),
    "class_order": ({"id2label": REVERSED}, "classes (by id)"),
    "class_count": ({"id2label": FEWER}, "classes (by id)"),
    "max_level": ({"max_level": 6}, "max_level: teacher 6 vs student 7"),
    "min_level": ({"min_level": 4}, "min_level: teacher 4 vs student 3"),
    "aspect_ratios": ({"aspect_ratios": [1.0]}, "aspect_ratios: teacher [1.0]"),
    "scales_per_octave": ({"scales_per_octave": 2}, "scales_per_octave: teacher 2 vs student 3"),
    "anchor_scale": ({"anchor_scale": 3.0}, "anchor_scale: teacher 3.0 vs student 4.0"),
}


# ----------------------------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------------------------


def test_incompatible_teacher_is_refused_with_the_differences():
    student, _ = tiny_detector(id2label=TWO_LABELS)
    teacher, _ = tiny_detector(id2label={0: "b", 1: "a"}, max_level=6, aspect_ratios=[1.0])
    with pytest.raises(ValueError) as err:
        check_teacher_compatible(teacher, student)
    message = str(err.value)
    assert "max_level: teacher 6 vs student 7" in message
    assert "aspect_ratios" in message and "classes (by id)" in message


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE_TEACHERS))
def test_incompatible_teacher_is_refused_by_trainer_and_cli(tmp_path, labeled, case):
    overrides, expected = INCOMPATIBLE_TEACHERS[case]
    student, processor = tiny_detector()
    teacher, teacher_processor = tiny_detector(seed=1, **overrides)
    args = make_args(tmp_path, distill_loss="adl")
    with pytest.raises(ValueError) as error:
        SADTrainer(student, teacher, args, labeled, processing_class=processor)
    assert expected in str(error.value) and "Build the student with the teacher's" in str(error.value)

    save_detector((teacher, teacher_processor), tmp_path / "teacher")
    with pytest.raises(ValueError, match="not compatible for distillation") as error:
        main(["distill", "--teacher", str(tmp_path / "teacher"), "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert expected in str(error.value)
    assert_nothing_trained(tmp_path / "cli")


def test_missing_teacher_path_fails_clearly(tmp_path, labeled):
    student, _, processor = student_and_teacher()
    with pytest.raises(ValueError, match="Could not load the teacher"):
        SADTrainer(student, str(tmp_path / "nowhere"), make_args(tmp_path, distill_loss="adl"), labeled,
                   processing_class=processor)


@pytest.mark.parametrize("where", ["missing", "empty_folder", "a_file", "its_config_json"])
def test_missing_or_unloadable_teacher_is_refused_by_trainer_and_cli(tmp_path, labeled, where):
    teacher = tmp_path / where
    if where == "empty_folder":
        teacher.mkdir()
    elif where == "a_file":
        teacher.write_text("not a model")
    elif where == "its_config_json":  # a saved teacher's config.json instead of its folder
        teacher = save_detector(tiny_detector(seed=1), tmp_path / "saved") / "config.json"
    expected = (rf"The teacher '{teacher}' is a file; pass the folder that holds the saved model .*"
                rf"'{teacher.parent}'" if teacher.is_file() else f"Could not load the teacher from '{teacher}'")
    student, processor = tiny_detector()
    with pytest.raises(ValueError, match=expected) as error:
        SADTrainer(student, str(teacher), make_args(tmp_path, distill_loss="adl"), labeled, processing_class=processor)
    assert "weights_only" not in str(error.value)  # never the unpickling advice torch.load gives
    with pytest.raises(ValueError, match=expected):
        main(["distill", "--teacher", str(teacher), "--output_dir", str(tmp_path / "cli"), *TINY_CLI])
    assert_nothing_trained(tmp_path / "cli")


def test_teacher_of_the_wrong_kind_or_none_is_refused(tmp_path, labeled):
    student, processor = tiny_detector()
    with pytest.raises(TypeError, match="teacher must be a SADForObjectDetection, got Linear"):
        SADTrainer(student, nn.Linear(2, 2), make_args(tmp_path, distill_loss="adl"), labeled,
                   processing_class=processor)
    with pytest.raises(ValueError, match="needs a teacher_model.*distill_loss='none'"):
        SADTrainer(student, None, make_args(tmp_path, distill_loss="kl"), labeled, processing_class=processor)
    with pytest.raises(SystemExit):
        main(["distill", "--output_dir", str(tmp_path / "cli"), *TINY_CLI])


# ----------------------------------------------------------------------------------------------------------------------
# The loss of a training step
# ----------------------------------------------------------------------------------------------------------------------


def test_identical_teacher_and_student_start_with_near_zero_distillation(tmp_path):
    # 16 channels on 96 px images, not TINY on 64 px: there two random heads differ by < 1e-3 (the bound checked below).
    size = 96
    data = make_labeled_dataset(12, seed=0, image_size=size, cache_dir=str(tmp_path / "cache"))

    def first_log(teacher):
        args = make_args(tmp_path, distill_loss="adl", max_steps=1, learning_rate=0.0)
        trainer = SADTrainer(student, teacher, args, data, make_unlabeled_stream(image_size=size),
                             processing_class=processor)
        trainer.train()
        return trainer.state.log_history[0]

    # ConvNeXt normalises with LayerNorm, which behaves the same in training and evaluation; with batch norm the
    # training student (batch statistics) and its frozen copy (running statistics) would differ by design.
    models = [tiny_detector(seed=seed, backbone="convnext_atto", image_size={"height": size, "width": size},
                            fpn_channels=16, head_channels=16) for seed in range(2)]
    (student, processor), (other_teacher, _) = models
    for seed, (model, _) in enumerate(models):  # fresh heads all predict the prior; make them differ
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = model.class_head.predictor.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    same = first_log(copy.deepcopy(student))
    other = first_log(other_teacher)
    for key in ("loss_distill_labeled", "loss_distill_unlabeled"):
        assert same[key] < 1e-6 and other[key] > 1e-3, (key, same[key], other[key])
    assert same["loss_gt"] > 0.1


def unlabeled_batch(trainer, labeled):
    rows = list(build_training_stream(labeled, make_unlabeled_stream(image_size=IMAGE_SIZE)).take(8))[1::2]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    assert not inputs["is_labeled"].any()
    return inputs


def test_unlabeled_rows_get_no_supervised_loss(tmp_path, labeled):
    """A batch of only unlabeled rows: the supervised term is absent and only distillation moves the student."""
    student, teacher, processor = student_and_teacher()
    trainer = SADTrainer(student, teacher, make_args(tmp_path, distill_loss="adl", pseudo_box_weight=0.0), labeled,
                         processing_class=processor)
    student.train()
    loss = trainer.compute_loss(student, unlabeled_batch(trainer, labeled))
    assert "loss_gt" not in trainer._metrics and "loss_distill_unlabeled" in trainer._metrics
    assert "loss_box_pseudo" not in trainer._metrics
    torch.testing.assert_close(loss.detach(), torch.tensor(trainer._metrics["loss_distill_unlabeled"][0]))
    loss.backward()
    assert not student.box_head.predictor.weight.grad.any(), "soft targets alone must not train the box head"


def test_pseudo_boxes_train_box_regression_on_unlabeled_rows(tmp_path, labeled):
    """The teacher's detections are hard boxes for the box loss of unlabeled images, weighted by pseudo_box_weight."""
    student, teacher, processor = student_and_teacher()
    args = make_args(tmp_path, distill_loss="adl", pseudo_label_threshold=0.005, pseudo_box_weight=2.0,
                     pseudo_box_loss="box")
    trainer = SADTrainer(student, teacher, args, labeled, processing_class=processor)
    student.train()
    loss = trainer.compute_loss(student, unlabeled_batch(trainer, labeled))
    box, distill = trainer._metrics["loss_box_pseudo"][0], trainer._metrics["loss_distill_unlabeled"][0]
    assert trainer._metrics["pseudo_boxes_per_image"][0] > 0 and box > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(distill + 2.0 * box))
    loss.backward()
    assert student.box_head.predictor.weight.grad.abs().sum() > 0
    assert trainer.distillation_hyperparameters()["pseudo_box_weight"] == 2.0


def test_released_protocol_trains_unlabeled_classification_from_pseudo_boxes_too(tmp_path, labeled):
    """pseudo_box_loss="full" (the default, as the authors' code): focal + box loss against the pseudo-boxes on top of
    the soft targets, so the pseudo-boxes reach the classification head as well."""
    student, teacher, processor = student_and_teacher()
    args = make_args(tmp_path, distill_loss="adl", pseudo_label_threshold=0.005, pseudo_box_weight=2.0,
                     unlabeled_distill_weight=0.0)  # the hard part alone
    trainer = SADTrainer(student, teacher, args, labeled, processing_class=processor)
    student.train()
    loss = trainer.compute_loss(student, unlabeled_batch(trainer, labeled))
    metrics = {k: v[0] for k, v in trainer._metrics.items()}
    assert metrics["loss_cls_pseudo"] > 0 and metrics["loss_box_pseudo"] > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(2.0 * (metrics["loss_cls_pseudo"]
                                                                  + metrics["loss_box_pseudo"])))
    loss.backward()
    assert student.class_head.predictor.weight.grad.abs().sum() > 0  # the focal loss on pseudo-boxes
    assert student.box_head.predictor.weight.grad.abs().sum() > 0


def test_unlabeled_images_without_pseudo_boxes_can_be_dropped_and_are_counted(tmp_path, labeled):
    student, teacher, processor = student_and_teacher()
    with torch.no_grad():
        teacher.class_head.predictor.bias.fill_(-30.0)  # the teacher detects nothing anywhere
    batch = None
    for drop in (False, True):
        args = make_args(tmp_path, distill_loss="adl", drop_unlabeled_without_pseudo_boxes=drop)
        trainer = SADTrainer(student, teacher, args, labeled, processing_class=processor)
        batch = batch or unlabeled_batch(trainer, labeled)
        student.train()
        loss = trainer.compute_loss(student, batch)
        metrics = {k: v[0] for k, v in trainer._metrics.items()}
        if drop:  # every image of the batch leaves the step: nothing is left to learn from
            assert metrics["unlabeled_dropped"] == 4 and "loss_distill_unlabeled" not in metrics and loss == 0
            trainer.log({"loss": 0.0})
            assert trainer.state.log_history[-1]["unlabeled_dropped"] == 4
        else:  # kept: the focal loss teaches "background" and the soft targets apply
            assert "unlabeled_dropped" not in metrics and metrics["loss_distill_unlabeled"] > 0 and loss > 0


def test_crowd_regions_of_labeled_images_are_left_out_of_distillation():
    """Whatever the teacher says inside a crowd region of a labeled image does not reach the student: the teacher's
    logits there can change without changing the loss, unless the region were an ordinary box."""
    student, teacher, processor = student_and_teacher()
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        outputs, teacher_outputs = student(pixels), teacher(pixels)
    crowd_box = torch.tensor([[0.6, 0.6, 0.7, 0.7]])  # normalised cxcywh: a large lower-right region
    labels = [{"class_labels": torch.tensor([1, 2]), "boxes": torch.cat([torch.tensor([[0.2, 0.2, 0.2, 0.2]]),
                                                                         crowd_box]), "iscrowd": torch.tensor([0, 1])}]
    as_object = [{k: v for k, v in labels[0].items() if k != "iscrowd"}]
    # The normaliser over the distilled anchors only: with "all" (the authors' count) the region's teacher scores
    # would still enter the divisor, though no term of the sum.
    args = DistillationArguments(distill_loss="adl", distill_normalizer_anchors="distilled")
    anchors, crowd_xyxy = outputs.anchors, box_convert(crowd_box[0] * IMAGE_SIZE, "cxcywh", "xyxy")
    overlap = (torch.minimum(anchors[:, 2:], crowd_xyxy[2:]) - torch.maximum(anchors[:, :2], crowd_xyxy[:2]))
    area = (anchors[:, 2:] - anchors[:, :2]).prod(dim=1)
    deep_inside = overlap.clamp(min=0).prod(dim=1) / area >= student.config.crowd_ioa_threshold
    assert deep_inside.sum() > 5
    changed = copy.deepcopy(teacher_outputs)
    changed.logits[0, deep_inside] += 5.0

    def distill(target, teacher_out):
        result = sad_loss(student.config, outputs, teacher_out, target, torch.tensor([True]), args, processor)
        return result.metrics["loss_distill_labeled"]

    assert torch.equal(distill(labels, teacher_outputs), distill(labels, changed))
    assert not torch.equal(distill(as_object, teacher_outputs), distill(as_object, changed))


def test_normaliser_counts_all_anchors_or_the_distilled_ones_and_background_only_distils_negatives():
    student, teacher, processor = student_and_teacher()
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        outputs, teacher_outputs = student(pixels), teacher(pixels)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    assignment = assign_anchors(outputs.anchors, labels, outputs.image_sizes, student.config).labels[0]
    assert (assignment == -1).any() and (assignment == 1).any()
    q = torch.sigmoid(teacher_outputs.logits[0].float()) ** 1.8

    def run(teacher_out, **settings):
        args = DistillationArguments(distill_loss="adl", **settings)
        return sad_loss(student.config, outputs, teacher_out, labels, torch.tensor([True]), args, processor).metrics

    # fp32 sums of the same terms (each rounded differently: exp/softplus inside the loss, pow here) in another order
    rtol = 2 * (q.numel() + 8) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(run(teacher_outputs)["distill_normalizer_labeled"], q.sum(), rtol=rtol, atol=0)
    torch.testing.assert_close(run(teacher_outputs, distill_normalizer_anchors="distilled")[
        "distill_normalizer_labeled"], q[assignment >= 0].sum(), rtol=rtol, atol=0)

    # Distilling background only: the teacher's scores on positive anchors no longer matter.
    changed = copy.deepcopy(teacher_outputs)
    changed.logits[0, assignment == 1] += 3.0
    background = {"distill_entries": "background", "distill_normalizer_anchors": "distilled"}
    assert torch.equal(run(changed, **background)["loss_distill_labeled"],
                       run(teacher_outputs, **background)["loss_distill_labeled"])
    everything = {"distill_normalizer_anchors": "distilled"}
    assert not torch.equal(run(changed, **everything)["loss_distill_labeled"],
                           run(teacher_outputs, **everything)["loss_distill_labeled"])


#: weight -> the settings it is checked under and the (unweighted) term it multiplies, as `sad_loss` logs it.
WEIGHTED_TERMS = {
    "labeled_distill_weight/adl": ("labeled_distill_weight", {"distill_loss": "adl"}, "loss_distill_labeled"),
    "labeled_distill_weight/kl": ("labeled_distill_weight", {"distill_loss": "kl"}, "loss_distill_labeled"),
    "unlabeled_distill_weight/adl": ("unlabeled_distill_weight", {"distill_loss": "adl"}, "loss_distill_unlabeled"),
    "unlabeled_distill_weight/hard": ("unlabeled_distill_weight", {"distill_loss": "hard"}, "loss_distill_unlabeled"),
    "pseudo_box_weight/full": ("pseudo_box_weight", {"pseudo_box_loss": "full"}, "loss_pseudo"),
    "pseudo_box_weight/box": ("pseudo_box_weight", {"pseudo_box_loss": "box"}, "loss_box_pseudo"),
}


@pytest.fixture(scope="module")
def mixed_step(labeled):
    """A student's and a teacher's outputs on one batch of 4 labeled and 4 unlabeled rows, and what `sad_loss` needs
    besides."""
    from hf_sad.data.collator import SADDataCollator

    student, teacher, processor = student_and_teacher()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh heads all predict the prior: make the teacher's differ, so that every term counts
        weight = teacher.class_head.predictor.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    rows = list(build_training_stream(labeled, make_unlabeled_stream(image_size=IMAGE_SIZE)).take(8))
    batch = SADDataCollator(processor, seed=0)(rows)
    assert batch["is_labeled"].sum() == 4
    with torch.no_grad():
        outputs = student(batch["pixel_values"], batch["pixel_mask"])
        teacher_outputs = teacher(batch["pixel_values"], batch["pixel_mask"])
    return student.config, outputs, teacher_outputs, batch["labels"], batch["is_labeled"], processor


@pytest.mark.parametrize("case", sorted(WEIGHTED_TERMS))
def test_each_loss_weight_scales_its_term_by_exactly_that_factor(mixed_step, case):
    """loss(w) = loss(w = 0) + w * term for weights other than 0 and 1, with the term as logged (unweighted) and the
    same at every weight."""
    name, settings, term = WEIGHTED_TERMS[case]
    config, outputs, teacher_outputs, labels, is_labeled, processor = mixed_step

    def step(weight):
        args = DistillationArguments(pseudo_label_threshold=0.005, **settings, **{name: weight})
        return sad_loss(config, outputs, teacher_outputs, labels, is_labeled, args, processor)

    base, unit = step(0.0), step(1.0)
    assert unit.metrics[term] > 0.01
    for weight in (0.37, 2.5):
        result = step(weight)
        torch.testing.assert_close(result.metrics[term], unit.metrics[term])
        # float32 sums of a few O(1) terms: a few units of float32 rounding (1.2e-7) relative.
        torch.testing.assert_close(result.loss, base.loss + weight * unit.metrics[term], rtol=1e-6, atol=1e-6)


def _labeled_rows_reference(mixed_step, **settings):
    """What `sad_loss` should log as the labeled images' distillation term: the mode's kernel on the entries of the
    labeled rows outside the ground truth's ignore band, divided by the settings' normaliser, computed here."""
    from hf_sad.distillation.losses import adaptive_distillation_loss, focal_distillation_loss, kl_distillation_loss
    from hf_sad.model.detection_loss import assign_anchors

    config, outputs, teacher_outputs, labels, is_labeled, _ = mixed_step
    args = DistillationArguments(**settings)
    rows = is_labeled.nonzero().flatten().tolist()
    assignment = assign_anchors(outputs.anchors, [labels[i] for i in rows], outputs.image_sizes[rows], config).labels
    student, teacher = outputs.logits[rows], teacher_outputs.logits[rows]
    mask = assignment >= 0
    if args.teacher_confidence_mask is not None:
        entropy = -(torch.sigmoid(teacher) * torch.nn.functional.logsigmoid(teacher)
                    + torch.sigmoid(-teacher) * torch.nn.functional.logsigmoid(-teacher))
        mask &= entropy.amax(-1) < args.teacher_confidence_mask
    if args.distill_normalizer == "positives":
        normalizer = ((assignment == 1) & mask).sum().clamp(min=1).float()
    else:  # every anchor of the labeled rows, the ignore band included
        normalizer = torch.sigmoid(teacher.float() / args.distill_temperature).pow(args.normalizer_power).sum()
    common = dict(temperature=args.distill_temperature, normalizer=normalizer.clamp(min=1.0),
                  power=args.normalizer_power, mask=mask)
    if args.distill_loss == "adl":
        return adaptive_distillation_loss(student, teacher, beta=args.adl_beta, gamma=args.adl_gamma,
                                          variant=args.adl_variant, **common)
    if args.distill_loss == "fdl":
        return focal_distillation_loss(student, teacher, gamma=args.adl_gamma, **common)
    return kl_distillation_loss(student, teacher, **common)


@pytest.mark.parametrize("settings", [
    {"distill_loss": "adl", "adl_beta": 0.5, "adl_gamma": 1.5, "distill_temperature": 2.0, "normalizer_power": 1.5},
    {"distill_loss": "adl", "adl_variant": "released", "distill_normalizer": "positives"},
    {"distill_loss": "kl", "distill_temperature": 0.5},
    {"distill_loss": "fdl", "adl_gamma": 3.0, "normalizer_power": 2.5},
    {"distill_loss": "adl", "teacher_confidence_mask": 0.2},
], ids=["adl", "adl-released-positives", "kl", "fdl", "adl-confident"])
def test_the_labeled_distillation_term_is_the_modes_kernel_with_the_settings(mixed_step, settings):
    config, outputs, teacher_outputs, labels, is_labeled, processor = mixed_step
    result = sad_loss(config, outputs, teacher_outputs, labels, is_labeled, DistillationArguments(**settings),
                      processor)
    expected = _labeled_rows_reference(mixed_step, **settings)
    torch.testing.assert_close(result.metrics["loss_distill_labeled"], expected, rtol=1e-5, atol=1e-7)
    assert ("adl_mean_weight_labeled" in result.metrics) == (settings["distill_loss"] == "adl")
    if "teacher_confidence_mask" in settings:
        q = torch.sigmoid(teacher_outputs.logits)
        entropy = (-(q * q.log() + (1 - q) * (1 - q).log())).amax(-1)
        assert result.metrics["teacher_certain_fraction"] == pytest.approx(float((entropy < 0.2).float().mean()))
        assert 0 < result.metrics["teacher_certain_fraction"] < 1


def test_supervised_step_is_the_detection_loss_of_the_labeled_rows(mixed_step):
    from hf_sad.model.detection_loss import detection_loss

    config, outputs, teacher_outputs, labels, is_labeled, processor = mixed_step
    rows = is_labeled.nonzero().flatten().tolist()
    expected = detection_loss(outputs.logits[rows], outputs.box_regression[rows], outputs.anchors,
                              [labels[i] for i in rows], outputs.image_sizes[rows], config)
    for teacher, mode in ((None, "adl"), (teacher_outputs, "none")):
        result = sad_loss(config, outputs, teacher, labels, is_labeled, DistillationArguments(distill_loss=mode),
                          processor)
        torch.testing.assert_close(result.loss, expected.loss)
        assert set(result.metrics) == {"loss_gt", "loss_cls", "loss_box"}
        torch.testing.assert_close(result.metrics["loss_box"], expected.loss_dict["loss_box"])


def test_dropped_unlabeled_images_are_those_without_pseudo_boxes(mixed_step):
    config, outputs, teacher_outputs, labels, is_labeled, processor = mixed_step
    from hf_sad.distillation.sad_loss import hard_pseudo_labels

    unlabeled = (~is_labeled).nonzero().flatten().tolist()
    scores = torch.sigmoid(teacher_outputs.logits[unlabeled]).amax((1, 2))
    threshold = float(scores.sort().values[1])  # above the two least confident images' best scores
    pseudo = hard_pseudo_labels(teacher_outputs, processor, threshold)
    expected = sum(len(pseudo[i]["boxes"]) == 0 for i in unlabeled)
    assert 0 < expected < len(unlabeled)
    args = DistillationArguments(pseudo_label_threshold=threshold, drop_unlabeled_without_pseudo_boxes=True)
    result = sad_loss(config, outputs, teacher_outputs, labels, is_labeled, args, processor)
    assert result.metrics["unlabeled_dropped"] == expected
    assert set(pseudo[unlabeled[0]]) == {"class_labels", "boxes", "scores"}


def test_every_tensor_the_sad_loss_makes_is_on_its_inputs_device(mixed_step):
    from .utils import under_meta_default_device

    config, outputs, teacher_outputs, labels, is_labeled, processor = mixed_step
    args = DistillationArguments(pseudo_label_threshold=0.005, distill_normalizer="positives",
                                 teacher_confidence_mask=0.5, drop_unlabeled_without_pseudo_boxes=True)
    expected = sad_loss(config, outputs, teacher_outputs, labels, is_labeled, args, processor)
    with under_meta_default_device():
        got = sad_loss(config, outputs, teacher_outputs, labels, is_labeled, args, processor)
    assert got.loss.device.type == "cpu" and torch.equal(got.loss, expected.loss)
    for name, value in expected.metrics.items():
        assert torch.equal(torch.as_tensor(got.metrics[name]), torch.as_tensor(value)), name
