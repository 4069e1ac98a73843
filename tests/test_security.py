"""Security: weights only through safetensors, no unpickling in our code, no token or local path in saved files.

One real `hf-sad distill` run in a subprocess (the CLI entry point, logging at INFO) with `--hub_token` set, an
evaluation set, a teacher in a local temporary folder and a checkpoint at every step; then:
- every file under the output folder (checkpoints, `training_args.bin`, `trainer_state.json`, card, results) and the
  whole console output is searched for the token's bytes: transformers' `to_dict` redacts `*_token` fields, but
  `torch.save(args)` (`training_args.bin`) pickles the object itself, so `SADTrainingArguments.__getstate__` drops it;
- the model weights are `model.safetensors` only, and `from_pretrained` loads them with `torch.load` disabled;
- configs, processor config, card and results carry no local absolute path (transformers 5.24 writes no
  `_name_or_path`), and what `push_to_hub` would upload excludes the files that do (`trainer_state.json`, checkpoints);
- our sources (src/, scripts/) never unpickle: every `torch.load` has `weights_only=True` (there is none today), no
  pickle/dill/joblib/shelve/marshal, no `numpy.load(allow_pickle=True)`, no `trust_remote_code=True`, no eval/exec.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_sad.hub import files_to_upload

from .utils import REPO, TINY_FLAGS, save_detector, tiny_detector

TOKEN = "hf_RobustnessTestToken0123456789abcdef"
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    save_detector(tiny_detector(seed=1), root / "teacher")
    output_dir = root / "student"
    argv = ["distill", "--teacher", str(root / "teacher"), "--student", "resnet18", "--image_size", "64", *TINY_FLAGS,
            "--train_data", "synthetic:4", "--eval_data", "synthetic-val:2", "--unlabeled_data", "synthetic",
            "--synthetic_image_size", "64", "--output_dir", str(output_dir), "--max_steps", "2",
            "--per_device_train_batch_size", "2",
            "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", "--report_to", "none",
            "--use_cpu", "--disable_tqdm", "true", "--hub_token", TOKEN, "--log_level", "info"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(root / "datasets-cache")}
    env.pop("HF_TOKEN", None)
    process = subprocess.run([sys.executable, "-c", "import sys; from hf_sad.cli import main; main(sys.argv[1:])",
                              *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert process.returncode == 0, process.stderr[-4000:]
    return {"root": root, "output_dir": output_dir, "console": process.stdout + process.stderr}


def test_hub_token_is_never_written_nor_logged(cli_run):
    output_dir = cli_run["output_dir"]
    files = [p for p in output_dir.rglob("*") if p.is_file()]
    assert (output_dir / "training_args.bin").exists() and (output_dir / "checkpoint-1" / "training_args.bin").exists()
    leaked = [str(p.relative_to(output_dir)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaked, f"files containing the token: {leaked}"
    assert TOKEN not in cli_run["console"]
    assert "Training" in cli_run["console"]  # the console output was really captured
    # Our own file from this test, so loading the pickle is safe here: the arguments are intact, the token is not.
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.output_dir == str(output_dir) and args.max_steps == 2
    assert "<HUB_TOKEN>" in args.to_json_string()


def test_weights_are_saved_and_loaded_only_as_safetensors(cli_run, monkeypatch):
    output_dir = cli_run["output_dir"]
    for folder in (output_dir, output_dir / "checkpoint-2"):
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("pytorch_model*.bin")) and not list(folder.glob("*.ckpt"))

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called while loading a saved model")

    monkeypatch.setattr(torch, "load", refuse)
    model = AutoModelForObjectDetection.from_pretrained(output_dir)
    AutoImageProcessor.from_pretrained(output_dir)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_saved_configs_card_and_results_carry_no_local_paths(cli_run, tmp_path):
    output_dir, root = cli_run["output_dir"], cli_run["root"]
    published = files_to_upload(output_dir)
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "README.md"} <= set(published)
    assert not [f for f in published if f.startswith("checkpoint-") or f.endswith((".bin", ".pt", ".pth"))]
    assert "trainer_state.json" not in published  # it holds local paths (best_model_checkpoint, ...)
    local = [str(root), str(Path.home()) + "/", "/tmp/"]
    for name in ["config.json", "preprocessor_config.json", "README.md", "results.json"]:
        text = (output_dir / name).read_text()
        assert not [p for p in local if p in text], (name, [p for p in local if p in text])

    # A model loaded from one temporary folder and saved to another records neither folder.
    model = AutoModelForObjectDetection.from_pretrained(output_dir)
    model.save_pretrained(tmp_path / "again")
    config = (tmp_path / "again" / "config.json").read_text()
    assert "_name_or_path" not in config and str(output_dir) not in config and str(tmp_path) not in config


def _constant(keywords: dict, key: str):
    """The value of a literal keyword argument (None when absent or not a literal)."""
    value = keywords.get(key)
    return value.value if isinstance(value, ast.Constant) else None


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Unpickling and remote-code patterns in one Python source (an AST walk, so comments and docs do not count)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func, keywords = node.func, {k.arg: k.value for k in node.keywords}
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            if name == "load" and owner == "torch" and _constant(keywords, "weights_only") is not True:
                found.append(f"{where} torch.load without weights_only=True")
            if name == "load" and owner in ("np", "numpy") and _constant(keywords, "allow_pickle"):
                found.append(f"{where} numpy.load(allow_pickle=True)")
            if name == "read_pickle":
                found.append(f"{where} read_pickle")
            if _constant(keywords, "trust_remote_code") is True:
                found.append(f"{where} trust_remote_code=True")
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                found.append(f"{where} {func.id}()")
    return found


def test_the_unsafe_pattern_checker_finds_what_it_looks_for():
    bad = ("import pickle\nimport torch, numpy as np\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
           "np.load('y', allow_pickle=True)\nf(trust_remote_code=True)\neval('1')\nfrom dill import loads\n")
    assert len(unsafe_calls(bad, "bad.py")) == 7
    assert unsafe_calls("import torch\ntorch.load('x', weights_only=True)\nmodel.eval()\n", "good.py") == []


def test_our_sources_never_unpickle_or_trust_remote_code():
    sources = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    assert len(sources) > 10
    found = [hit for path in sources for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert not found, found
