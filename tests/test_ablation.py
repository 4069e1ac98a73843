"""The ablation harness (experiments/ablation.py) without training: records, resumption, the gate, paired verdicts, the
report's generated and hand-written parts."""

import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

from .utils import REPO

REGIME = "pretrained-miniature"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "experiments" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["ablation"]


def records(maps: dict[str, list[float]], regime: str = REGIME, dataset: str = "synthetic") -> list[dict]:
    return [{"regime": regime, "dataset": dataset, "row": row, "seed": seed, "map": value, "map_50": 2 * value,
             "steps": 10, "seconds": 10.0 + seed} for row, values in maps.items() for seed, value in enumerate(values)]


@pytest.fixture
def quiet(ablation, monkeypatch):
    monkeypatch.setattr(ablation, "write_chart", lambda records, path: path.write_bytes(b""))


def run_main(ablation, tmp_path, *args):
    return ablation.main(["--quick", "--datasets", "synthetic", "--seeds", "1", "--work_dir", str(tmp_path / "work"),
                          "--docs_dir", str(tmp_path / "docs"), *args])


def test_summary_and_paired_verdicts(ablation):
    runs = ablation.by_key(records({"baseline": [0.10, 0.12, 0.14], "adl": [0.11, 0.13, 0.15], "kl": [0.12, 0.12, 0.1],
                                    "sad": [0.2], "sad_released": [0.21]}), REGIME)
    mean, std, n, seconds = ablation.summarize(runs, "synthetic", "baseline")
    assert (round(mean, 6), round(std, 6), n, seconds) == (12.0, 2.0, 3, 11.0)
    differences, unpaired = ablation.paired(runs, "synthetic", "adl", "baseline")
    assert differences == pytest.approx([1.0, 1.0, 1.0]) and unpaired == []
    lines = "\n".join(ablation.claim_lines(runs, ["synthetic"]))
    assert "C1' ADL beats the supervised baseline: +1.0 points on average (seeds: +1.0, +1.0, +1.0): supported" in lines
    assert "C1 ADL beats KL (labeled only): +1.7 points on average (seeds: -1.0, +1.0, +5.0): mixed" in lines
    assert "C5 " not in lines  # the teacher did not run: not judged
    assert "- synthetic: the released protocol beats ours: +1.0 points on average (seeds: +1.0): one seed" in lines
    assert ablation.verdict([-1.0, -2.0]) == "not supported" and ablation.verdict([3.0]) == "one seed"
    assert ablation.verdict([0.3, 0.5]) == "too small (under 1 point)"  # same sign, but smaller than seeds differ
    assert ablation.verdict([0.5, 1.7]) == "supported"


def test_gate_blocks_the_grid_until_the_teacher_is_good_and_better(ablation):
    regime = ablation.REGIMES[REGIME]
    good = ablation.by_key(records({"teacher": [0.40], "gate_student": [0.30]}), REGIME)
    assert ablation.check_gate(regime, good, "synthetic", 0) is None
    weak = ablation.by_key(records({"teacher": [0.30], "gate_student": [0.10]}), REGIME)
    assert "teacher 30.0 mAP" in ablation.check_gate(regime, weak, "synthetic", 0)
    no_gap = ablation.by_key(records({"teacher": [0.40], "gate_student": [0.37]}), REGIME)
    assert "a gap >= 5" in ablation.check_gate(regime, no_gap, "synthetic", 0)


def test_a_failing_gate_stops_before_the_students(ablation, tmp_path, monkeypatch, quiet):
    monkeypatch.setattr(ablation, "quick", lambda setting: setting)  # keep the regime's gate as in a real run
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text(json.dumps(records({"teacher": [0.2], "gate_student": [0.19]})))
    monkeypatch.setattr(ablation, "run_row", lambda *args: pytest.fail("a student was trained past a failing gate"))
    with pytest.raises(SystemExit, match="The gate fails: synthetic seed 0: teacher 20.0 mAP"):
        ablation.main(["--datasets", "synthetic", "--seeds", "1", "--rows", "teacher,gate_student,baseline",
                       "--work_dir", str(tmp_path / "work"), "--docs_dir", str(tmp_path / "docs")])


