"""Model cards and pushing students to the Hub (`hf_sad.hub`).

No Hub is reachable here. The end-to-end test pushes to and pulls from `tests/hub_server.py`, a small server on
127.0.0.1 that stands in for the Hub's HTTP *protocol* (repo creation, preupload, LFS batch + PUT, NDJSON commits,
resolve, tree), not for the Hub itself. huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import and pytest has
already imported it offline (conftest), so the client side runs in subprocesses with their own environment.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file

from hf_sad.hub import (
    card_template,
    create_model_card,
    files_to_upload,
    is_hub_id,
    push_to_hub,
    write_exports_into_card,
)

from .hub_server import HubServer
from .utils import IMAGE_SIZE, REPO, TINY_FLAGS, TWO_LABELS, save_detector, tiny_detector

HYPERPARAMETERS = {
    "distill_loss": "adl",
    "adl_beta": 1.0,
    "adl_gamma": 2.0,
    "temperature": 1.0,
    "normalizer": "adaptive",
    "unlabeled_ratio": 0.5,
    "steps": 3000,
    "lr": 0.01,
    "image_size": {"height": 320, "width": 320},
}
STUDENT = {"map": 0.3512, "map_50": 0.6021, "map_75": 0.3333, "map_small": float("nan")}
# Absolute paths of this machine's usual roots; none may appear in a published card.
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:tmp|home|root|work|Users|var|mnt|data|opt)\b")


def _card(**overrides) -> ModelCard:
    kwargs = dict(
        model_name="sad-resnet18-cells",
        id2label={0: "RBC", 1: "WBC", 2: "Platelets"},
        backbone="resnet18",
        teacher="org/sad-resnet50-teacher",
        teacher_backbone="resnet50",
        datasets=["org/cells", "org/unlabeled-cells"],
        metrics={f"eval_{k}": v for k, v in STUDENT.items()},
        teacher_metrics={"map": 0.3811, "map_50": 0.65},
        baseline_metrics={"map": 0.3102},
        hyperparameters=HYPERPARAMETERS,
        dataset_name="org/cells",
        repo_id="someone/sad-resnet18-cells",
    )
    return create_model_card(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------------------- model card


def test_card_metadata():
    card = ModelCard(str(_card()))  # parse the rendered text back, as the Hub does
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "object-detection"
    assert data["library_name"] == "transformers"
    assert {"hf-sad", "object-detection", "knowledge-distillation", "semi-supervised", "retinanet"} <= set(data["tags"])
    assert data["base_model"] == "org/sad-resnet50-teacher"
    assert data["datasets"] == ["org/cells", "org/unlabeled-cells"]
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"mAP", "mAP@50", "mAP@75"}  # NaN metrics are left out
    assert {r.task_type for r in results.values()} == {"object-detection"}
    assert {r.metric_type for r in results.values()} == {"mAP"}
    assert {r.dataset_type for r in results.values()} == {"org/cells"}
    # Published in percent, everywhere in the card.
    assert results["mAP"].metric_value == pytest.approx(35.12)
    assert results["mAP@50"].metric_value == pytest.approx(60.21)
    assert card.data.model_name == "sad-resnet18-cells"


def test_card_body():
    text = str(_card())
    body = text.split("\n---\n", 1)[1]
    # what the model is
    assert "`resnet18`" in body and "`RBC`, `WBC`, `Platelets`" in body
    assert "[`org/sad-resnet50-teacher`](https://huggingface.co/org/sad-resnet50-teacher)" in body
    # how it was trained: the hyper-parameter table
    rows = ["| distill_loss | adl |", "| adl_beta | 1 |", "| adl_gamma | 2 |", "| normalizer | adaptive |",
            "| unlabeled_ratio | 0.5 |", "| steps | 3000 |", "| lr | 0.01 |", "| image_size | height=320, width=320 |"]
    for row in rows:
        assert row in body, row
    # results: student vs teacher vs baseline, in percent
    assert "| Model | mAP | mAP@50 | mAP@75 |" in body
    assert "| **sad-resnet18-cells** (student, SAD) | 35.1 | 60.2 | 33.3 |" in body
    assert "| teacher (resnet50) | 38.1 | 65.0 | - |" in body
    assert "| supervised baseline (same student, no distillation) | 31.0 | - | - |" in body
    # usage, both loading routes, with the real repo id; no install from a package index hf-sad is not on
    assert 'AutoModelForObjectDetection.from_pretrained("someone/sad-resnet18-cells", trust_remote_code=True)' in body
    assert 'AutoImageProcessor.from_pretrained("someone/sad-resnet18-cells", trust_remote_code=True)' in body
    assert "post_process_object_detection(" in body
    assert 'pipeline("object-detection", model="someone/sad-resnet18-cells", trust_remote_code=True)' in body
    assert "import hf_sad" in body and "pip install" not in body and "pypi" not in body.lower()
    # intended use, limitations; license placeholder when none is given
    assert "## Intended use and limitations" in body and "**License:** not specified" in body
    # picture and citation
    assert "![detections](detections.png)" in body
    for piece in ["Learning Efficient Detector with Semi-supervised Adaptive Distillation", "1901.00366", "BMVC",
                  "Tang, Shitao", "Feng, Litong", "Shao, Wenqi", "Kuang, Zhanghui", "Zhang, Wei", "Chen, Yimin"]:
        assert piece in body, piece


def test_card_local_teacher_shows_no_local_paths(tmp_path):
    teacher = tmp_path / "runs" / "teacher-r50"
    teacher.mkdir(parents=True)
    card = _card(
        model_name=str(tmp_path / "runs" / "student-r18"),
        teacher=str(teacher),
        datasets=[str(tmp_path / "data" / "bccd"), "org/unlabeled-cells"],
        dataset_name="bccd val",
        hyperparameters={**HYPERPARAMETERS, "output_dir": str(tmp_path / "out"), "hub_token": "hf_not_a_real_one"},
        detections_image=str(tmp_path / "student-r18" / "detections.png"),
        repo_id=None,
    )
    text = str(card)
    assert str(tmp_path) not in text and not ABSOLUTE_PATH.findall(text), ABSOLUTE_PATH.findall(text)
    assert "base_model" not in card.data.to_dict()  # a local teacher is not a Hub model
    assert card.data.datasets == ["org/unlabeled-cells"]
    assert "`teacher-r50` (a local checkpoint, not on the Hub)" in text
    assert "`bccd` (a local data set, not on the Hub)" in text
    assert "# student-r18" in text and "| output_dir | out |" in text
    assert "![detections](detections.png)" in text
    assert "hub_token" not in text and "hf_not_a_real_one" not in text
    assert 'from_pretrained("your-username/student-r18", trust_remote_code=True)' in text


def test_card_without_results_or_picture():
    card = _card(metrics={}, teacher_metrics=None, baseline_metrics=None, detections_image=None, teacher=None)
    text = str(card)
    assert "model-index" not in text and "No evaluation results were recorded." in text
    assert "![detections]" not in text
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _card(metrics={"map": 35.1})  # percent in, instead of COCO fractions


@pytest.mark.parametrize(
    "name,expected",
    [("org/model", True), ("org/my.model-v2", True), ("model", False), ("/abs/org/model", False),
     ("./org/model", False), ("~/org/model", False), ("a/b/c", False), ("org/..", False), (None, False)],
)
def test_is_hub_id(name, expected):
    assert is_hub_id(name) is expected


def test_template_is_found_in_the_editable_install_and_in_a_built_wheel(tmp_path):
    source = (REPO / "model_cards" / "student.md").read_text(encoding="utf-8")
    assert card_template() == source  # importlib.resources, through the editable install
    # Build the wheel from a copy, so the build leaves nothing (build/, *.egg-info) in the working tree.
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", project / "src", ignore=ignore)
    shutil.copytree(REPO / "model_cards", project / "model_cards", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(project)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_sad-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {"hf_sad/model_cards/student.md", "hf_sad/model_cards/__init__.py", "hf_sad/hub.py"} <= names
        assert archive.read("hf_sad/model_cards/student.md").decode("utf-8") == source


# ------------------------------------------------------------------------------------------------------------- push


def _fake_student(folder: Path, **config) -> Path:
    """The files `check_saved_student` looks for, without building a model."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "sad", **config}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / "preprocessor_config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# student\n")
    return folder


