"""The product surface: `hf-sad` commands end to end on tiny settings, and the demo."""

import json
from dataclasses import replace

import pytest
from transformers import AutoModelForObjectDetection, pipeline

from hf_sad.cli import main
from hf_sad.demo import QUICK, run_demo
from hf_sad.synthetic import SYNTHETIC_LABELS, generate_scene

TINY_MODEL = ["--fpn_channels", "8", "--head_channels", "8", "--head_num_convs", "1", "--image_size", "64"]
TINY_RUN = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu",
            "--save_strategy", "no", "--synthetic_image_size", "64", "--disable_tqdm", "true"]


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "distill", "evaluate", "predict", "push"):
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
