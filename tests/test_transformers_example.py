"""An hf-sad detector in transformers' own tools: what `examples/pytorch/object-detection/run_object_detection.py`
does, done here by a test of our own (the example itself is not copied), and the conventions it relies on.

The example loads any `AutoModelForObjectDetection` with `trust_remote_code`, re-heads it for its dataset's classes
(`ignore_mismatched_sizes`), calls the image processor with COCO `annotations=`, `size={"max_height", "max_width"}`
and a fixed `pad_size`, drops `pixel_mask`, trains with a plain `Trainer`, and computes torchmetrics' mAP from its own
dataclass holding `.logits` / `.pred_boxes`, post-processed by the model's image processor.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass

import torch
from PIL import Image

from hf_sad.data import load_coco_detection

from .utils import BCCD, IMAGE_SIZE, TWO_LABELS, save_detector, tiny_detector

SIZE = 128  # the example's `image_square_size`: the 640x480 BCCD images become 128x96, padded to 128x128


@dataclass
class PlainOutput:
    """The kind of object the example hands to post_process_object_detection."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor


def _non_square_batch(processor):
    """Two non-square images (203x151, 151x203) with one box each, processed the example's way."""
    images, annotations = [], []
    for index, (width, height) in enumerate([(203, 151), (151, 203)]):
        images.append(Image.new("RGB", (width, height), (40 * index, 90, 160)))
        bbox = [0.2 * width, 0.3 * height, 0.5 * width, 0.4 * height]
        annotations.append({"image_id": index, "annotations": [
            {"image_id": index, "category_id": index, "iscrowd": 0, "area": bbox[2] * bbox[3], "bbox": bbox}]})
    return processor(images=images, annotations=annotations, return_tensors="pt")


