"""bench/bench_gpu.py at its toy size on the CPU: the GPU benchmark's code path, so it works when a GPU is lent."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_gpu():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


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
