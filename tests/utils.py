"""Shared test helpers (not a test module): paths, the tiny model sizes and label maps, tiny models, arguments and CLI
flags, image files and datasets, worker subprocesses.

The tiny sizes are defined here once (`TINY`, `TINY_FLAGS`); a test that needs more capacity or another size passes
an explicit override. Every bad or unusual input is generated here with PIL or by hand; nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou
from transformers import TrainerCallback

from hf_sad import SADForObjectDetection, create_detector
from hf_sad.arguments import SADTrainingArguments
from hf_sad.data.synthetic import SYNTHETIC_LABELS, synthetic_id2label

REPO = Path(__file__).resolve().parents[1]
#: The shared data beside the clone; `make mutation` runs the tests from a copy in mutants/ and says where it is.
SHARED = Path(os.environ.get("HF_SAD_SHARED", REPO.parent / "shared"))
BCCD = SHARED / "datasets" / "bccd"
#: Run as a subprocess (or by torchrun) by the fault tests of test_callbacks.py and test_distributed.py.
FAULT_WORKER = REPO / "tests" / "robust_worker.py"

# ----------------------------------------------------------------------------------------------------------------------
# Tiny sizes and label maps
# ----------------------------------------------------------------------------------------------------------------------

#: The detector every test builds unless it says why it needs more: 8-channel pyramid and heads, one conv per head.
TINY = dict(fpn_channels=8, head_channels=8, head_num_convs=1)
#: `TINY` as `hf-sad` command-line flags.
TINY_FLAGS = [part for name, value in TINY.items() for part in (f"--{name}", str(value))]
#: Images (synthetic datasets and the processor's input size) are IMAGE_SIZE x IMAGE_SIZE pixels.
IMAGE_SIZE = 64
SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}

#: Three classes, for the model tests (logits have exactly 3 columns).
LABELS = {0: "circle", 1: "square", 2: "triangle"}
#: Two classes, for tests where only the label map matters.
TWO_LABELS = {0: "a", 1: "b"}

#: A complete one-step `hf-sad train`/`distill` run on 4 synthetic images: add --output_dir (and --teacher).
TINY_CLI = ["--student", "resnet18", "--train_data", "synthetic:4", "--synthetic_image_size", str(IMAGE_SIZE),
            "--image_size", str(IMAGE_SIZE), *TINY_FLAGS, "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]


def tiny_detector(seed: int = 0, **overrides):
    """A tiny detector and its processor, with weights drawn after `torch.manual_seed(seed)`.

    By default a ResNet-18 with the `TINY` pyramid and heads, the synthetic classes and IMAGE_SIZE px input;
    `overrides` replace `backbone`, `id2label`, `image_size` or set any other `SADConfig` field.
    """
    torch.manual_seed(seed)
    settings = {"backbone": "resnet18", "id2label": synthetic_id2label(), "image_size": SIZE, **TINY, **overrides}
    return create_detector(settings.pop("backbone"), settings.pop("id2label"), **settings)


def student_and_teacher():
    """A tiny student (seed 0) and a wider ResNet-34 teacher (seed 1) with the same classes and anchors."""
    student, processor = tiny_detector()
    # A teacher larger than the student, as in distillation.
    teacher, _ = tiny_detector(seed=1, backbone="resnet34", fpn_channels=24, head_channels=24)
    return student, teacher, processor


def save_detector(detector, folder: Path) -> Path:
    """Save a `(model, processor)` pair where `from_pretrained` finds both; returns the folder."""
    model, processor = detector
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_labels(*boxes_per_image):
    """Per image a list of (class, cx, cy, w, h) normalised -> transformers detection labels."""
    return [
        {
            "class_labels": torch.tensor([b[0] for b in boxes], dtype=torch.long),
            "boxes": torch.tensor([b[1:] for b in boxes], dtype=torch.float32).reshape(-1, 4),
        }
        for boxes in boxes_per_image
    ]


def make_args(tmp_path, **kwargs) -> SADTrainingArguments:
    """Arguments of a short supervised CPU run (`distill_loss="none"`, 2 steps of 4 images); `kwargs` override."""
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, distill_loss="none",
    )
    return SADTrainingArguments(**{**defaults, **kwargs})


def assert_nothing_trained(output_dir: Path) -> None:
    """The output folder holds no weights and no checkpoint (a run that failed before its first step)."""
    found = sorted(p.name for p in output_dir.glob("*")) if output_dir.exists() else []
    assert not [name for name in found if name.startswith("checkpoint") or name.endswith(".safetensors")], found


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (the schedule still spans max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class OracleDetector(SADForObjectDetection):
    """A detector whose output is given, not learned, to check evaluation for exact values.

    Its network runs as usual (the loss and anchors are real), then the classification logits become -20 everywhere
    and each detection of the image is written on an anchor of its own: logit(score) for its class and its box as
    `pred_boxes`. `detections` maps an image id (the labels' `image_id`) to its detections `(x1, y1, x2, y2, class,
    score)` in pixels of the original image; an image it does not list gets its ground truth (crowd regions left
    out) at score 0.9: a perfect detector. Build one with `oracle_detector`.
    """

    def forward(self, pixel_values, pixel_mask=None, labels=None):
        out = super().forward(pixel_values, pixel_mask=pixel_mask, labels=labels)
        if labels is None:
            raise ValueError("OracleDetector needs the labels: its detections are looked up by image_id.")
        logits = torch.full_like(out.logits, -20.0)
        pred_boxes = out.pred_boxes.clone()
        for i, target in enumerate(labels):
            height, width = target["orig_size"].tolist()
            found = self.detections.get(int(target["image_id"]))
            if found is None:
                crowd = target.get("iscrowd", torch.zeros(len(target["boxes"]), dtype=torch.long)).bool()
                rows = zip(target["boxes"][~crowd].tolist(), target["class_labels"][~crowd].tolist())
                found = [((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height,
                          label, 0.9) for (cx, cy, w, h), label in rows]
            for anchor, (x1, y1, x2, y2, label, score) in enumerate(found):
                logits[i, anchor, label] = float(np.log(score / (1 - score)))
                # normalised cx, cy, w, h: relative to the image's valid region, which is the original image resized
                pred_boxes[i, anchor] = torch.tensor(
                    [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height])
        out.logits, out.pred_boxes = logits, pred_boxes
        return out


def oracle_detector(detections: dict[int, list[tuple]] | None = None, **overrides):
    """An `OracleDetector` with `detections` (see there) on the network of `tiny_detector(**overrides)`, and its
    processor."""
    model, processor = tiny_detector(**overrides)
    oracle = OracleDetector(model.config)
    oracle.detections = detections or {}
    return oracle.eval(), processor


def reference_detection_loss(logits, box_regression, anchors, boxes, classes, *, fg=0.5, bg=0.4, alpha=0.25,
                             gamma=2.0, beta=1 / 9):
    """RetinaNet's focal + smooth-L1 loss written out from its definition, image by image, in float64, for checking
    `hf_sad.model.detection_loss` without its own matching or box coding.

    Args: (B, N, C) logits, (B, N, 4) box deltas, (N, 4) xyxy anchors, per image (M, 4) xyxy pixel boxes and (M,)
    classes. Matching: an anchor is positive at IoU >= `fg` with its best box, or when it is a box's best anchor
    (every tie; torchvision's low-quality rule, keeping its own best box); negative below `bg`; ignored in between.
    Returns (focal sum / positives, smooth-L1 sum / positives, positives).
    """
    anchors = anchors.double()
    focal_sum, box_sum, num_positives = 0.0, 0.0, 0
    for logit, deltas, gt, gt_classes in zip(logits.double(), box_regression.double(), boxes, classes):
        gt = gt.double()
        positive = torch.zeros(len(anchors), dtype=torch.bool)
        negative = torch.ones(len(anchors), dtype=torch.bool)
        matched = torch.zeros(len(anchors), dtype=torch.long)
        if len(gt):
            iou = box_iou(gt, anchors)  # (M, N)
            best, matched = iou.max(0)
            positive = best >= fg
            negative = best < bg
            for j in range(len(gt)):
                if iou[j].max() > 0:
                    positive |= iou[j] == iou[j].max()
            negative &= ~positive
        target = torch.zeros_like(logit)
        target[positive, gt_classes[matched[positive]]] = 1.0
        p = torch.sigmoid(logit)
        p_t = torch.where(target == 1, p, 1 - p)
        alpha_t = torch.where(target == 1, alpha, 1 - alpha)
        # -log(p_t) from the logits: softplus(-x) for a positive entry, softplus(x) for a negative one
        nll = torch.nn.functional.softplus(torch.where(target == 1, -logit, logit))
        focal = alpha_t * (1 - p_t) ** gamma * nll
        focal_sum += float(focal[positive | negative].sum())
        if positive.any():
            a, b = anchors[positive], gt[matched[positive]]
            aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
            bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
            encoded = torch.stack([((b[:, 0] + b[:, 2]) - (a[:, 0] + a[:, 2])) / 2 / aw,
                                   ((b[:, 1] + b[:, 3]) - (a[:, 1] + a[:, 3])) / 2 / ah,
                                   torch.log(bw / aw), torch.log(bh / ah)], dim=1)
            diff = (deltas[positive] - encoded).abs()
            box_sum += float(torch.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta).sum())
        num_positives += int(positive.sum())
    divisor = max(1, num_positives)
    return focal_sum / divisor, box_sum / divisor, num_positives


# ----------------------------------------------------------------------------------------------------------------------
# Images and datasets
# ----------------------------------------------------------------------------------------------------------------------

#: A box (COCO x, y, w, h) well inside a 64 px image.
GOOD_BOX = [8.0, 8.0, 20.0, 16.0]


def encode(image: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_kwargs)
    return buffer.getvalue()


def scene(width: int = 48, height: int = 40, colour=(30, 60, 90)) -> Image.Image:
    """A plain RGB picture with a white square, so that decoded pixels can be checked."""
    image = Image.new("RGB", (width, height), colour)
    ImageDraw.Draw(image).rectangle([4, 4, min(width, 20) - 1, min(height, 20) - 1], fill=(255, 255, 255))
    return image


def jpeg(image: Image.Image | None = None, **kwargs) -> bytes:
    return encode(image or scene(), "JPEG", quality=95, **kwargs)


#: Undecodable inputs: name -> bytes (the zero-byte / non-image *files* on disk are made by the tests themselves).
def bad_image_bytes() -> dict[str, bytes]:
    full = jpeg()
    return {
        "corrupt_bytes": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,  # a PNG signature, then garbage
        "truncated_jpeg": full[: len(full) // 2],
        "zero_bytes": b"",
        "not_an_image": b"name,value\nthis is a csv file, not an image\n",
        "random_noise": np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes(),
    }


def unusual_image_bytes() -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Decodable but unusual inputs: name -> (bytes, displayed (width, height))."""
    exif_rotated = Image.new("RGB", (40, 24), (200, 10, 10))
    exif = exif_rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    palette = scene().convert("P")
    return {
        "grayscale": (encode(scene().convert("L"), "PNG"), (48, 40)),
        "bilevel": (encode(scene().convert("1"), "PNG"), (48, 40)),
        "grayscale_alpha": (encode(scene().convert("LA"), "PNG"), (48, 40)),
        "rgba": (encode(scene().convert("RGBA"), "PNG"), (48, 40)),
        "palette": (encode(palette, "PNG"), (48, 40)),
        "palette_transparency": (encode(palette, "PNG", transparency=0), (48, 40)),
        "png_16bit": (encode(Image.fromarray(np.full((40, 48), 40000, np.uint16)), "PNG"), (48, 40)),
        "tiff_float": (encode(Image.fromarray(np.full((40, 48), 0.5, np.float32)), "TIFF"), (48, 40)),
        "cmyk_jpeg": (encode(Image.new("CMYK", (48, 40), (0, 200, 200, 0)), "JPEG"), (48, 40)),
        "exif_rotated_jpeg": (jpeg(exif_rotated, exif=exif.tobytes()), (24, 40)),
        "gif": (encode(scene(), "GIF"), (48, 40)),
        "webp": (encode(scene(), "WEBP"), (48, 40)),
        "bmp": (encode(scene(), "BMP"), (48, 40)),
        "tiny_1x1": (encode(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), (1, 1)),
        "tiny_8x8": (encode(scene(8, 8), "PNG"), (8, 8)),
    }


def image_value(data: bytes, name: str) -> dict:
    """An undecoded datasets image value, as the training stream carries it."""
    return {"bytes": data, "path": f"{name}.img"}


def unlabeled_pool(values: list[dict], streaming: bool):
    """An unlabeled dataset (map-style or streaming) of undecoded images stored as given, bad ones included."""
    features = datasets.Features({"image": datasets.Image()})
    pool = datasets.Dataset.from_dict({"image": values}, features=features)
    if not streaming:
        return pool

    def generate():
        yield from ({"image": value} for value in values)

    return datasets.IterableDataset.from_generator(generate, features=features)


def detection_dataset(images: list[dict], objects: list[dict], class_label: bool = True) -> datasets.Dataset:
    """A labeled dataset in the transformers detection schema from undecoded images and {bbox, category} dicts."""
    category = datasets.ClassLabel(names=SYNTHETIC_LABELS) if class_label else datasets.Value("int64")
    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(category)},
    })
    return datasets.Dataset.from_dict({"image": images, "objects": objects}, features=features)


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses
# ----------------------------------------------------------------------------------------------------------------------


def under_meta_default_device():
    """A context in which a tensor made without naming its device lands on the "meta" device: code that runs the
    same inside it places every tensor it makes on its inputs' device, as running on a GPU needs."""
    return torch.device("meta")


def worker_env(tmp_path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "PYTHONUNBUFFERED": "1"}


def distill_args(teacher: Path, output_dir: Path) -> list[str]:
    """`hf-sad distill` flags of the fault worker's runs: 6 steps of 2 images, a checkpoint every 2 steps."""
    return ["--teacher", str(teacher), "--student", "resnet18", "--image_size", str(IMAGE_SIZE), *TINY_FLAGS,
            "--train_data", "synthetic:8", "--synthetic_image_size", str(IMAGE_SIZE), "--unlabeled_data", "synthetic",
            "--output_dir", str(output_dir), "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--dataloader_num_workers", "0",
            "--use_cpu"]


def start(command: list[str], env: dict) -> subprocess.Popen:
    """Start `command` in the repository root, stdout and stderr together, in its own process group."""
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own process group: killed as a whole on timeout


def finish(process: subprocess.Popen, timeout: float) -> str:
    """The output of a `start`ed process; on timeout its whole process group is killed and the test fails."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args[0]} did not finish in {timeout} s:\n{output[-6000:]}")
    return output