def test_push_refuses_a_folder_that_is_not_a_saved_student(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        push_to_hub(tmp_path, "user/x", token="t")
    for missing in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert missing in str(error.value)
    folder = _fake_student(tmp_path / "detr")
    (folder / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(ValueError, match="model_type 'detr'"):
        push_to_hub(folder, "user/x", token="t")


def test_push_without_any_token_is_refused_before_any_request(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("hf_sad.hub.HfApi", lambda *a, **k: pytest.fail("no Hub client may be built without a token"))
    folder = _fake_student(tmp_path / "student")
    with pytest.raises(PermissionError, match="private.*hf auth login.*token="):
        push_to_hub(folder, "user/x", private=True)


class _RecordingApi:
    """Stands in for HfApi: records the calls push_to_hub makes."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'1' * 40}", commit_message="m",
            commit_description="", oid="1" * 40,
        )


def test_push_filters_checkpoints_and_refuses_files_holding_the_token(tmp_path, monkeypatch):
    token = "hf_" + secrets.token_hex(12)
    folder = _fake_student(tmp_path / "student")
    (folder / "training_args.bin").write_bytes(b"pickle ... " + token.encode())  # TrainingArguments keep hub_token
    (folder / "optimizer.pt").write_bytes(b"x")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (folder / "all_results.json").write_text('{"eval_map": 0.3}')
    assert files_to_upload(folder) == [
        "README.md", "all_results.json", "config.json", "model.safetensors", "preprocessor_config.json"
    ]
    _RecordingApi.calls = []
    monkeypatch.setattr("hf_sad.hub.HfApi", _RecordingApi)
    url = push_to_hub(folder, "user/x", private=True, token=token)  # the pickle holding the token is not uploaded
    assert url.endswith("/user/x/commit/" + "1" * 40)
    (_, init), (_, create), (_, upload) = _RecordingApi.calls
    assert create == {"repo_id": "user/x", "private": True, "exist_ok": True}
    assert upload["allow_patterns"] == files_to_upload(folder)  # exactly the files listed above

    _fake_student(folder, hub_token=token)  # now config.json, which is uploaded, holds the token
    with pytest.raises(ValueError, match="config.json") as error:
        push_to_hub(folder, "user/x", token=token)
    assert token not in str(error.value)


def test_exports_go_with_the_push_and_are_named_in_the_card(tmp_path):
    folder = _fake_student(tmp_path / "student")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"max_detections": 100, "pre_nms_top_k": 1000, "nms_iou_threshold": 0.5}))
    (folder / "README.md").write_text("# student\n\n## How to use\n\ncode\n\n## Citation\n\npaper\n")
    for name in ("model.onnx", "model_int8.onnx", "openvino_model.xml", "openvino_model.bin", "other.bin"):
        (folder / name).write_bytes(b"x")
    uploaded = files_to_upload(folder)
    assert {"model.onnx", "model_int8.onnx", "openvino_model.xml", "openvino_model.bin"} <= set(uploaded)
    assert "other.bin" not in uploaded  # any other .bin may be a pickle

    assert write_exports_into_card(folder)
    card = (folder / "README.md").read_text()
    assert card.count("## Fast inference") == 1 and card.index("## Fast inference") < card.index("## Citation")
    for name in ("`model.onnx`", "`model_int8.onnx`", "`openvino_model.xml`", "--backend onnxruntime",
                 "ExportedDetector.from_pretrained(\"your-username/student\""):
        assert name in card
    write_exports_into_card(folder)  # a second export replaces the section
    assert (folder / "README.md").read_text() == card
    (folder / "openvino_model.xml").unlink()
    (folder / "openvino_model.bin").unlink()
    assert "openvino_model.bin" not in files_to_upload(folder)
    write_exports_into_card(folder)
    assert "openvino_model.xml" not in (folder / "README.md").read_text()
    for name in ("model.onnx", "model_int8.onnx"):
        (folder / name).unlink()
    assert not write_exports_into_card(folder)
    assert (folder / "README.md").read_text() == "# student\n\n## How to use\n\ncode\n\n## Citation\n\npaper\n"


# ------------------------------------------------------------------------------------------------------ end to end

PUSH_SCRIPT = """
import logging, os, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # every logger: the test scans it all for the token
from huggingface_hub.utils import logging as hf_logging
hf_logging.set_verbosity_debug()
from hf_sad.hub import push_to_hub

folder, token = sys.argv[1], os.environ.pop("HF_TOKEN")
try:  # no token anywhere (HF_TOKEN unset, empty HF_HOME): refused before any request
    push_to_hub(folder, "user/refused", private=True)
except PermissionError as error:
    print("REFUSED", error)
else:
    sys.exit("a private push without a token was not refused")
print("PUSHED", push_to_hub(folder, "user/tiny-student", private=True, token=token))
os.environ["HF_TOKEN"] = token  # the usual source when token=None
print("BRANCH", push_to_hub(folder, "user/tiny-student", revision="v1", commit_message="same files on a branch"))
"""

LOAD_SCRIPT = """
import os, sys
if sys.argv[3] == "remote-code":
    sys.modules["hf_sad"] = None  # `import hf_sad` fails: only the repo's own code can load the model
else:
    import hf_sad
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, pipeline

token = os.environ.pop("HF_TOKEN")  # explicit token= only
remote = sys.argv[3] == "remote-code"
reference, image = load_file(sys.argv[1]), Image.open(sys.argv[2])
try:
    AutoConfig.from_pretrained("user/tiny-student", token=False, trust_remote_code=remote)
except OSError:
    print("ANONYMOUS-REFUSED")
else:
    sys.exit("an anonymous download of a private repo succeeded")

model = AutoModelForObjectDetection.from_pretrained("user/tiny-student", token=token, trust_remote_code=remote).eval()
processor = AutoImageProcessor.from_pretrained("user/tiny-student", token=token, trust_remote_code=remote)
module = type(model).__module__
assert module.startswith("transformers_modules" if remote else "hf_sad"), module
pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
assert torch.equal(pixel_values, reference["pixel_values"]), "processor differs"
with torch.no_grad():
    out = model(reference["x"])
assert torch.equal(out.logits, reference["logits"]), (out.logits - reference["logits"]).abs().max()
assert torch.equal(out.pred_boxes, reference["pred_boxes"])
detector = pipeline("object-detection", model="user/tiny-student", token=token, trust_remote_code=remote)
detections = detector(image, threshold=0.0)
assert detections and {d["label"] for d in detections} <= {"a", "b"}, detections
print("LOADED", module, type(processor).__name__, sorted({d["label"] for d in detections}))
"""


def _client_env(hub: HubServer, token: str, home: Path) -> dict[str, str]:
    """Environment of a client process: the local server as endpoint, its own empty HF_HOME, no Xet, online."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN",
                        "HF_OIDC_RESOURCE", "HF_HUB_CACHE", "HF_MODULES_CACHE", "HF_XET_CACHE"}
           and not k.lower().endswith("_proxy")}
    env.update(
        HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(home), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
        HF_DATASETS_CACHE=str(home / "datasets"),
    )
    return env


def _run(script: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, cwd=cwd, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen) -> str:
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    return stdout + stderr


def _save_student(folder: Path, reference_file: Path, image_file: Path) -> dict[str, torch.Tensor]:
    """A tiny student saved as training would leave it (plus Trainer leftovers), and its reference outputs."""
    model, processor = tiny_detector(id2label=TWO_LABELS)
    model.eval()
    save_detector((model, processor), folder)
    create_model_card(
        model_name="tiny-student", id2label=TWO_LABELS, backbone="resnet18", teacher=str(folder.parent / "teacher"),
        datasets=None, metrics={"map": 0.1, "map_50": 0.2, "map_75": 0.05}, hyperparameters=HYPERPARAMETERS,
        repo_id="user/tiny-student",
    ).save(folder / "README.md")
    Image.new("RGB", (48, 32), "red").save(folder / "detections.png")
    (folder / "all_results.json").write_text(json.dumps({"eval_map": 0.1}))
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "optimizer.pt").write_bytes(b"not for the Hub")

    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(50, 70, 3, generator=generator) * 255).to(torch.uint8).numpy())
    image.save(image_file)
    x = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        out = model(x)
    reference = {
        "x": x, "logits": out.logits, "pred_boxes": out.pred_boxes,
        "pixel_values": processor(images=Image.open(image_file), return_tensors="pt")["pixel_values"],
    }
    save_file({k: v.contiguous() for k, v in reference.items()}, str(reference_file))
    return reference


