import os

# Tests never reach the Hub: everything they load is generated here or read from ../shared.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BCCD = SHARED / "datasets" / "bccd"

TINY = {"fpn_channels": 16, "head_channels": 16, "head_num_convs": 1}
LABELS = {0: "circle", 1: "square", 2: "triangle"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_detector():
    """A ResNet-18 detector with 16-channel pyramid and heads (fast on CPU) and its processor."""
    from hf_sad import create_detector

    return create_detector("resnet18", LABELS, image_size={"height": 128, "width": 128}, **TINY)
