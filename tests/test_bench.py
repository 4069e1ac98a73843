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
