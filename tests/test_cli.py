"""The product surface: `hf-sad` commands end to end on tiny settings, and the demo; each command as users of
transformers' example scripts and TRL's scripts expect it: a parser per command, `--config`, runs that end with the
example scripts' files and printouts, clear failures, and `predict`'s outputs."""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForObjectDetection, pipeline
from transformers.integrations.integration_utils import get_available_reporting_integrations

import hf_sad.cli
from hf_sad.cli import console_main, main
from hf_sad.data.synthetic import SYNTHETIC_LABELS, generate_scene
from hf_sad.demo import QUICK, run_demo
from hf_sad.inference import class_colour, draw_detections
from hf_sad.training.callbacks import TrainingStopped

from .utils import GOOD_BOX, IMAGE_SIZE, REPO, TINY, TINY_FLAGS, detection_dataset, image_value, jpeg, scene

HF_SAD = Path(sys.executable).with_name("hf-sad")

TINY_MODEL = [*TINY_FLAGS, "--image_size", "64"]
TINY_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
            "--save_strategy", "no", "--synthetic_image_size", "64", "--disable_tqdm", "true"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "distill", "evaluate", "predict", "export", "push"):
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    assert "--adl_beta" in capsys.readouterr().out


def test_train_distill_predict(tmp_path):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    main(["train", "--student", "resnet18", "--train_data", "synthetic:8", "--output_dir", str(teacher_dir),
          *TINY_MODEL, *TINY_RUN])
    assert (teacher_dir / "model.safetensors").exists() and (teacher_dir / "preprocessor_config.json").exists()

    main(["distill", "--teacher", str(teacher_dir), "--student", "resnet18", "--train_data", "synthetic:8",
          "--eval_data", "synthetic-val:3", "--unlabeled_data", "synthetic", "--output_dir", str(student_dir),
          *TINY_MODEL, *TINY_RUN])
    results = json.loads((student_dir / "results.json").read_text())
    assert "eval_map" in results and "train_runtime" in results
    card = (student_dir / "README.md").read_text()
    assert "pipeline_tag: object-detection" in card and str(tmp_path) not in card
    student = AutoModelForObjectDetection.from_pretrained(student_dir)
    assert student.config.id2label == dict(enumerate(SYNTHETIC_LABELS))

    # Several --teacher values make an ensemble; --ema_teacher needs none.
    common = ["--student", "resnet18", "--train_data", "synthetic:8", "--eval_data", "synthetic-val:3",
              "--unlabeled_data", "synthetic", *TINY_MODEL, *TINY_RUN]
    main(["distill", "--teacher", str(teacher_dir), str(teacher_dir), "--teacher_aggregation", "era",
          "--output_dir", str(tmp_path / "ensemble"), *common])
    assert "an ensemble of 2" in (tmp_path / "ensemble" / "README.md").read_text()
    assert "teacher_map" in json.loads((tmp_path / "ensemble" / "results.json").read_text())
    main(["distill", "--ema_teacher", "--ema_decay", "0.9", "--output_dir", str(tmp_path / "ema"), *common])
    assert "moving average of the student" in (tmp_path / "ema" / "README.md").read_text()
    with pytest.raises(SystemExit, match="pass no --teacher"):
        main(["distill", "--ema_teacher", "--teacher", str(teacher_dir), "--output_dir", str(tmp_path / "x"),
              *common])

    images = tmp_path / "images"
    images.mkdir()
    for seed in range(3):
        generate_scene(seed, image_size=64)[0].save(images / f"scene{seed}.png")
    main(["predict", "--model", str(student_dir), "--images", str(images), "--output_dir", str(tmp_path / "pred"),
          "--threshold", "0.0"])
    detections = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(detections) == 3 and all(len(d) > 0 for d in detections.values())
    assert {d["label"] for found in detections.values() for d in found} <= set(SYNTHETIC_LABELS)
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == ["scene0.png", "scene1.png", "scene2.png"]


def test_evaluate_prints_tables_and_writes_json(tmp_path, capsys):
    model_dir = tmp_path / "model"
    main(["train", "--student", "resnet18", "--train_data", "synthetic:4", "--output_dir", str(model_dir),
          *TINY_MODEL, *TINY_RUN])
    capsys.readouterr()
    output_file = tmp_path / "metrics.json"
    main(["evaluate", "--model", str(model_dir), "--data", "synthetic-val:3", "--synthetic_image_size", "64",
          "--output_file", str(output_file)])
    out = capsys.readouterr().out
    assert "mAP" in out and "mAP@50" in out and "class" in out
    for name in SYNTHETIC_LABELS:  # one row per class
        assert any(line.startswith(name) for line in out.splitlines()), name
    metrics = json.loads(output_file.read_text())
    for key in ("map", "map_50", "map_75", "map_small", "map_circle", "loss"):
        assert key in metrics, key