def test_recorded_runs_are_not_repeated_and_the_report_keeps_hand_written_text(ablation, tmp_path, monkeypatch,
                                                                                quiet):
    regime = ablation.REGIMES[REGIME]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.json").write_text(json.dumps(
        records({key: [0.01] for key in regime.rows}) + records({"baseline": [0.3]}, dataset="bccd")
        + records({"sad": [0.05]}, regime="first-miniature")))
    (tmp_path / "docs" / "results.md").write_text("# old report\n\n## Discussion\n\nWhy the numbers look so.\n")
    monkeypatch.setattr(ablation, "run_row", lambda *args: pytest.fail("a recorded run was trained again"))
    run_main(ablation, tmp_path)
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| student, supervised (`baseline`) | 1.0 ± 0.0 (n=1, 10 s) | 30.0 ± 0.0 (n=1, 10 s) |" in text
    assert "## first-miniature" in text and "## pretrained-miniature" in text  # every regime with records
    assert text.endswith("## Discussion\n\nWhy the numbers look so.\n")  # the hand-written part is kept
    run_main(ablation, tmp_path)  # a second report replaces its generated part only
    assert (tmp_path / "docs" / "results.md").read_text() == text


def test_records_are_written_after_each_run_and_missing_teachers_trained_again(ablation, tmp_path, monkeypatch,
                                                                                quiet):
    calls = []

    def fake_run_row(row, dataset, seed, setting, work, init):
        calls.append((row.key, init.name if init else None))
        if row.key in ablation.TEACHER_ROWS:
            (work / row.key).mkdir(parents=True)
            (work / row.key / "model.safetensors").write_bytes(b"")
        return {"map": 0.02, "map_50": 0.04, "steps": 2, "seconds": 1.0}

    def fake_pretrain(setting, architecture, work):
        return work / f"pretrain-{architecture}", {"map": 0.5, "map_50": 0.7, "steps": 2, "seconds": 3.0}

    monkeypatch.setattr(ablation, "run_row", fake_run_row)
    monkeypatch.setattr(ablation, "pretrain", fake_pretrain)
    run_main(ablation, tmp_path, "--rows", "adl,adl_same")
    # adl needs the teacher, adl_same the same-architecture one: each trained once, first; pretrained starts passed
    assert calls == [("teacher", "pretrain-teacher"), ("adl", "pretrain-student"),
                     ("teacher_same", "pretrain-student"), ("adl_same", "pretrain-student")]
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert {(r["dataset"], r["row"]) for r in saved} == {
        ("synthetic", "teacher"), ("synthetic", "adl"), ("synthetic", "teacher_same"), ("synthetic", "adl_same"),
        ("pretraining", "pretrain_teacher"), ("pretraining", "pretrain_student")}
    stages = [r for r in saved if r["dataset"] == "pretraining"]
    assert all(set(r) == {"regime", "dataset", "row", "seed", "map", "map_50", "steps", "seconds"} for r in stages)
    rows = {r["row"]: r for r in saved if r["dataset"] == "synthetic"}
    assert all(r["start_map"] == 0.5 for r in rows.values())  # which checkpoints each row started from
    assert rows["adl"]["teacher_map"] == rows["adl_same"]["teacher_map"] == 0.02
    assert "teacher_map" not in rows["teacher"]


