"""Transformers detectors of other kinds as teachers (`hf_sad.teachers.transformers_detector`): the probability rule,
the dense targets on the student's anchors and the pseudo-boxes that come back out of them, the student's image
handed to the teacher's processor, tiny randomly initialised DETR and OWL-ViT teachers driving distillation, class
mapping, and an oracle teacher (the ground truth with probability 1) against supervised training."""

import json
import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, box_iou
from transformers import (
    CLIPTokenizer,
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    OwlViTConfig,
    OwlViTForObjectDetection,
    OwlViTImageProcessor,
    OwlViTProcessor,
    ResNetConfig,
)

from hf_sad.arguments import DistillationArguments
from hf_sad.data.collator import SADDataCollator
from hf_sad.data.synthetic import SYNTHETIC_LABELS, make_labeled_dataset, make_unlabeled_stream
from hf_sad.distillation.sad_loss import hard_pseudo_labels, sad_loss
from hf_sad.model.modeling_sad import SADObjectDetectionOutput, predicted_boxes
from hf_sad.teachers.transformers_detector import TransformersDetectorTeacher, teacher_probabilities
from hf_sad.training.trainer import SADTrainer

from .utils import IMAGE_SIZE, make_args, tiny_detector


def tiny_detr(labels=SYNTHETIC_LABELS, seed=0) -> DetrForObjectDetection:
    torch.manual_seed(seed)
    config = DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False,
        backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 16], depths=[1, 1, 1, 1],
                                     out_features=["stage4"]),
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=10,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )
    return DetrForObjectDetection(config).eval()


def detr_processor() -> DetrImageProcessor:
    return DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    """A tiny OWL-ViT and its processor, with a CLIP tokenizer built from a letters-only vocabulary."""
    folder = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=16)
    torch.manual_seed(0)
    config = OwlViTConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    size = {"height": 32, "width": 32}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tokenizer)
    return OwlViTForObjectDetection(config).eval(), processor


def test_probabilities_softmax_without_no_object_or_sigmoid():
    logits = torch.randn(2, 5, 4)
    softmax = teacher_probabilities(logits, num_labels=3, open_vocabulary=False)
    torch.testing.assert_close(softmax, logits.softmax(-1)[..., :3])
    torch.testing.assert_close(teacher_probabilities(logits, num_labels=4, open_vocabulary=False), logits.sigmoid())
    torch.testing.assert_close(teacher_probabilities(logits, num_labels=3, open_vocabulary=True), logits.sigmoid())


def detr_teacher_on_student_anchors():
    """A tiny DETR teacher of a tiny student, the student's processor, and its (N, 4) anchors on one input."""
    student, processor = tiny_detector()
    teacher = TransformersDetectorTeacher(tiny_detr(), detr_processor(), student.config, processor)
    with torch.no_grad():
        anchors = student(pixel_values=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)).anchors
    return teacher, processor, anchors


def test_dense_targets_follow_the_students_matching_and_give_the_boxes_back_as_pseudo_boxes():
    teacher, processor, anchors = detr_teacher_on_student_anchors()
    inside = ((anchors >= 0) & (anchors <= IMAGE_SIZE)).all(1).nonzero().flatten()
    index = int(inside[len(inside) // 2])
    box = anchors[index].clone()  # exactly an anchor inside the image: IoU 1 with it
    probabilities = torch.zeros(1, 1, len(SYNTHETIC_LABELS))
    probabilities[0, 0, 2] = 0.9
    logits, deltas = teacher.dense_targets(box[None, None], probabilities, anchors)
    q = torch.sigmoid(logits[0])
    ramp = ((box_iou(box[None], anchors)[0] - 0.4) / 0.1).clamp(0, 1)  # fg 0.5, bg 0.4
    floor = teacher.background_probability
    torch.testing.assert_close(q[:, 2], (0.9 * ramp).clamp(min=floor), atol=1e-6, rtol=1e-5)
    assert torch.allclose(q[:, [0, 1, 3, 4, 5]], torch.tensor(floor), rtol=1e-4)  # other classes: background
    reached = ramp > 0
    assert torch.equal(deltas[0, ~reached], torch.zeros_like(deltas[0, ~reached]))
    assert deltas[0, index].abs().max() < 1e-6  # the box is that anchor
    # Through the student's own post-processing the teacher's box comes back, with its probability.
    sizes = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]], dtype=torch.float32)
    outputs = SADObjectDetectionOutput(logits=logits, pred_boxes=predicted_boxes(deltas, anchors, sizes))
    (found,) = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=sizes)
    assert found["labels"].tolist() == [2] and found["scores"].tolist() == pytest.approx([0.9], rel=1e-5)
    torch.testing.assert_close(found["boxes"][0], box, atol=1e-3, rtol=0)


