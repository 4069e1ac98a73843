"""Test environment (offline, quiet tokenizers) and the fixtures several test files share; helpers are in utils.py."""

import os

# Tests never reach the Hub: everything they load is generated here or read from ../shared.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hf_sad.data.synthetic import make_labeled_dataset

from .utils import IMAGE_SIZE, LABELS, bad_image_bytes, image_value, jpeg, save_detector, scene, tiny_detector


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """A tiny ResNet-18 detector with the three `LABELS` classes, and its processor."""
    # 128 px, not IMAGE_SIZE: the model tests feed 128 px tensors, so the processor they save prepares that size.
    return tiny_detector(id2label=LABELS, image_size={"height": 128, "width": 128})


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    """8 synthetic labeled images of IMAGE_SIZE px (the transformers detection schema, with ClassLabel categories)."""
    return make_labeled_dataset(8, seed=0, image_size=IMAGE_SIZE, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def picture():
    """An undecoded IMAGE_SIZE px JPEG named 'picture.img'."""
    return image_value(jpeg(scene(IMAGE_SIZE, IMAGE_SIZE)), "picture")


@pytest.fixture(scope="module")
def bad_values(tmp_path_factory):
    """Every undecodable input: in-memory bytes, plus a zero-byte file and a text file on disk (path only)."""
    folder = tmp_path_factory.mktemp("bad_files")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image, despite the name\n")
    values = {name: image_value(data, name) for name, data in bad_image_bytes().items()}
    values["zero_byte_file"] = {"bytes": None, "path": str(folder / "empty.jpg")}
    values["text_file"] = {"bytes": None, "path": str(folder / "notes.png")}
    return values


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    """A tiny teacher (seed 1) saved with its processor, for `hf-sad distill --teacher`."""
    return save_detector(tiny_detector(seed=1), tmp_path_factory.mktemp("teacher"))