def test_only_rows_from_the_same_checkpoints_are_paired(ablation, tmp_path, monkeypatch, quiet):
    """A work dir trained again after a floating-point change holds other checkpoints: rows distilled from the new
    teacher are not paired with rows of the old one, and a distilled row is compared with the teacher it used."""
    runs = ablation.by_key(records({"baseline": [0.30, 0.30], "kl": [0.40, 0.40], "adl": [0.38, 0.36],
                                    "teacher": [0.50, 0.50], "sad": [0.45, 0.45]}), REGIME)
    for seed in (0, 1):
        for key in ("baseline", "kl", "adl", "sad"):
            runs[("synthetic", seed, key)]["start_map"] = 0.33
        for key in ("kl", "adl", "sad"):
            runs[("synthetic", seed, key)]["teacher_map"] = 0.50
    runs[("synthetic", 1, "adl")].update(start_map=0.35, teacher_map=0.49)  # after a retrain
    runs[("synthetic", 1, "teacher")]["map"] = 0.49  # the retrained teacher's record replaced the old one
    differences, unpaired = ablation.paired(runs, "synthetic", "adl", "kl")
    assert differences == pytest.approx([-2.0]) and unpaired == [1]
    differences, unpaired = ablation.paired(runs, "synthetic", "adl", "baseline")
    assert differences == pytest.approx([8.0]) and unpaired == [1]  # other start at seed 1
    differences, unpaired = ablation.paired(runs, "synthetic", "sad", "teacher")
    assert differences == pytest.approx([-5.0, -5.0]) and unpaired == []  # compared with its own teacher
    lines = "\n".join(ablation.claim_lines(runs, ["synthetic"]))
    assert "C1 ADL beats KL (labeled only): -2.0 points on average (seeds: -2.0): one seed; not paired (other " \
           "checkpoints): seed 1" in lines

    # The pretraining stage trained again with another result: its record is replaced, and new rows name it.
    stage = {"map": 0.33, "map_50": 0.5, "steps": 2, "seconds": 3.0}
    monkeypatch.setattr(ablation, "pretrain", lambda setting, architecture, work: (work, stage))
    monkeypatch.setattr(ablation, "run_row", lambda *args: {"map": 0.1, "map_50": 0.2, "steps": 2, "seconds": 1.0})
    run_main(ablation, tmp_path, "--rows", "baseline")
    stage.update(map=0.35)
    run_main(ablation, tmp_path, "--rows", "baseline_long")
    saved = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert [r["map"] for r in saved if r["row"] == "pretrain_student"] == [0.35]
    assert {r["row"]: r["start_map"] for r in saved if r["dataset"] == "synthetic"} == {
        "baseline": 0.33, "baseline_long": 0.35}


def test_rows_and_regimes_are_consistent(ablation):
    for regime in ablation.REGIMES.values():
        assert set(regime.rows) <= set(ablation.ROWS)
        for key in regime.rows:
            assert ablation.ROWS[key].teacher in ablation.TEACHER_ROWS
    names = {"teacher", "baseline", "baseline_long", "kl", "fdl", "adl", "adl_released", "adl_same", "kl_background",
             "hard", "sad", "sad_released", "sad_shifted"}
    assert names <= set(ablation.REGIMES[REGIME].rows)  # the row names docs/results.json promises


def test_processes_sharing_the_results_file_keep_each_others_records(ablation, tmp_path):
    """Two grid processes (--only_seeds) each add records to one file: neither overwrites the other's."""
    path = tmp_path / "results.json"
    first, second = records({"baseline": [0.1, 0.2]})
    ablation.add_record(path, first)
    ablation.add_record(path, second)  # as if from another process that loaded the file before `first` existed
    ablation.add_record(path, {**first, "map": 0.15})  # a rerun replaces its own record only
    assert sorted((r["seed"], r["map"]) for r in json.loads(path.read_text())) == [(0, 0.15), (1, 0.2)]


def test_only_seeds_runs_those_seeds_and_skips_what_another_process_recorded(ablation, tmp_path, monkeypatch,
                                                                            quiet):
    calls = []

    def fake_run_row(row, dataset, seed, setting, work, init):
        calls.append((row.key, seed))
        if seed == 1 and row.key == "teacher":  # meanwhile, another process records seed 1's baseline
            ablation.add_record(tmp_path / "docs" / "results.json", records({"baseline": [0.3, 0.3]})[1])
        if row.key in ablation.TEACHER_ROWS:
            (work / row.key).mkdir(parents=True)
            (work / row.key / "model.safetensors").write_bytes(b"")
        return {"map": 0.02, "map_50": 0.04, "steps": 2, "seconds": 1.0}

    monkeypatch.setattr(ablation, "run_row", fake_run_row)
    monkeypatch.setattr(ablation, "pretrain", lambda setting, architecture, work: (work, None))
    ablation.main(["--quick", "--datasets", "synthetic", "--seeds", "3", "--only_seeds", "1",
                   "--rows", "teacher,baseline,adl", "--work_dir", str(tmp_path / "work"),
                   "--docs_dir", str(tmp_path / "docs")])
    assert calls == [("teacher", 1), ("adl", 1)]