def test_a_box_no_anchor_matches_well_still_teaches_its_best_anchor_as_the_students_matching_does():
    teacher, processor, anchors = detr_teacher_on_student_anchors()
    box = torch.tensor([[[30.0, 30.0, 34.0, 34.0]]])  # 4 px: IoU far below 0.4 with every anchor
    iou = box_iou(box[0], anchors)[0]
    assert iou.max() < 0.4
    probabilities = torch.zeros(1, 1, len(SYNTHETIC_LABELS))
    probabilities[0, 0, 1] = 0.8
    logits, _ = teacher.dense_targets(box, probabilities, anchors)
    q = torch.sigmoid(logits[0, :, 1])
    best = iou == iou.max()
    torch.testing.assert_close(q[best], torch.full_like(q[best], 0.8))
    assert (q[~best] < 1e-3).all()


def test_the_teacher_sees_the_students_image_unnormalised():
    student, processor = tiny_detector()
    teacher = TransformersDetectorTeacher(tiny_detr(), detr_processor(), student.config, processor)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    batch = processor(images=[image], return_tensors="pt")
    sizes = torch.tensor([[batch["pixel_mask"][0].any(1).sum(), batch["pixel_mask"][0].any(0).sum()]])
    (seen,) = teacher._student_images(batch["pixel_values"], sizes)
    resized = processor(images=[image], return_tensors="pt", do_normalize=False, do_pad=False)["pixel_values"][0]
    torch.testing.assert_close(seen, resized.clamp(0, 1), atol=1e-5, rtol=0)


def test_classes_map_by_name_with_renames_and_unmapped_classes_are_errors():
    student, processor = tiny_detector()
    renamed = ["ball", *SYNTHETIC_LABELS[1:], "extra"]
    with pytest.raises(ValueError, match=r"Student classes 'circle' are not classes of the teacher.*teacher_label_map"):
        TransformersDetectorTeacher(tiny_detr(renamed), detr_processor(), student.config, processor)
    teacher = TransformersDetectorTeacher(tiny_detr(renamed), detr_processor(), student.config, processor,
                                          label_map={"circle": "ball"})
    assert teacher.class_index.tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"renames \['dog'\], which are not student classes"):
        TransformersDetectorTeacher(tiny_detr(renamed), detr_processor(), student.config, processor,
                                    label_map={"dog": "ball"})


@pytest.mark.parametrize("kind", ["detr", "detr-folder", "owlvit"])
def test_a_transformers_detector_teaches_a_student(tmp_path, labeled, owl, kind):
    student, processor = tiny_detector()
    teacher, teacher_processor = (tiny_detr(), detr_processor()) if kind.startswith("detr") else owl
    if kind == "detr-folder":  # a saved checkpoint, as `--teacher PATH` gives it: model and processor loaded from it
        teacher.save_pretrained(tmp_path / "detr")
        teacher_processor.save_pretrained(tmp_path / "detr")
        teacher, teacher_processor = str(tmp_path / "detr"), None
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = make_args(tmp_path, distill_loss="adl", max_steps=2, pseudo_label_threshold=0.01)
    trainer = SADTrainer(student, teacher, args, labeled, make_unlabeled_stream(image_size=IMAGE_SIZE),
                         eval_dataset=labeled, processing_class=processor, teacher_processor=teacher_processor)
    assert isinstance(trainer.teacher, TransformersDetectorTeacher)
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and "loss_distill_unlabeled" in log and "pseudo_boxes_per_image" in log
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert 0 <= trainer.evaluate_teacher()["teacher_map"] <= 1
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"(backbone `{kind.split('-')[0]}`)" in card  # these tiny configs name no backbone: the model type


def test_a_teacher_without_a_saved_processor_gets_its_model_types_default(owl):
    student, processor = tiny_detector()
    teacher = TransformersDetectorTeacher(tiny_detr(), None, student.config, processor)
    assert isinstance(teacher.processor, DetrImageProcessor)


def test_open_vocabulary_teacher_without_a_processor_is_a_clear_error(owl):
    student, processor = tiny_detector()
    with pytest.raises(ValueError, match="owlvit teacher has no saved processor.*teacher_processor"):
        TransformersDetectorTeacher(owl[0], None, student.config, processor)


