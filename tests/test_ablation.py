"""The ablation report (bench/ablation.py) from recorded runs: statistics, claim verdicts, resumability, discussion."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
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
