"""The ablation report (bench/ablation.py) from recorded runs: statistics, claim verdicts, resumability, discussion."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from .utils import REPO


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "bench" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ablation"]


def _write_runs(path: Path, maps: dict[str, list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row, values in maps.items():
            for seed, value in enumerate(values):
                f.write(json.dumps({"dataset": "synthetic", "seed": seed, "row": row, "map": value, "map_50": 2 * value,
                                    "seconds": 10.0 + seed}) + "\n")


def test_summary_statistics(ablation, tmp_path):
    runs_file = tmp_path / "runs.jsonl"
    _write_runs(runs_file, {"baseline": [0.10, 0.12, 0.14], "sad": [0.20]})
    table = ablation.summarize(ablation.load_runs(runs_file), ["synthetic"])
    mean, std, n, seconds = table["synthetic"]["baseline"]
    assert (round(mean, 6), round(std, 6), n, seconds) == (12.0, 2.0, 3, 11.0)
    assert table["synthetic"]["sad"][:3] == (20.0, 0.0, 1)
    assert "teacher" not in table["synthetic"]


def test_claim_verdicts_compare_difference_with_spread(ablation):
    rows = {"adl": (10.0, 0.5, 3, 1.0), "kl": (8.0, 0.5, 3, 1.0), "fdl": (10.2, 0.5, 3, 1.0),
            "baseline": (12.0, 0.4, 3, 1.0)}
    lines = "\n".join(ablation.claim_lines({"synthetic": rows}))
    assert "ADL beats KL (labeled only): +2.0 points (supported" in lines
    assert "ADL beats focal distillation (labeled only): -0.2 points (within noise" in lines
    assert "ADL beats the supervised baseline: -2.0 points (not supported" in lines
    assert "C5" not in lines  # rows that were not run are not judged


def test_report_keeps_the_hand_written_discussion(ablation, tmp_path):
    table = {"synthetic": {"baseline": (12.0, 2.0, 3, 11.0)}}
    settings = {"synthetic": ablation.SETTINGS["synthetic"]}
    report = tmp_path / "results.md"
    ablation.write_report(table, settings, "python bench/ablation.py", report)
    assert "| student, supervised | 12.0 ± 2.0 (n=3, 11 s) |" in report.read_text()
    assert "| SAD: ADL, labeled + unlabeled | not run |" in report.read_text()
    assert "weight 5" not in report.read_text()  # follow-up rows appear once they have run
    report.write_text(report.read_text() + "\n## Discussion\n\nWhy the numbers look as they do.\n")
    table["synthetic"]["baseline"] = (13.0, 1.0, 3, 11.0)
    table["synthetic"]["adl_w5"] = (14.0, 1.0, 3, 12.0)
    ablation.write_report(table, settings, "python bench/ablation.py", report)
    text = report.read_text()
    assert "13.0 ± 1.0" in text and "12.0 ± 2.0" not in text
    assert "| student + ADL (labeled), distillation weight 5 | 14.0 ± 1.0 (n=3, 12 s) |" in text
    assert text.count("## Discussion") == 1 and text.endswith("Why the numbers look as they do.\n")


def test_finished_runs_are_not_repeated(ablation, tmp_path, monkeypatch):
    work = tmp_path / "work"
    _write_runs(work / "quick" / "runs.jsonl", {row.key: [0.01] for row in ablation.ROWS})
    monkeypatch.setattr(ablation, "run_row", lambda *args: pytest.fail("a recorded run was trained again"))
    monkeypatch.setattr(ablation, "write_chart", lambda table, path: path.write_bytes(b""))
    table = ablation.main(["--quick", "--datasets", "synthetic", "--seeds", "1", "--work_dir", str(work),
                           "--docs_dir", str(tmp_path / "docs")])
    assert set(table["synthetic"]) == {row.key for row in ablation.ROWS}
    assert (tmp_path / "docs" / "results.md").exists()


def test_missing_teacher_checkpoint_is_trained_again_first(ablation, tmp_path, monkeypatch):
    work = tmp_path / "work"
    _write_runs(work / "quick" / "runs.jsonl", {row.key: [0.01] for row in ablation.ROWS})
    calls = []

    def fake_run_row(row, dataset, seed, config, row_work):
        calls.append(row.key)
        if row.key == "teacher":
            (row_work / "teacher").mkdir(parents=True)
        return {"map": 0.02, "map_50": 0.04, "seconds": 1.0}

    monkeypatch.setattr(ablation, "run_row", fake_run_row)
    monkeypatch.setattr(ablation, "write_chart", lambda table, path: path.write_bytes(b""))
    args = ["--quick", "--datasets", "synthetic", "--seeds", "1", "--work_dir", str(work), "--docs_dir",
            str(tmp_path / "docs")]
    table = ablation.main(args + ["--rows", "adl_w5,sad_w5"])
    assert calls == ["teacher", "adl_w5", "sad_w5"]  # the teacher once, before the first row that needs it
    assert table["synthetic"]["teacher"][0] == 2.0  # its new record replaces the old one
    recorded = ablation.load_runs(work / "quick" / "runs.jsonl")
    assert {key for (_, _, key) in recorded} >= {"teacher", "adl_w5", "sad_w5"}


def test_report_keeps_datasets_not_run_this_time(ablation, tmp_path, monkeypatch):
    work = tmp_path / "work"
    runs_file = work / "quick" / "runs.jsonl"
    _write_runs(runs_file, {"baseline": [0.10]})
    with runs_file.open("a") as f:
        f.write(json.dumps({"dataset": "bccd", "seed": 0, "row": "baseline", "map": 0.3, "map_50": 0.6,
                            "seconds": 5.0}) + "\n")
    monkeypatch.setattr(ablation, "run_row", lambda *args: pytest.fail("a recorded run was trained again"))
    monkeypatch.setattr(ablation, "write_chart", lambda table, path: path.write_bytes(b""))
    table = ablation.main(["--quick", "--datasets", "synthetic", "--seeds", "1", "--rows", "baseline",
                           "--work_dir", str(work), "--docs_dir", str(tmp_path / "docs")])
    assert set(table) == {"synthetic", "bccd"}
    assert "| row | synthetic | bccd |" in (tmp_path / "docs" / "results.md").read_text()
