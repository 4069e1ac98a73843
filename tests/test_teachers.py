"""Teachers beyond one detector (`hf_sad.teachers`): ensemble aggregation (mean, ERA), the ensemble as a teacher,
the mean teacher (EMA of the student: its update rule, gradient accumulation, checkpoints and exact resume, the final
model), the teacher-confidence mask, and the student-only photometric jitter."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_sad.arguments import DistillationArguments
from hf_sad.data.collator import SADDataCollator
from hf_sad.data.synthetic import make_unlabeled_stream
from hf_sad.distillation.losses import binary_entropy
from hf_sad.distillation.sad_loss import sad_loss
from hf_sad.teachers import (
    EMA_TEACHER_FILE,
    SADTeacherEnsemble,
    aggregate_logits,
    teacher_disagreement,
)
from hf_sad.teachers.base import renormalize, teacher_input_transform
from hf_sad.training.trainer import SADTrainer

from .utils import IMAGE_SIZE, StopAt, make_args, save_detector, student_and_teacher, tiny_detector

# float32 sigmoid/log/exp are accurate to a few ulps; the aggregation chains ~6 of them.
PROB_ATOL = 32 * torch.finfo(torch.float32).eps


def test_mean_aggregation_is_the_logit_of_the_mean_probability():
    logits = torch.randn(3, 2, 50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    mean_probability = torch.sigmoid(logits).mean(0)
    aggregated = aggregate_logits(logits.float(), "mean")
    assert aggregated.dtype == torch.float32
    torch.testing.assert_close(torch.sigmoid(aggregated.double()), mean_probability, atol=PROB_ATOL, rtol=0)
    # One teacher: its own logits back.
    torch.testing.assert_close(aggregate_logits(logits[:1].float(), "mean"), logits[0].float(),
                               atol=PROB_ATOL * 8, rtol=8 * torch.finfo(torch.float32).eps)


def test_era_sharpens_each_entry_away_from_one_half_and_stays_finite_when_saturated():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    p = torch.sigmoid(logits).mean(0)
    tau = 0.5
    era = torch.sigmoid(aggregate_logits(logits.float(), "era", tau).double())
    expected = p ** (1 / tau) / (p ** (1 / tau) + (1 - p) ** (1 / tau))
    torch.testing.assert_close(era, expected, atol=PROB_ATOL * 4, rtol=0)
    below = p < 0.5
    assert (era[below] <= p[below]).all() and (era[~below] >= p[~below]).all()
    saturated = torch.tensor([[200.0, -200.0, 30.0], [150.0, -300.0, -30.0]])
    out = aggregate_logits(saturated, "era", 0.1)
    assert torch.isfinite(out).all()
    assert out[0] > 0 and out[1] < 0  # both teachers certain: positive, negative
    assert out[2].abs() < 1e-3  # one certain of each side: p = 0.5


def test_disagreement_is_zero_for_identical_teachers_and_the_std_of_probabilities_otherwise():
    same = torch.randn(1, 10).expand(3, 10)
    assert teacher_disagreement(same) == 0
    two = torch.tensor([[0.0, 0.0], [math.inf, -math.inf]])  # probabilities (0.5, 0.5) vs (1, 0): std 0.25 each
    assert teacher_disagreement(two).item() == pytest.approx(0.25)


def test_ensemble_of_copies_is_the_member_and_members_must_be_compatible():
    member, _ = tiny_detector(seed=3)
    member.eval()
    copy_, _ = tiny_detector(seed=3)
    ensemble = SADTeacherEnsemble([member, copy_.eval()], "mean").eval()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        alone, together = member(pixel_values=pixels), ensemble(pixel_values=pixels)
    torch.testing.assert_close(torch.sigmoid(together.logits), torch.sigmoid(alone.logits), atol=PROB_ATOL, rtol=0)
    torch.testing.assert_close(together.pred_boxes, alone.pred_boxes)
    assert together.teacher_disagreement < PROB_ATOL and ensemble.config is member.config
    with pytest.raises(ValueError, match="at least two teachers"):
        SADTeacherEnsemble([member])
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 2
    with torch.no_grad():
        assert torch.isfinite(ensemble(pixel_values=pixels, labels=labels).loss)


def test_trainer_distils_from_an_ensemble_and_reports_disagreement(tmp_path, labeled):
    student, teacher, processor = student_and_teacher()
    second, _ = tiny_detector(seed=5, backbone="resnet34", fpn_channels=24, head_channels=24)
    args = make_args(tmp_path, distill_loss="adl", max_steps=2, teacher_aggregation="era", era_temperature=0.5,
                     pseudo_label_threshold=0.005)
    trainer = SADTrainer(student, [teacher, second], args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                         eval_dataset=labeled, processing_class=processor)
    assert isinstance(trainer.teacher, SADTeacherEnsemble) and trainer.teacher.aggregation == "era"
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["teacher_disagreement"] > 0 and "loss_distill_unlabeled" in log
    assert 0 <= trainer.evaluate_teacher()["teacher_map"] <= 1
    trainer.create_model_card()
    assert "resnet34, resnet34" in (Path(args.output_dir) / "README.md").read_text()

    other_classes, _ = tiny_detector(id2label={0: "cat", 1: "dog"})
    with pytest.raises(ValueError, match=r"(?s)Teacher 1 \(a model object\): .*not compatible.*classes"):
        SADTrainer(tiny_detector()[0], [teacher, other_classes], args, labeled, processing_class=processor)


class RecordWeights(TrainerCallback):
    """The student's weights after every optimizer step (runs after the mean teacher's update)."""

    def __init__(self, model, name):
        self.model, self.name, self.snapshots = model, name, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.snapshots.append(self.model.state_dict()[self.name].clone())


def ema_run(tmp_path, labeled, **settings):
    student, processor = tiny_detector()
    recorder = RecordWeights(student, "class_head.predictor.weight")
    args = make_args(tmp_path, **{"distill_loss": "adl", "ema_teacher": True, "pseudo_label_threshold": 0.005,
                                  "max_steps": 3, **settings})
    trainer = SADTrainer(student, None, args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                         processing_class=processor, callbacks=[recorder])
    return trainer, recorder


def test_mean_teacher_is_the_exponential_average_of_the_student_after_each_optimizer_step(tmp_path, labeled):
    decay = 0.5
    trainer, recorder = ema_run(tmp_path, labeled, ema_decay=decay, gradient_accumulation_steps=2)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    optimized = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in trainer.teacher.parameters()}
    trainer.train()
    assert int(trainer.teacher.n_averaged) == 3 == len(recorder.snapshots)  # once per optimizer step, not micro-batch
    expected = recorder.snapshots[0]  # the first update copies the student
    for weights in recorder.snapshots[1:]:
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(trainer.teacher.state_dict()["class_head.predictor.weight"], expected)
    assert "loss_distill_unlabeled" in trainer.state.log_history[0]


def test_mean_teacher_is_checkpointed_and_resumes_exactly(tmp_path, labeled):
    def run(output_dir, resume=None, stop_at=None):
        student, processor = tiny_detector()
        args = make_args(tmp_path, output_dir=str(output_dir), distill_loss="adl", ema_teacher=True, ema_decay=0.9,
                         max_steps=4, save_strategy="steps", save_steps=2, pseudo_label_threshold=0.005)
        trainer = SADTrainer(student, None, args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                             processing_class=processor, callbacks=[StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_at=2)
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    saved = load_file(str(checkpoint / EMA_TEACHER_FILE))
    assert int(saved["n_averaged"]) == 2
    assert set(load_file(str(checkpoint / "model.safetensors"))) == set(full.model.state_dict())  # student only
    assert "moving average" in json.loads((checkpoint / "run_settings.json").read_text())["teacher"]
    resumed = run(tmp_path / "cut", resume=str(checkpoint))
    for name, value in full.teacher.average.state_dict().items():
        assert torch.equal(value, resumed.teacher.average.state_dict()[name]), name
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name

    (checkpoint / EMA_TEACHER_FILE).unlink()
    with pytest.raises(ValueError, match=f"has no {EMA_TEACHER_FILE}"):
        run(tmp_path / "cut", resume=str(checkpoint))


def test_mean_teacher_final_model_and_argument_errors(tmp_path, labeled):
    trainer, _ = ema_run(tmp_path, labeled, ema_decay=0.9, ema_final_model=True, max_steps=2)
    trainer.train()
    for name, value in trainer.teacher.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], value), name
    student, teacher, processor = student_and_teacher()
    with pytest.raises(ValueError, match="pass no teacher_model"):
        SADTrainer(student, teacher, make_args(tmp_path, distill_loss="adl", ema_teacher=True), labeled,
                   processing_class=processor)
    with pytest.raises(ValueError, match="ema_final_model"):
        make_args(tmp_path, ema_final_model=True)


def test_confidence_mask_distils_only_anchors_where_the_teacher_is_certain():
    generator = torch.Generator().manual_seed(0)
    student, _ = tiny_detector()
    _, processor = tiny_detector()
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    outputs = student(pixel_values=pixels)
    teacher = type(outputs)(**{k: v.detach() for k, v in outputs.items()})
    teacher.logits = torch.randn(outputs.logits.shape, generator=generator) * 4
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}, {}]
    is_labeled = torch.tensor([True, False])
    common = dict(distill_loss="kl", pseudo_box_weight=0.0, labeled_distill_weight=1.0)

    def loss(**settings):
        args = DistillationArguments(**common, **settings)
        return sad_loss(student.config, outputs, teacher, labels, is_labeled, args, processor)

    unmasked, loose = loss(), loss(teacher_confidence_mask=math.log(2))
    assert loose.metrics["teacher_certain_fraction"] == 1  # no random logit is exactly 0 (entropy ln 2)
    torch.testing.assert_close(loose.loss, unmasked.loss)
    threshold = 0.3
    masked = loss(teacher_confidence_mask=threshold)
    certain = binary_entropy(teacher.logits).amax(-1) < threshold
    assert masked.metrics["teacher_certain_fraction"].item() == pytest.approx(certain.float().mean().item())
    assert 0 < masked.metrics["teacher_certain_fraction"] < 1
    assert masked.metrics["loss_distill_unlabeled"] < unmasked.metrics["loss_distill_unlabeled"]
    with pytest.raises(ValueError, match="teacher_confidence_mask"):
        DistillationArguments(teacher_confidence_mask=0.9)


def test_student_color_jitter_changes_only_the_students_pixels(tmp_path, labeled):
    _, processor = tiny_detector()
    rows = [{**labeled[i], "is_labeled": True, "sample_index": i} for i in range(2)]
    plain = SADDataCollator(processor, seed=0)(rows)
    jittered = SADDataCollator(processor, seed=0, student_color_jitter=0.4)(rows)
    assert torch.equal(jittered["teacher_pixel_values"], plain["pixel_values"])  # same flip and scale
    assert jittered["pixel_values"].shape == plain["pixel_values"].shape
    assert not torch.allclose(jittered["pixel_values"], plain["pixel_values"])
    for a, b in zip(jittered["labels"], plain["labels"]):
        assert torch.equal(a["boxes"], b["boxes"])
    assert "teacher_pixel_values" not in plain

    student, teacher, processor = student_and_teacher()
    trainer = SADTrainer(student, teacher, make_args(tmp_path, distill_loss="adl", student_color_jitter=0.4), labeled,
                         make_unlabeled_stream(image_size=IMAGE_SIZE), processing_class=processor)
    seen = []
    trainer.teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["pixel_values"]),
                                              with_kwargs=True)
    trainer._teacher_forward(jittered, None)
    assert torch.equal(seen[0], jittered["teacher_pixel_values"])
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_a_teacher_normalising_otherwise_sees_the_students_pixels_in_its_own_normalisation(tmp_path, labeled):
    """A CLIP-tower teacher (CLIP's mean and std) and an ImageNet-normalised ResNet student: the teacher gets what its
    own processor would give for the same image."""
    student, processor = tiny_detector()
    teacher, teacher_processor = tiny_detector(
        seed=1, backbone="vit_base_patch16_clip_224",
        backbone_kwargs={"dynamic_img_size": True, "embed_dim": 32, "depth": 3, "num_heads": 2})
    assert teacher_processor.image_mean != processor.image_mean  # CLIP's statistics, from timm
    image = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    as_student = processor(images=[image], return_tensors="pt")["pixel_values"]
    as_teacher = teacher_processor(images=[image], return_tensors="pt")["pixel_values"]
    transform = teacher_input_transform(processor, teacher_processor)
    # float32 affine maps of values O(2): a few ulps.
    torch.testing.assert_close(renormalize(as_student, transform), as_teacher, atol=1e-5, rtol=1e-5)
    assert teacher_input_transform(processor, processor) is None

    folder = save_detector((teacher, teacher_processor), tmp_path / "clip-teacher")
    trainer = SADTrainer(student, str(folder), make_args(tmp_path, distill_loss="adl"), labeled,
                         make_unlabeled_stream(image_size=IMAGE_SIZE), processing_class=processor)
    seen = []
    trainer.teacher.detector.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    trainer._teacher_forward({"pixel_values": as_student}, None)
    torch.testing.assert_close(seen[0], as_teacher, atol=1e-5, rtol=1e-5)
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])