def _get(url: str, token: str | None = None) -> int:
    """Status of a plain GET (urllib, to 127.0.0.1 only), to see the server's own answer without the client."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_push_and_load_end_to_end(tmp_path):
    """Push a tiny student to a private repo on the local Hub-protocol server (not the Hub), then load it back."""
    token, other_token = "hf_" + secrets.token_urlsafe(24), "hf_" + secrets.token_urlsafe(24)
    folder, reference_file, image_file = tmp_path / "tiny-student", tmp_path / "ref.safetensors", tmp_path / "probe.png"
    _save_student(folder, reference_file, image_file)

    with HubServer({token: "user", other_token: "someone-else"}, max_requests=500, max_lifetime_s=600) as hub:
        push = _finish(_run(PUSH_SCRIPT, [str(folder)], _client_env(hub, token, tmp_path / "home-push"), tmp_path))
        assert "REFUSED" in push and "hf auth login" in push
        assert not any("user/refused" in path for _, path, _, _ in hub.requests)  # refused client side
        commit_url = re.search(r"PUSHED (\S+)", push).group(1)
        assert commit_url.startswith(f"{hub.url}/user/tiny-student/commit/")

        # Both loading routes, each in a fresh process with an empty HF_HOME, side by side.
        loaders = [
            _run(LOAD_SCRIPT, [str(reference_file), str(image_file), route],
                 _client_env(hub, token, tmp_path / f"home-{route}"), tmp_path)
            for route in ("hf-sad", "remote-code")
        ]
        outputs = [_finish(process) for process in loaders]
        assert "ANONYMOUS-REFUSED" in outputs[0]
        assert "LOADED hf_sad.model.modeling_sad SADImageProcessor ['a'" in outputs[0]
        assert "ANONYMOUS-REFUSED" in outputs[1] and "LOADED transformers_modules." in outputs[1]

        # What was uploaded: the model, its code, processor, card, picture and results; no Trainer leftovers.
        repo = hub.state.repos["user/tiny-student"]
        assert repo.private and set(repo.branches) == {"main", "v1"}
        files = hub.files("user/tiny-student")
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "detections.png",
                "all_results.json", "modeling_sad.py", "configuration_sad.py", "image_processing_sad.py"} <= set(files)
        assert not any(path.startswith("checkpoint-") for path in files)
        assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
        assert "model.safetensors" in {p for p, f in repo.commits[repo.branches["main"]].items() if f.sha256}  # LFS
        card = ModelCard(files["README.md"].decode())
        assert card.data.pipeline_tag == "object-detection" and card.data.eval_results[0].metric_value == 10.0

        # The server's own answers for the private repo: 401 anonymous, 404 for another user, 200 for the owner.
        resolve = f"{hub.url}/user/tiny-student/resolve/main/config.json"
        assert (_get(resolve), _get(resolve, other_token), _get(resolve, token)) == (401, 404, 200)
        requests = hub.requests
        blobs = hub.stored_blobs()

    # The token never leaves the Authorization header: not in any output, nor in any uploaded byte.
    assert all(token not in text for text in [push, *outputs])
    assert all(token.encode() not in blob for blob in blobs)
    assert all(status < 500 for _, _, status, _ in requests), [r for r in requests if r[2] >= 500]
    assert any(method == "PUT" and path.startswith("/lfs-upload/") for method, path, _, _ in requests)


# ------------------------------------------------------------------------------------- pushing through the trainer
# `hf-sad distill --push_to_hub` and `SADTrainer.push_to_hub()` upload the finished model once, with its code,
# processor, results and the SAD model card; never checkpoints, pickles or event files.

HF_SAD = Path(sys.executable).with_name("hf-sad")
REMOTE_CODE = {"configuration_sad.py", "modeling_sad.py", "image_processing_sad.py", "box_ops.py", "detection_loss.py"}
NEVER_UPLOADED = ("training_args.bin", "trainer_state.json", "runs/", "checkpoint-", ".pt", ".pth", ".pkl")


def our_commits(hub: HubServer, repo_id: str) -> list[str]:
    repo = hub.state.repos[repo_id]
    return [message for message in repo.messages.values() if message != "initial commit"]


def assert_only_the_finished_model(files: dict[str, bytes]) -> None:
    assert REMOTE_CODE | {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(files)
    leaked = [path for path in files if any(pattern in path for pattern in NEVER_UPLOADED)]
    assert not leaked, leaked


def test_distill_push_to_hub_pushes_once_with_code_results_and_card(tmp_path, saved_teacher):
    token = "hf_" + secrets.token_urlsafe(24)
    output_dir = tmp_path / "student"
    command = [str(HF_SAD), "distill", "--teacher", str(saved_teacher), "--student", "resnet18", *TINY_FLAGS,
               "--image_size", str(IMAGE_SIZE),
               "--train_data", "synthetic:8", "--eval_data", "synthetic-val:3", "--unlabeled_data", "synthetic",
               "--synthetic_image_size", str(IMAGE_SIZE), "--output_dir", str(output_dir), "--max_steps", "2",
               "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "1",
               "--logging_steps", "1", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true",
               "--push_to_hub", "--hub_model_id", "user/sad-student", "--license", "apache-2.0"]
    with HubServer({token: "user"}, max_requests=500, max_lifetime_s=600) as hub:
        result = subprocess.run(command, env=_client_env(hub, token, tmp_path / "home"), capture_output=True,
                                text=True, timeout=600, stdin=subprocess.DEVNULL)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        commits = our_commits(hub, "user/sad-student")
        files = hub.files("user/sad-student")

    assert len(commits) == 1, commits  # once, at the end: not at every checkpoint, not again after save_model
    assert_only_the_finished_model(files)
    assert {"results.json", "train_results.json", "eval_results.json", "all_results.json"} <= set(files)
    assert (output_dir / "checkpoint-2").is_dir() and (output_dir / "training_args.bin").is_file()  # kept locally
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "object-detection"
    assert [r.metric_name for r in card.data.eval_results] == ["mAP", "mAP@50", "mAP@75"]
    body = card.text
    assert 'from_pretrained("user/sad-student", trust_remote_code=True)' in body
    assert "Semi-supervised Adaptive Distillation" in body and "| teacher (resnet18) |" in body
    assert "### Framework versions" in body and "- transformers: " in body
    assert "HTTP Request" not in output and token not in output  # no request logs on the console, never the token


TRAINER_PUSH = """
import sys
from hf_sad import SADTrainer, SADTrainingArguments
from hf_sad.data.synthetic import make_labeled_dataset
from tests.utils import tiny_detector