def test_boxes_and_targets_agree_with_or_without_pixel_mask():
    """Dropping pixel_mask (as the example does) changes neither the training targets nor the boxes: the model then
    takes each image's unpadded size from its labels (`size`, written by the processor)."""
    model, processor = tiny_detector(id2label=TWO_LABELS, image_size={"max_height": SIZE, "max_width": SIZE})
    processor.pad_size = {"height": SIZE, "width": SIZE}
    batch = _non_square_batch(processor)
    assert batch["pixel_values"].shape[-2:] == (SIZE, SIZE)
    assert [label["size"].tolist() for label in batch["labels"]] == [[95, 128], [128, 95]]  # padded to 128 x 128
    model.eval()
    with torch.no_grad():
        masked = model(batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        unmasked = model(batch["pixel_values"], labels=batch["labels"])
    torch.testing.assert_close(unmasked.image_sizes, masked.image_sizes, rtol=0, atol=0)
    torch.testing.assert_close(unmasked.pred_boxes, masked.pred_boxes, rtol=0, atol=0)
    torch.testing.assert_close(unmasked.loss, masked.loss, rtol=0, atol=0)

    original_sizes = [(151, 203), (203, 151)]
    detections = [
        processor.post_process_object_detection(PlainOutput(out.logits, out.pred_boxes), threshold=0.0,
                                                target_sizes=original_sizes)
        for out in (masked, unmasked)
    ]
    for with_mask, without_mask, (height, width) in zip(*detections, original_sizes):
        assert len(with_mask["boxes"]) > 0
        torch.testing.assert_close(without_mask["boxes"], with_mask["boxes"], rtol=0, atol=0)
        # absolute boxes of the original image: inside it
        assert (with_mask["boxes"][:, 2] <= width).all() and (with_mask["boxes"][:, 3] <= height).all()


def test_post_process_accepts_a_dataclass_with_logits_and_pred_boxes():
    model, processor = tiny_detector()
    sizes = [(IMAGE_SIZE, IMAGE_SIZE)]
    with torch.no_grad():
        out = model(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    from_model = processor.post_process_object_detection(out, threshold=0.0, target_sizes=sizes)
    from_plain = processor.post_process_object_detection(PlainOutput(out.logits, out.pred_boxes), threshold=0.0,
                                                         target_sizes=sizes)
    for key in ("scores", "labels", "boxes"):
        assert torch.equal(from_plain[0][key], from_model[0][key]), key


EXAMPLE_FLOW = """
import math, sys
sys.modules["hf_sad"] = None  # only the model folder's own code can load it
from dataclasses import dataclass
import numpy as np
import torch
from datasets import load_from_disk
from torchmetrics.detection.mean_ap import MeanAveragePrecision
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, Trainer, TrainingArguments,
                          pipeline)
from transformers.image_transforms import center_to_corners_format

model_dir, data_dir, output_dir, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dataset = load_from_disk(data_dir)
names = dataset.features["objects"]["category"].feature.names  # datasets 5: `objects` is a dict of lists
id2label = dict(enumerate(names))
label2id = {v: k for k, v in id2label.items()}
config = AutoConfig.from_pretrained(model_dir, id2label=id2label, label2id=label2id, trust_remote_code=True)
model = AutoModelForObjectDetection.from_pretrained(model_dir, config=config, ignore_mismatched_sizes=True,
                                                    trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
processor = AutoImageProcessor.from_pretrained(
    model_dir, do_resize=True, size={"max_height": size, "max_width": size}, do_pad=True,
    pad_size={"height": size, "width": size}, use_fast=True, trust_remote_code=True)

def transform(examples):
    images, annotations = [], []
    for image_id, image, objects in zip(examples["image_id"], examples["image"], examples["objects"]):
        images.append(np.array(image.convert("RGB")))
        annotations.append({"image_id": image_id, "annotations": [
            {"image_id": image_id, "category_id": c, "iscrowd": 0, "area": a, "bbox": list(b)}
            for c, a, b in zip(objects["category"], objects["area"], objects["bbox"])]})
    result = processor(images=images, annotations=annotations, return_tensors="pt")
    result.pop("pixel_mask", None)  # the example drops it
    return result

def collate(batch):
    return {"pixel_values": torch.stack([x["pixel_values"] for x in batch]), "labels": [x["labels"] for x in batch]}

@dataclass
class Output:
    logits: torch.Tensor
    pred_boxes: torch.Tensor

calls = []

@torch.no_grad()
def compute_metrics(evaluation):
    predictions, targets = evaluation.predictions, evaluation.label_ids
    sizes, post_targets, post_predictions = [], [], []
    for batch in targets:
        sizes.append(torch.tensor(np.array([x["orig_size"] for x in batch])))
        for target in batch:
            height, width = target["orig_size"]
            boxes = center_to_corners_format(torch.tensor(target["boxes"]))
            boxes = boxes * torch.tensor([[width, height, width, height]])
            post_targets.append({"boxes": boxes, "labels": torch.tensor(target["class_labels"])})
    for batch, target_sizes in zip(predictions, sizes):
        output = Output(logits=torch.tensor(batch[1]), pred_boxes=torch.tensor(batch[2]))
        post_predictions += processor.post_process_object_detection(output, threshold=0.0, target_sizes=target_sizes)
    metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    metric.update(post_predictions, post_targets)
    result = metric.compute()
    calls.append(len(post_predictions))
    return {"map": result["map"].item(), "map_50": result["map_50"].item()}

train = dataset.select(range(6)).with_transform(transform)
val = dataset.select(range(6, 10)).with_transform(transform)
args = TrainingArguments(output_dir=output_dir, max_steps=3, per_device_train_batch_size=2,
                         per_device_eval_batch_size=2, learning_rate=1e-3, eval_do_concat_batches=False,
                         remove_unused_columns=False, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=processor,
                  data_collator=collate, compute_metrics=compute_metrics)
losses = trainer.train().training_loss
trainer.save_model()
metrics = trainer.evaluate()
assert calls == [4], calls
assert math.isfinite(losses) and math.isfinite(metrics["eval_loss"]), (losses, metrics)
assert 0.0 <= metrics["eval_map"] <= 1.0, metrics
trainer.create_model_card(finetuned_from=model_dir, dataset="bccd", tags=["object-detection"])

reloaded = pipeline("object-detection", model=output_dir, trust_remote_code=True)
found = reloaded(dataset[0]["image"], threshold=0.0)
assert found and {d["label"] for d in found} <= set(names), found
print("OK", type(model).__name__, sorted(metrics))
"""


def test_transformers_object_detection_example_flow_with_remote_code(tmp_path):
    """Re-head, train, evaluate (torchmetrics through our processor), save and reload a saved SAD detector the way
    transformers' example does, in a process where hf_sad cannot be imported."""
    save_detector(tiny_detector(id2label=TWO_LABELS), tmp_path / "pretrained")  # 2 classes; BCCD has 3
    load_coco_detection(BCCD / "val.json").select(range(10)).save_to_disk(str(tmp_path / "data"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXAMPLE_FLOW), str(tmp_path / "pretrained"), str(tmp_path / "data"),
         str(tmp_path / "out"), str(SIZE)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "\nOK SADForObjectDetection" in result.stdout, result.stdout
    saved = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_sad.py", "box_ops.py",
            "detection_loss.py", "README.md"} <= saved, saved


def test_pipeline_name_table_shim_is_still_needed(tmp_path):
    """`import hf_sad` adds SAD to transformers' static object-detection name table, its one shim beyond the
    registration APIs (see hf_sad/__init__.py). Without that entry the pipeline logs "not supported" for a registered
    model; once transformers stops doing so, this test fails: then remove the shim."""
    save_detector(tiny_detector(), tmp_path)
    script = textwrap.dedent(f"""
        import hf_sad
        from transformers import pipeline
        from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
        del MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES["sad"]  # undo the shim
        pipeline("object-detection", model=r"{tmp_path}")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is not supported for object-detection" in result.stdout + result.stderr, (
        "transformers no longer needs the name-table shim in hf_sad/__init__.py: remove it"
    )