def test_processes_split_the_rows_and_wait_for_a_teacher_another_one_trains(ablation, tmp_path, monkeypatch, quiet,
                                                                             capsys):
    """Two grid processes with overlapping row lists: a row the other process is training is left to it, and a
    distilled row waits for the teacher the other process is training instead of training it a second time."""
    from filelock import FileLock

    calls, work = [], tmp_path / "work" / REGIME / "quick" / "synthetic-0"
    work.mkdir(parents=True)

    def fake_run_row(row, dataset, seed, setting, folder, init):
        calls.append(row.key)  # saves no checkpoint
        return {"map": 0.02, "map_50": 0.04, "steps": 2, "seconds": 1.0}

    def other_process(row: str, training) -> threading.Thread:
        """A thread that holds `row`'s lock while `training()` runs, as a process training `row` would."""
        holding = threading.Event()

        def train():
            with FileLock(work / f".{row}.lock"):
                holding.set()
                training()

        thread = threading.Thread(target=train)
        thread.start()
        holding.wait()
        return thread

    grid_wants_the_teacher = threading.Event()

    class WatchedLock(FileLock):
        """The grid's lock, which tells the test when the grid asks for the teacher's."""

        def acquire(self, *args, **kwargs):
            if Path(self.lock_file).name == ".teacher.lock":
                grid_wants_the_teacher.set()
            return super().acquire(*args, **kwargs)

    def teacher_saved_once_the_grid_waits_for_it():
        # A grid without the teacher's lock never asks for it; then the checkpoint comes too late for it.
        grid_wants_the_teacher.wait(timeout=5)
        (work / "teacher").mkdir()
        (work / "teacher" / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(ablation, "run_row", fake_run_row)
    monkeypatch.setattr(ablation, "pretrain", lambda setting, architecture, work: (work, None))
    monkeypatch.setattr(ablation, "FileLock", WatchedLock)
    grid_done = threading.Event()
    thread = other_process("baseline", grid_done.wait)  # trains the baseline for as long as the grid below runs
    try:
        run_main(ablation, tmp_path, "--rows", "baseline,fdl")
    finally:
        grid_done.set()
        thread.join()
    assert calls == ["teacher", "fdl"]
    assert "synthetic seed 0: baseline is running in another process: skipped" in capsys.readouterr().out

    calls.clear()
    thread = other_process("teacher", teacher_saved_once_the_grid_waits_for_it)
    run_main(ablation, tmp_path, "--rows", "adl")
    thread.join()
    assert calls == ["adl"]  # the teacher was not trained twice


def test_the_pretraining_record_is_kept_beside_its_checkpoint(ablation, tmp_path, monkeypatch):
    trained = []

    def fake_pretrain(setting, backbone, width, architecture, folder):
        trained.append(architecture)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"")
        return {"map": 0.5, "map_50": 0.7, "steps": 2, "seconds": 3.0}

    monkeypatch.setattr(ablation, "_pretrain", fake_pretrain)
    setting = ablation.REGIMES[REGIME].datasets["synthetic"]
    first = ablation.pretrain(setting, "student", tmp_path)
    again = ablation.pretrain(setting, "student", tmp_path)  # a later run (or process) reuses it, record included
    assert trained == ["student"] and first == again and again[1]["map"] == 0.5