output_dir = sys.argv[1]
student, processor = tiny_detector()
teacher, _ = tiny_detector(seed=1)
data = make_labeled_dataset(6, seed=0, image_size=64)
args = SADTrainingArguments(output_dir=output_dir, max_steps=1, per_device_train_batch_size=2, report_to="none",
                            use_cpu=True, disable_tqdm=True, save_strategy="no")
trainer = SADTrainer(student, teacher, args, data, eval_dataset=make_labeled_dataset(3, seed=1, image_size=64),
                     processing_class=processor)
trainer.train()
trainer.evaluate()
print("URL", trainer.push_to_hub(datasets=["someone/shapes"]))
"""


def test_trainer_push_to_hub_from_python_gives_the_sad_card(tmp_path):
    token = "hf_" + secrets.token_urlsafe(24)
    with HubServer({token: "user"}, max_requests=300, max_lifetime_s=600) as hub:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAINER_PUSH), str(tmp_path / "py-student")],
                                env=_client_env(hub, token, tmp_path / "home"), capture_output=True, text=True,
                                timeout=600, stdin=subprocess.DEVNULL, cwd=REPO)
        assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
        assert "URL " + hub.url + "/user/py-student/commit/" in result.stdout
        commits = our_commits(hub, "user/py-student")
        files = hub.files("user/py-student")
    assert len(commits) == 1, commits
    assert_only_the_finished_model(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.datasets == ["someone/shapes"] and card.data.eval_results
    assert 'pipeline("object-detection", model="user/py-student", trust_remote_code=True)' in card.text
    assert "(student, SAD)" in card.text and "## Intended use and limitations" in card.text