class OracleDetector(torch.nn.Module):
    """A DETR-shaped detector that knows the ground truth: for an image it has seen (by its pixels), one query per
    true box with probability 1 for its class, the other queries "no object"."""

    def __init__(self, config, truth: dict[bytes, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.config, self.truth, self.name_or_path = config, truth, ""
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a dtype and device to follow

    def forward(self, pixel_values, pixel_mask=None):
        num_queries, num_classes = 20, self.config.num_labels
        logits = torch.full((len(pixel_values), num_queries, num_classes + 1), -20.0)
        logits[..., -1] = 20.0
        boxes = torch.full((len(pixel_values), num_queries, 4), 0.5)
        for i, image in enumerate(pixel_values):
            classes, normalised = self.truth[_key(image)]
            logits[i, : len(classes)] = -20.0
            logits[i, torch.arange(len(classes)), classes] = 20.0
            boxes[i, : len(classes)] = normalised
        return type("Output", (), {"logits": logits, "pred_boxes": boxes})()


def _key(image: torch.Tensor) -> bytes:
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


def test_oracle_teacher_gives_unlabeled_images_the_loss_their_labels_give(labeled):
    """A teacher that returns the true boxes with probability 1: on the same images, unlabeled, its pseudo-boxes are
    the true boxes and the loss against them equals the supervised loss with the labels (what `sad_loss` adds on top
    is the soft term)."""
    student, processor = tiny_detector()
    rows = [labeled[i] for i in range(4)]
    batch = SADDataCollator(processor)(rows)
    with torch.no_grad():
        outputs = student(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    adapter = TransformersDetectorTeacher(OracleDetector(tiny_detr().config, {}), DetrImageProcessor(
        do_resize=False, do_normalize=False, do_pad=False), student.config, processor)
    for image, label in zip(adapter._student_images(batch["pixel_values"], outputs.image_sizes), batch["labels"]):
        adapter.model.truth[_key(image)] = (label["class_labels"], label["boxes"])
    teacher = adapter(batch["pixel_values"], anchors=outputs.anchors, image_sizes=outputs.image_sizes)
    outputs = student(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    pseudo = hard_pseudo_labels(teacher.detections(), processor, 0.5)
    for found, label in zip(pseudo, batch["labels"]):
        order = torch.argsort(found["class_labels"] * 10 + found["boxes"][:, 0])
        expected = torch.argsort(label["class_labels"] * 10 + label["boxes"][:, 0])
        assert torch.equal(found["class_labels"][order], label["class_labels"][expected])
        torch.testing.assert_close(found["boxes"][order], label["boxes"][expected], atol=1e-4, rtol=0)
    everything = torch.ones(4, dtype=torch.bool)
    args = DistillationArguments(distill_loss="kl", pseudo_box_loss="full")
    supervised = sad_loss(student.config, outputs, None, batch["labels"], everything, args, processor)
    unlabeled = sad_loss(student.config, outputs, teacher, [{}] * 4, ~everything, args, processor)
    torch.testing.assert_close(unlabeled.metrics["loss_pseudo"], supervised.metrics["loss_gt"], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_oracle_teacher_on_unlabeled_images_trains_as_well_as_their_labels(tmp_path):
    """The same images, once labeled (supervised) and once unlabeled with a teacher that returns their true boxes
    with probability 1: the distilled student is at least as good, up to run-to-run noise."""
    size = 128  # objects of 16-40 px: the tiny student learns them within a few hundred steps
    images = make_labeled_dataset(64, seed=0, image_size=size, cache_dir=str(tmp_path / "c1"))
    val = make_labeled_dataset(48, seed=1, image_size=size, cache_dir=str(tmp_path / "c2"))
    truth = {}
    for row in images:  # scenes of the model's size: the collator's resize keeps their pixels
        pixels = torch.from_numpy(np.array(row["image"].convert("RGB"))).permute(2, 0, 1)
        h, w = row["height"], row["width"]
        xywh = torch.tensor(row["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4)
        boxes = box_convert(xywh, "xywh", "cxcywh") / torch.tensor([w, h, w, h])
        truth[pixels.numpy().tobytes()] = (torch.tensor(row["objects"]["category"]), boxes)
    oracle = OracleDetector(tiny_detr().config, truth)
    same_view = dict(hflip_prob=0.0, scale_jitter=[1.0, 1.0], max_steps=400, learning_rate=3e-3,
                     per_device_train_batch_size=4, lr_scheduler_type="cosine", warmup_steps=20)
    results = {}
    for name in ("supervised", "oracle"):
        student, processor = tiny_detector(seed=2, image_size=size, fpn_channels=32, head_channels=32,
                                           head_num_convs=2)
        if name == "supervised":
            args = make_args(tmp_path / name, distill_loss="none", **same_view)
            trainer = SADTrainer(student, None, args, images, eval_dataset=val, processing_class=processor)
        else:
            # One labeled image keeps the stream's labeled part alive; the rest are the unlabeled images.
            args = make_args(tmp_path / name, distill_loss="kl", unlabeled_ratio=0.98, **same_view)
            unlabeled = images.remove_columns(["objects"])
            plain = DetrImageProcessor(do_resize=False, do_normalize=False, do_pad=False, do_rescale=False)
            trainer = SADTrainer(student, oracle, args, images.select([0]), unlabeled, eval_dataset=val,
                                 processing_class=processor, teacher_processor=plain)
        trainer.train()
        results[name] = trainer.evaluate()["eval_map"]
    assert results["supervised"] > 0.02, results  # the task is learned at all (a fresh student scores ~0.001)
    assert results["oracle"] >= results["supervised"] - 0.01, results  # at least as well, up to run noise
    assert np.isfinite(list(results.values())).all()
