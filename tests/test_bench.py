"""Benchmark code paths at toy sizes on the CPU, so that they keep working: bench/bench_gpu.py (run where a GPU is
lent) and B2's SAD step with its breakdown (bench/bench_sad.py), which calls `hf_sad.distillation.sad_loss` on cached
network outputs."""

import importlib
import json
import sys

import datasets
import pytest
import torch
import transformers

from .utils import REPO

BENCH = REPO / "bench"


@pytest.fixture(scope="module")
def bench_path():
    # The benchmarks silence transformers and datasets process-wide (`common.quiet`); later tests must not inherit
    # that (an error-level transformers logger turns the Trainer's progress bars into printed log dicts).
    verbosity = transformers.logging.get_verbosity()
    bars_disabled = datasets.utils.are_progress_bars_disabled()
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))
    transformers.logging.set_verbosity(verbosity)
    if not bars_disabled:
        datasets.enable_progress_bars()


def _load(name: str):
    return importlib.import_module(name)  # bench/ is on sys.path (bench_path)


@pytest.fixture(scope="module")
def bench_gpu(bench_path):
    return _load("bench_gpu")


def test_sad_step_benchmark_and_its_breakdown(bench_path, tmp_path):
    common, bench_sad = _load("common"), _load("bench_sad")
    scale = common.Scale("toy", "resnet18", 16, 1, 64, 2, 6, "resnet18", 16, repeats=2, warmup=0)
    row = bench_sad.bench_sad_step(scale, tmp_path)
    assert row["ratio"] > 0 and row["times"]["ours"]["time_s"] > 0
    assert row["breakdown"]["times"]["time_s"] > 0  # sad_loss on cached student and teacher outputs
    assert row["sizes"]["labeled_in_batch"] == 1
    assert "loss_distill_unlabeled" in row["step_metrics"]


def test_quick_run_reports_three_steps(bench_gpu, tmp_path):
    out = tmp_path / "gpu.json"
    report = bench_gpu.main(["--device", "cpu", "--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    result = report["result"]
    assert set(result["steps"]) == {"supervised", "torchvision", "sad"}
    for name, step in result["steps"].items():
        assert step["images_per_s"] == pytest.approx(2 / step["step_s"]), name  # batch 2
        assert step["peak_memory_bytes"] is None  # CUDA only
    steps = result["steps"]
    assert result["supervised_over_torchvision_time"] == pytest.approx(
        steps["supervised"]["step_s"] / steps["torchvision"]["step_s"])
    assert result["sizes"]["labeled_in_sad_batch"] == 1  # half of the mixed batch of 2
    assert report["device"] == {"device": "cpu"} and report["environment"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown where there is no CUDA device")
def test_cuda_without_a_gpu_is_a_clear_error(bench_gpu, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--json", "unused.json"])
    assert "no CUDA device" in capsys.readouterr().err


TOY = dict(name="toy", backbone="resnet18", channels=16, num_convs=1, image_size=64, batch_size=2, num_classes=6,
           teacher_backbone="resnet18", teacher_channels=16, repeats=2, warmup=1)


def test_exported_inference_benchmark_times_float_int8_torchvision_and_eager(bench_path, tmp_path):
    common, bench_export = _load("common"), _load("bench_export")
    result = bench_export.bench_exported_inference(1, True, tmp_path, cases=((64, 1), (96, 2)),
                                                   scale=common.Scale(**TOY))
    assert [(c["image_size"], c["batch_size"]) for c in result["cases"]] == [(64, 1), (96, 2)]
    for case in result["cases"]:
        assert set(case["times"]) == {"onnxruntime", "onnxruntime_int8", "torchvision", "ours_eager"}
        # One export serves every size and batch, and finds what eager PyTorch finds.
        assert case["detections"]["onnxruntime"] == case["detections"]["ours_eager"] > 0
        assert case["onnxruntime_vs_torchvision"]["ratio"] > 0 and case["int8_vs_onnxruntime"]["ratio"] > 0


def test_padding_and_eager_variant_benchmarks(bench_path):
    common, bench_export = _load("common"), _load("bench_export")
    toy = common.Scale(**TOY)
    padding = bench_export.bench_padding(toy, image_side=100, model_size=64)
    assert padding["input_shapes"] == {"stride": [2, 3, 64, 64], "multiple_of_128": [2, 3, 128, 128]}
    variants = bench_export.bench_eager_variants(cases=((64, 2),), scale=toy)["cases"][0]
    assert set(variants["ratios"]) == {"channels_last", "folded_bn", "folded_bn_channels_last"}
    # Folding BatchNorm changes float32 rounding only: logits O(10) agree to a few thousand float32 ulps.
    assert max(variants["max_abs_logit_change"].values()) < 1e-3


def test_run_reports_export_benchmark_rows(bench_path, tmp_path):
    run = _load("run")
    report = run.main(["--quick", "--only", "B11", "--json", str(tmp_path / "r.json"), "--workdir", str(tmp_path)])
    (row,) = report["results"]
    assert row["id"] == "B11" and row["ratio"] > 0 and row["pass"] == (row["ratio"] < 1.0)
    # 416 px images resized for a 192 px model: 192 x 192 padded to the stride, 256 x 256 to a multiple of 128.
    shapes = row["details"]["input_shapes"]
    assert shapes["stride"][2:] == [192, 192] and shapes["multiple_of_128"][2:] == [256, 256]


@pytest.mark.slow
def test_compiled_training_benchmark(bench_path, tmp_path):
    common, bench_export = _load("common"), _load("bench_export")
    steps = bench_export.bench_compiled_training(common.Scale(**TOY), tmp_path)["steps"]
    assert set(steps) == {"supervised", "sad"} and all(s["ratio"] > 0 and s["compile_s"] > 0 for s in steps.values())


@pytest.mark.slow
def test_yolo_context_benchmark(bench_path, tmp_path, monkeypatch):
    pytest.importorskip("ultralytics", reason="B10 needs the ultralytics package, which the project does not depend on")
    common, bench_export = _load("common"), _load("bench_export")
    monkeypatch.chdir(tmp_path)
    result = bench_export.bench_yolo(1, tmp_path, size=64, scale=common.Scale(**TOY))
    assert result["ratio"] > 0 and result["parameters"]["yolo11n"] > 2_000_000
    assert list(tmp_path.glob("*.onnx")) == []  # the export stays in the benchmark's folder


def test_detector_benchmarks_time_ours_the_network_and_torchvision(bench_path):
    """B1 and B3 at a toy size: ours, the network alone and torchvision's RetinaNet, and each breakdown."""
    common, bench_detector = _load("common"), _load("bench_detector")
    toy = common.Scale(**TOY)
    for row in (bench_detector.bench_train_step(toy), bench_detector.bench_inference(toy)):
        assert set(row["times"]) == {"ours", "network", "reference"}
        assert row["network"]["ratio"] > 0 and row["ratio"] > 0 and row["breakdown"]["ratio"] > 0