def test_a_row_cut_short_resumes_from_its_last_checkpoint(ablation, tmp_path, monkeypatch, quiet, capsys):
    """A session that ends mid-row loses at most CHECKPOINT_EVERY steps: the rerun resumes, and the record counts the
    seconds trained before the interruption."""
    monkeypatch.setattr(ablation, "CHECKPOINT_EVERY", 1)
    original_on_save = ablation._ElapsedTime.on_save

    def interrupted(self, args, state, control, **kwargs):
        original_on_save(self, args, state, control, **kwargs)
        raise KeyboardInterrupt  # the session ends right after the first checkpoint

    monkeypatch.setattr(ablation._ElapsedTime, "on_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_main(ablation, tmp_path, "--rows", "baseline")
    folder = tmp_path / "work" / REGIME / "quick" / "synthetic-0" / "baseline"
    saved = json.loads((folder / "checkpoint-1" / "elapsed.json").read_text())
    assert saved["seconds"] > 0
    assert not (tmp_path / "docs" / "results.json").read_text().count('"baseline"')

    # A later checkpoint whose writing was cut short (its marker still beside it) is not resumed from.
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2.incomplete").write_text("")
    monkeypatch.setattr(ablation._ElapsedTime, "on_save", original_on_save)
    capsys.readouterr()
    run_main(ablation, tmp_path, "--rows", "baseline")
    assert f"resuming from {folder / 'checkpoint-1'}" in capsys.readouterr().out
    record = next(r for r in json.loads((tmp_path / "docs" / "results.json").read_text()) if r["row"] == "baseline")
    assert record["steps"] == 2 and record["seconds"] >= saved["seconds"]
    assert not list(folder.glob("checkpoint-*"))  # a finished row keeps no checkpoints


@pytest.fixture
def distill_gradients(ablation):
    spec = importlib.util.spec_from_file_location("distill_gradients", REPO / "experiments" / "distill_gradients.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports `ablation`, which the fixture above registered
    return module


def test_gradient_parts_split_the_mass_by_anchor_and_direction(distill_gradients):
    import torch

    # One image, three anchors, two classes: anchor 0 is foreground of class 1, anchor 1 background, anchor 2 ignored.
    anchor_labels = torch.tensor([[1, 0, -1]])
    supervised_grad = torch.tensor([[[0.1, -0.5], [0.2, 0.3], [0.0, 0.0]]])  # negative on the target entry only
    student = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 1.0], [-1.0, 2.0], [5.0, 5.0]]])  # background: class 0 pushed down, class 1 up
    grad = torch.tensor([[[1.0, -2.0], [4.0, -8.0], [16.0, 32.0]]])
    parts = distill_gradients.gradient_parts(grad, supervised_grad, student, teacher, anchor_labels)
    assert {key: float(value) for key, value in parts.items()} == {
        "fg_class": 2.0, "fg_other": 1.0, "bg_down": 4.0, "bg_up": 8.0}  # the ignored anchor counts nowhere


def test_distill_gradients_measures_each_loss_against_a_trained_teacher(ablation, distill_gradients, tmp_path,
                                                                         monkeypatch, quiet):
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="No teacher"):
        distill_gradients.main(["--quick", "--batches", "1", "--work_dir", str(work)])
    run_main(ablation, tmp_path, "--rows", "teacher")
    with pytest.raises(SystemExit, match="No teacher_same"):
        distill_gradients.main(["--quick", "--student", "teacher_same", "--work_dir", str(work)])
    totals = distill_gradients.main(["--quick", "--batches", "1", "--work_dir", str(work)])
    assert set(totals) == {"supervised", *distill_gradients.LOSSES}
    for key, parts in totals.items():
        assert sum(parts[p] for p in distill_gradients.PARTS) == pytest.approx(parts["mass"], rel=1e-6), key
    assert totals["kl"]["mass"] > 0 and totals["adl"]["mass"] > 0
    background_only = totals["kl_background"]
    assert background_only["fg_class"] == background_only["fg_other"] == 0.0
    assert background_only["bg_down"] + background_only["bg_up"] > 0
    run_main(ablation, tmp_path, "--rows", "teacher_same")
    trained = distill_gradients.main(["--quick", "--student", "teacher_same", "--batches", "1", "--work_dir",
                                      str(work)])
    assert trained["kl"]["mass"] != totals["kl"]["mass"]  # another student, other gradients


def test_bccd_shifted_stream_is_the_same_smears_in_another_stain(ablation):
    """C4's shifted stream keeps the classes: BCCD's is its own unlabeled half, recoloured as it is read (not shapes
    of another domain), in the unlabeled half's order."""
    import itertools

    import numpy as np

    setting = ablation.REGIMES[REGIME].datasets["bccd"]
    _, _, unlabeled, shifted, _, _ = ablation.scenario("bccd", 0, setting)
    recoloured = [row["image"] for row in itertools.islice(shifted, 3)]
    originals = [unlabeled[i]["image"].convert("RGB") for i in range(3)]

    def luminance(image):
        return np.asarray(image.convert("L"), dtype=np.float64).ravel()

    for i, image in enumerate(recoloured):
        assert image.size == originals[i].size
        difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(originals[i], dtype=np.int16))
        assert difference.mean() > 3  # recoloured: well above the 1-level rounding of an identity round trip
        # the same smear, in the same place of the stream: its layout matches its own original, not the others
        correlations = [np.corrcoef(luminance(image), luminance(original))[0, 1] for original in originals]
        assert correlations[i] > 0.9 and np.argmax(correlations) == i
