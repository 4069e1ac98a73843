"""Every Python snippet of the README runs, in a fresh process, in a folder holding the files it names.

The snippets show realistic sizes (512 px, 10,000 steps, pretrained backbones from the Hub); the test runs them with
the few substitutions listed in SUBSTITUTIONS (tiny sizes, no download), each of which must still match the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hf_sad.data import load_coco_detection
from hf_sad.data.synthetic import generate_scene, make_labeled_dataset, write_coco_folder

from .utils import IMAGE_SIZE, REPO, TINY, save_detector, tiny_detector

README = REPO / "README.md"
SUBSTITUTIONS = {
    "pretrained_backbone=True": "pretrained_backbone=False",  # no Hub here
    "image_size=512": f"image_size={IMAGE_SIZE}, " + ", ".join(f"{k}={v}" for k, v in TINY.items()),
    "max_steps=10_000": 'max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True',
}


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with what the snippets name: outputs/demo/student, image.jpg, coco/{train,val}.json with images,
    unlabeled_images/, and a compatible teacher in teacher/."""
    folder = tmp_path_factory.mktemp("readme")
    save_detector(tiny_detector(), folder / "outputs" / "demo" / "student")
    generate_scene(0, image_size=IMAGE_SIZE)[0].save(folder / "image.jpg")
    for split, seed in (("train", 0), ("val", 1)):
        annotations = write_coco_folder(make_labeled_dataset(4, seed=seed, image_size=IMAGE_SIZE), folder / "coco")
        annotations.rename(folder / "coco" / f"{split}.json")
    (folder / "unlabeled_images").mkdir()
    for seed in range(4):
        generate_scene(100 + seed, image_size=IMAGE_SIZE)[0].save(folder / "unlabeled_images" / f"{seed}.png")
    names = load_coco_detection(folder / "coco" / "train.json").features["objects"]["category"].feature.names
    # The snippet's teacher: the data's classes and the default image size of a fresh detector (anchors line up).
    save_detector(tiny_detector(seed=1, id2label=dict(enumerate(names)), image_size=512), folder / "teacher")
    return folder


def test_substitutions_still_match_the_readme():
    text = "\n".join(python_snippets())
    for old in SUBSTITUTIONS:
        assert old in text, f"the README no longer says {old!r}: update SUBSTITUTIONS"


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_python_snippet_runs(workdir, index):
    snippet = python_snippets()[index]
    for old, new in SUBSTITUTIONS.items():
        snippet = snippet.replace(old, new)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(workdir / "cache")}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"snippet {index}:\n{snippet}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