def test_distill_without_teacher_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        main(["distill", "--student", "resnet18", "--output_dir", str(tmp_path), *TINY_RUN])


def test_push_without_token_is_refused(tmp_path, monkeypatch):
    model_dir = tmp_path / "model"
    main(["train", "--student", "resnet18", "--train_data", "synthetic:4", "--output_dir", str(model_dir),
          *TINY_MODEL, *TINY_RUN])
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PermissionError, match="token"):
        main(["push", str(model_dir), "--repo-id", "someone/model", "--private"])


def test_demo_writes_results_student_card_and_picture(tmp_path):
    config = replace(QUICK, image_size=64, num_train=8, num_val=4, teacher_steps=2, student_steps=2, batch_size=2,
                     teacher_width=16, student_width=8, head_num_convs=1)
    results = run_demo(tmp_path, config=config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("teacher", "student_baseline", "student_sad"):
        entry = saved[key]
        assert {"map", "map_50", "parameters", "train_seconds"} <= set(entry)
        assert 0 <= entry["map"] <= 1 and entry["parameters"] > 0
    assert saved["teacher"]["parameters"] > saved["student_sad"]["parameters"]
    student = tmp_path / "student"
    assert (student / "detections.png").exists() and (tmp_path / "detections.png").exists()
    card = (student / "README.md").read_text()
    assert "![detections](detections.png)" in card and "1901.00366" in card
    detector = pipeline("object-detection", model=str(student), threshold=0.0, trust_remote_code=False)
    found = detector(generate_scene(0, image_size=64)[0])
    assert found and {d["label"] for d in found} <= set(SYNTHETIC_LABELS)
    assert (student / "model.safetensors").exists()

DISTILLATION_FLAGS = ("--distill_loss", "--adl_beta", "--teacher", "--unlabeled_ratio", "--pseudo_box_weight")


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_each_command_has_its_own_help_with_its_own_flags_first(capsys):
    train = help_text("train", capsys)
    assert not [flag for flag in DISTILLATION_FLAGS if flag in train], "hf-sad train lists distillation flags"
    assert "--train_data" in train and "--hflip_prob" in train and "--learning_rate" in train
    distill = help_text("distill", capsys)
    order = [distill.index(flag) for flag in ("--train_data", "--student", "--teacher", "--distill_loss",
                                              "--hflip_prob", "--learning_rate")]
    assert order == sorted(order), "data, model, teacher, distillation, then TrainingArguments flags"
    assert "{adl,kl,fdl,hard,none}" in distill and "{paper,released}" in distill  # choices are shown
    for command, flag in [("evaluate", "--output_file"), ("predict", "--threshold"), ("push", "--repo_id"),
                          ("demo", "--quick")]:
        text = help_text(command, capsys)
        assert flag in text and "--learning_rate" not in text, command


@pytest.mark.parametrize("flag", ["--distill_loss", "--unlabeled_data", "--teacher"])
def test_train_refuses_distillation_flags(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--train_data", "synthetic:4", "--output_dir", str(tmp_path), flag, "adl"])
    assert exit_info.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    settings = {"student": "resnet18", **TINY, "image_size": IMAGE_SIZE, "train_data": "synthetic:4",
                "synthetic_image_size": IMAGE_SIZE, "max_steps": 3, "per_device_train_batch_size": 2,
                "report_to": "none", "use_cpu": True, "save_strategy": "no",
                "output_dir": str(tmp_path / "from-config")}
    config.write_text(yaml.safe_dump(settings))
    metrics = main(["train", "--config", str(config), "--max_steps", "1", "--disable_tqdm", "true"])
    assert (tmp_path / "from-config" / "model.safetensors").is_file()
    state = json.loads((tmp_path / "from-config" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["max_steps"] == 1 and metrics["train_runtime"] > 0  # the flag won

    config.write_text("studnet: resnet18\n")
    with pytest.raises(ValueError, match=r"unknown flag\(s\) \['studnet'\]"):
        main(["train", "--config", str(config)])
    config.write_text("student: [resnet18\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))} is not valid YAML"):
        main(["train", "--config", str(config)])


def test_supervised_run_ends_like_transformers_examples(tmp_path, capsys):
    output_dir = tmp_path / "teacher"
    main(["train", "--student", "resnet18", "--train_data", "synthetic:6", "--eval_data", "synthetic-val:3",
          "--output_dir", str(output_dir), *TINY_MODEL, *TINY_RUN])
    out = capsys.readouterr().out
    assert "***** train metrics *****" in out and "***** eval metrics *****" in out
    assert "class" in out and all(any(line.startswith(name) for line in out.splitlines()) for name in SYNTHETIC_LABELS)
    def refuse(constant):
        raise AssertionError(f"a bare {constant} in a JSON file")

    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json", "results.json"):
        json.loads((output_dir / name).read_text(), parse_constant=refuse)
    results = json.loads((output_dir / "results.json").read_text())
    assert "eval_map" in results and "train_runtime" in results
    # Three validation scenes rarely hold every class: an absent class is null in JSON, NaN in memory.
    absent = [name for name in SYNTHETIC_LABELS if results[f"eval_map_{name}"] is None]
    assert absent, "expected a class absent from the 3 validation scenes"
    card = (output_dir / "README.md").read_text()
    assert "(supervised)" in card and "Teacher:" not in card and "knowledge-distillation" not in card


@pytest.mark.parametrize(("integration", "install"), [("tensorboard", "pip install 'hf-sad[tensorboard]'"),
                                                     ("wandb", "pip install wandb")])
def test_report_to_a_missing_integration_is_a_clear_error_at_once(tmp_path, integration, install):
    if integration in get_available_reporting_integrations():
        pytest.skip(f"{integration} is installed here: nothing to refuse")
    with pytest.raises(ValueError, match=rf"report_to includes \['{integration}'\].*{re.escape(install)}"):
        main(["train", "--output_dir", str(tmp_path), *TINY_MODEL, *TINY_RUN, "--train_data", "synthetic:4",
              "--report_to", integration])
    assert not (tmp_path / "model.safetensors").exists()


def test_launched_as_several_processes_without_use_cpu_fails_instead_of_training_copies(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the two processes would form a real distributed run")
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "scripts" / "train.py"),
               "--student", "resnet18", *TINY_MODEL, "--train_data", "synthetic:4", "--synthetic_image_size", "64",
               "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "launched as one of 2 (WORLD_SIZE=2) but the run would have world size 1" in output
    assert "Pass --use_cpu" in output and not (tmp_path / "out" / "model.safetensors").exists()


def test_console_script_shows_data_errors_as_one_message(tmp_path):
    result = subprocess.run([str(HF_SAD), "evaluate", "--model", str(tmp_path / "missing"), "--data",
                             str(tmp_path / "nowhere.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("hf-sad: error: ") and "Traceback" not in result.stderr
    assert f"{tmp_path / 'nowhere.json'}: no such COCO annotation file" in result.stderr
    result = subprocess.run([str(HF_SAD), "predict", "--model", str(tmp_path / "missing"), "--images", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"hf-sad: error: {tmp_path / 'missing'}: no such model folder")


@pytest.mark.parametrize("error", [TrainingStopped("12 of 20 unlabeled images could not be decoded"),
                                   ConnectionError("the Hub cannot be reached"), FileNotFoundError("x: no such file")])
def test_console_script_shows_stopped_runs_and_unreachable_hubs_as_one_message(monkeypatch, capsys, error):
    def stop(argv=None):
        raise error

    monkeypatch.setattr(hf_sad.cli, "main", stop)
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 1 and capsys.readouterr().err == f"hf-sad: error: {error}\n"


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    main(["train", "--student", "resnet18", "--train_data", "synthetic:4", "--output_dir", str(folder),
          *TINY_MODEL, *TINY_RUN])
    return folder


def test_predict_mirrors_folders_counts_bad_files_and_draws_one_colour_per_class(trained_model, tmp_path, capsys):
    photos = tmp_path / "photos"
    for folder, seed in [("a", 0), ("b", 1)]:  # same file name in two folders
        (photos / folder).mkdir(parents=True)
        generate_scene(seed, image_size=64)[0].save(photos / folder / "scene.png")
    (photos / "b" / "broken.jpg").write_bytes(b"not an image")
    loose = tmp_path / "loose"
    loose.mkdir()
    generate_scene(2, image_size=64)[0].save(loose / "scene.png")  # a third scene.png, given as a file

    output_dir = tmp_path / "out"
    detections = main(["predict", "--model", str(trained_model), "--images", str(photos), str(loose / "scene.png"),
                       "--output_dir", str(output_dir), "--threshold", "0.0"])
    out = capsys.readouterr().out
    assert f"1 file(s) could not be decoded and were skipped: {photos / 'b' / 'broken.jpg'}." in out
    saved = json.loads((output_dir / "detections.json").read_text())
    assert saved == detections
    assert sorted(saved) == sorted(str(p) for p in (photos / "a" / "scene.png", photos / "b" / "scene.png",
                                                    loose / "scene.png"))  # decoded inputs only
    drawings = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*.png"))
    assert drawings == ["photos/a/scene.png", "photos/b/scene.png", "scene.png"]



def test_drawings_use_one_colour_per_class_and_readable_labels():
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    detections = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 50.0], [45.0, 25.0, 75.0, 55.0]]),
                  "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    drawn = draw_detections(image, detections, {1: "square", 2: "triangle"})
    assert drawn.getpixel((10, 35)) == class_colour(1)  # left edge of the first box
    assert drawn.getpixel((74, 40)) == class_colour(2)  # right edge of the second box
    assert class_colour(1) != class_colour(2)
    # Each label sits on a filled tag of its class colour inside the box's top, in black or white, whichever contrasts:
    # dark text on the orange tag, white text on the green one.
    orange_tag = [drawn.getpixel((x, y)) for x in range(12, 40) for y in range(24, 34)]
    green_tag = [drawn.getpixel((x, y)) for x in range(47, 74) for y in range(29, 39)]
    assert sum(p == class_colour(1) for p in orange_tag) > len(orange_tag) // 2
    assert sum(p == class_colour(2) for p in green_tag) > len(green_tag) // 2
    assert any(max(p) < 60 for p in orange_tag) and not any(min(p) > 200 for p in orange_tag)
    assert any(min(p) > 200 for p in green_tag) and not any(max(p) < 60 for p in green_tag)


def test_predict_hints_when_nothing_clears_the_threshold(trained_model, tmp_path, capsys):
    generate_scene(0, image_size=64)[0].save(tmp_path / "scene.png")
    detections = main(["predict", "--model", str(trained_model), "--images", str(tmp_path / "scene.png"),
                       "--output_dir", str(tmp_path / "out"), "--threshold", "0.999999"])
    assert detections == {str(tmp_path / "scene.png"): []}
    out = capsys.readouterr().out
    assert "No detection scored above --threshold 0.999999 (the best score was" in out
    best = float(out.split("the best score was ")[1].split(")")[0])
    assert 0 < best < 0.999999 and math.isfinite(best)


def test_class_names_come_from_the_data_or_class_names_else_an_error(tmp_path):
    """Plain integer categories need --class_names; names that are metric keys ("small") train, evaluate and save."""
    images = [image_value(jpeg(scene(64, 64)), f"img{i}") for i in range(4)]
    objects = [{"bbox": [GOOD_BOX], "category": [i % 3]} for i in range(4)]
    detection_dataset(images, objects, class_label=False).save_to_disk(str(tmp_path / "plain"))
    run = ["--train_data", str(tmp_path / "plain"), "--eval_data", str(tmp_path / "plain"), *TINY_MODEL, *TINY_RUN]
    with pytest.raises(ValueError, match=r"categories of .*plain are plain integers.*--class_names"):
        main(["train", "--output_dir", str(tmp_path / "refused"), *run])
    assert not (tmp_path / "refused").exists()

    main(["train", "--output_dir", str(tmp_path / "out"), "--class_names", "small", "50", "cell", *run])
    model = AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "small", 1: "50", 2: "cell"}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"eval_map_small", "eval_map_class_small", "eval_map_class_50", "eval_map_cell"} <= set(results)

    with pytest.raises(ValueError, match=r"--class_names \['a', 'b'\] disagree with the class names of synthetic"):
        main(["train", "--output_dir", str(tmp_path / "x"), "--class_names", "a,b", *TINY_MODEL, *TINY_RUN,
              "--train_data", "synthetic:4"])


def test_student_named_like_a_folder_without_a_detector(tmp_path, monkeypatch):
    """`--student resnet18` builds a fresh model even where a folder named resnet18 (without a saved detector) is in
    the working directory; a student or teacher path to a folder without config.json is a clear error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    (tmp_path / "resnet18" / "notes.txt").write_text("not a model")
    main(["train", "--output_dir", "out", "--student", "resnet18", "--train_data", "synthetic:4", *TINY_MODEL,
          *TINY_RUN])
    assert AutoModelForObjectDetection.from_pretrained(tmp_path / "out").config.backbone == "resnet18"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is a folder without a saved detector \(no config.json\)"):
        main(["train", "--output_dir", "out2", "--student", "./empty", "--train_data", "synthetic:4", *TINY_RUN])
