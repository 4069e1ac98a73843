"""SADTrainer: arguments, teacher handling, the mixed batch, each distillation loss, evaluation, checkpoints."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_sad import create_detector
from hf_sad.data import SADDataCollator, build_training_stream
from hf_sad.synthetic import make_labeled_dataset, make_unlabeled_stream, synthetic_id2label
from hf_sad.trainer import SADTrainer, SADTrainingArguments, check_teacher_compatible

from .robust_utils import StopAt

TINY = dict(fpn_channels=16, head_channels=16, head_num_convs=1)
SIZE = {"height": 96, "width": 96}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    return make_labeled_dataset(12, seed=0, image_size=96, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return make_labeled_dataset(4, seed=1, image_size=96, cache_dir=str(tmp_path_factory.mktemp("cache")))


def student_and_teacher(same: bool = False):
    torch.manual_seed(0)
    student, processor = create_detector("resnet18", synthetic_id2label(), image_size=SIZE, **TINY)
    torch.manual_seed(1)
    teacher, _ = create_detector("resnet18" if same else "resnet34", synthetic_id2label(), image_size=SIZE,
                                 fpn_channels=24, head_channels=24, head_num_convs=1)
    return student, teacher, processor


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return SADTrainingArguments(**{**defaults, **kwargs})


def test_arguments_validate_and_set_detection_defaults(tmp_path):
    args = make_args(tmp_path)
    assert args.remove_unused_columns is False and args.eval_do_concat_batches is False
    assert args.ddp_find_unused_parameters is False
    assert args.accelerator_config.dispatch_batches is False
    for field, value in [("distill_loss", "mse"), ("unlabeled_ratio", 1.0), ("distill_temperature", 0.0),
                         ("adl_variant", "x"), ("pseudo_label_threshold", 1.5), ("teacher_dtype", "int8"),
                         ("pseudo_box_weight", -1.0)]:
        with pytest.raises(ValueError, match=field):
            make_args(tmp_path, **{field: value})


def test_incompatible_teacher_is_refused_with_the_differences():
    student, _ = create_detector("resnet18", {0: "a", 1: "b"}, **TINY)
    teacher, _ = create_detector("resnet18", {0: "b", 1: "a"}, max_level=6, aspect_ratios=[1.0], **TINY)
    with pytest.raises(ValueError) as err:
        check_teacher_compatible(teacher, student)
    message = str(err.value)
    assert "max_level: teacher 6 vs student 7" in message
    assert "aspect_ratios" in message and "classes (by id)" in message


def test_missing_teacher_path_fails_clearly(tmp_path, labeled):
    student, _, processor = student_and_teacher()
    with pytest.raises(ValueError, match="Could not load the teacher"):
        SADTrainer(student, str(tmp_path / "nowhere"), make_args(tmp_path), labeled, processing_class=processor)


def test_stream_mixes_labeled_and_unlabeled_and_numbers_rows(labeled):
    stream = build_training_stream(labeled, make_unlabeled_stream(image_size=96), unlabeled_ratio=0.5)
    rows = list(stream.take(8))
    assert [r["is_labeled"] for r in rows] == [True, False] * 4  # 0.5 alternates exactly, as in the paper
    assert [r["sample_index"] for r in rows] == list(range(8))
    assert all(len(r["objects"]["bbox"]) == 0 for r in rows if not r["is_labeled"])


def test_collator_augmentation_is_seeded_by_sample_index_and_keeps_boxes_on_objects(labeled):
    _, processor = create_detector("resnet18", synthetic_id2label(), image_size=SIZE, **TINY)
    collator = SADDataCollator(processor, hflip_prob=1.0, scale_range=(1.0, 1.0))
    rows = list(build_training_stream(labeled).take(2))
    first, again = collator(rows), collator(copy.deepcopy(rows))
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    plain = SADDataCollator(processor, hflip_prob=0.0, scale_range=(1.0, 1.0))(rows)
    # Flipped image = mirrored pixels; boxes mirrored in normalised cx.
    valid = (..., slice(0, 96), slice(0, 96))  # 96 px images padded to 128
    torch.testing.assert_close(first["pixel_values"][valid], plain["pixel_values"][valid].flip(-1), rtol=0, atol=1e-5)
    for flipped, straight in zip(first["labels"], plain["labels"]):
        torch.testing.assert_close(flipped["boxes"][:, 0], 1 - straight["boxes"][:, 0], rtol=0, atol=1e-5)
    assert first["is_labeled"].all()


def test_teacher_is_frozen_not_in_optimizer_not_in_checkpoint(tmp_path, labeled):
    student, teacher, processor = student_and_teacher()
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = SADTrainer(student, teacher, args, labeled, make_unlabeled_stream(image_size=96),
                         processing_class=processor)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert not any(p.requires_grad for p in trainer.teacher.parameters()) and not trainer.teacher.training
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.state_dict().items())
    weights = load_file(str(Path(args.output_dir) / "checkpoint-2" / "model.safetensors"))
    assert set(weights) == set(student.state_dict())  # the student only, no teacher tensors


def test_identical_teacher_and_student_start_with_near_zero_distillation(tmp_path, labeled):
    def first_log(teacher):
        trainer = SADTrainer(student, teacher, make_args(tmp_path, max_steps=1, learning_rate=0.0), labeled,
                             make_unlabeled_stream(image_size=96), processing_class=processor)
        trainer.train()
        return trainer.state.log_history[0]

    # ConvNeXt normalises with LayerNorm, which behaves the same in training and evaluation; with batch norm the
    # training student (batch statistics) and its frozen copy (running statistics) would differ by design.
    models = [create_detector("convnext_atto", synthetic_id2label(), image_size=SIZE, **TINY) for _ in range(2)]
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


@pytest.mark.parametrize("distill_loss", ["adl", "kl", "fdl", "hard", "none"])
def test_each_distillation_loss_trains(tmp_path, labeled, distill_loss):
    student, teacher, processor = student_and_teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = make_args(tmp_path, distill_loss=distill_loss, pseudo_label_threshold=0.005)
    trainer = SADTrainer(student, teacher, args, labeled, make_unlabeled_stream(image_size=96),
                         processing_class=processor)
    trainer.train()
    logs = trainer.state.log_history
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs if "loss" in entry)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items()), "weights were updated"
    if distill_loss in ("adl", "kl", "fdl"):
        assert "loss_distill_labeled" in logs[0] and "loss_distill_unlabeled" in logs[0]
        assert logs[0]["distill_normalizer_unlabeled"] >= 1.0
    if distill_loss == "adl":
        assert 0 < logs[0]["adl_mean_weight_unlabeled"] < 1
    if distill_loss == "hard":
        assert "loss_distill_unlabeled" in logs[0] and logs[0]["pseudo_boxes_per_image"] > 0
    if distill_loss == "none":
        assert trainer.teacher is None and "loss_distill_labeled" not in logs[0]


def unlabeled_batch(trainer, labeled):
    rows = list(build_training_stream(labeled, make_unlabeled_stream(image_size=96)).take(8))[1::2]
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    assert not inputs["is_labeled"].any()
    return inputs


def test_unlabeled_rows_get_no_supervised_loss(tmp_path, labeled):
    """A batch of only unlabeled rows: the supervised term is absent and only distillation moves the student."""
    student, teacher, processor = student_and_teacher()
    trainer = SADTrainer(student, teacher, make_args(tmp_path, pseudo_box_weight=0.0), labeled,
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
    args = make_args(tmp_path, pseudo_label_threshold=0.005, pseudo_box_weight=2.0)
    trainer = SADTrainer(student, teacher, args, labeled, processing_class=processor)
    student.train()
    loss = trainer.compute_loss(student, unlabeled_batch(trainer, labeled))
    box, distill = trainer._metrics["loss_box_pseudo"][0], trainer._metrics["loss_distill_unlabeled"][0]
    assert trainer._metrics["pseudo_boxes_per_image"][0] > 0 and box > 0
    torch.testing.assert_close(loss.detach(), torch.tensor(distill + 2.0 * box))
    loss.backward()
    assert student.box_head.predictor.weight.grad.abs().sum() > 0
    assert trainer.distillation_hyperparameters()["pseudo_box_weight"] == 2.0


def test_evaluate_reports_coco_map(tmp_path, labeled, val):
    student, teacher, processor = student_and_teacher()
    trainer = SADTrainer(student, teacher, make_args(tmp_path), labeled, eval_dataset=val, processing_class=processor)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_map", "eval_map_50", "eval_map_75", "eval_map_small", "eval_map_circle"):
        assert key in metrics, key
    assert 0.0 <= metrics["eval_map"] <= 1.0


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, labeled):
    def run(output_dir, resume=None, stop_at=None):
        student, teacher, processor = student_and_teacher()
        args = make_args(tmp_path, output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2)
        trainer = SADTrainer(student, teacher, args, labeled, make_unlabeled_stream(image_size=96),
                             processing_class=processor, callbacks=[StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return student.state_dict(), trainer.state.log_history

    full, full_logs = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=2)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "cut" / "checkpoint-4").exists()
    resumed, resumed_logs = run(tmp_path / "cut", resume=str(checkpoint))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    # The stream continued where it stopped: steps 3-4 saw the same images (history includes steps 1-2).
    assert [e["loss_gt"] for e in full_logs[2:4]] == [e["loss_gt"] for e in resumed_logs[2:4]]
