"""Shared test helpers (not a test module): tiny models, arguments, image files, worker subprocesses.

Every bad or unusual input is generated here with PIL or by hand; nothing is downloaded.
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
from transformers import TrainerCallback

from hf_sad import create_detector
from hf_sad.synthetic import synthetic_id2label
from hf_sad.trainer import SADTrainingArguments

REPO = Path(__file__).resolve().parents[1]
TINY = dict(fpn_channels=8, head_channels=8, head_num_convs=1)
SIZE = {"height": 64, "width": 64}


def tiny_detector(seed: int = 0, **overrides):
    """A ResNet-18 detector with 8-channel pyramid and heads on 64 px images, and its processor."""
    torch.manual_seed(seed)
    id2label = overrides.pop("id2label", synthetic_id2label())
    return create_detector("resnet18", id2label, image_size=SIZE, **{**TINY, **overrides})


def make_args(tmp_path, **kwargs) -> SADTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, distill_loss="none",
    )
    return SADTrainingArguments(**{**defaults, **kwargs})


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
    from hf_sad.synthetic import SYNTHETIC_LABELS

    category = datasets.ClassLabel(names=SYNTHETIC_LABELS) if class_label else datasets.Value("int64")
    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(category)},
    })
    return datasets.Dataset.from_dict({"image": images, "objects": objects}, features=features)


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (the schedule still spans max_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


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
