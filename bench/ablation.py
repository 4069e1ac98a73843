"""Reproduce the SAD paper's claims in miniature: train the ablation grid, write docs/results.md and a bar chart.

    python bench/ablation.py [--quick] [--datasets synthetic,bccd] [--seeds 3] [--work_dir runs/ablation]

Rows (claims C1-C5 of the method notes):
  1 teacher (larger model), supervised             6 + ADL, teacher of the student's own architecture (C2)
  2 student baseline, supervised                   7 + hard-target data distillation on unlabeled images (C3)
  3 + plain KL distillation, labeled only (C1)     8 SAD: ADL on labeled + unlabeled images (C3, C5)
  4 + focal-style distillation, labeled only (C1)  9 SAD with unlabeled images from a shifted distribution (C4)
  5 + ADL, labeled only (C1)

Every finished run is appended to `<work_dir>/runs.jsonl`; a rerun skips what is there (resumable). Datasets:
`synthetic` (the built-in scenes; unlabeled = the synthetic stream, shifted = the other palette/backgrounds) and
`bccd` (../shared/datasets/bccd: half of its train split is labeled, the other half is the unlabeled pool, shifted =
synthetic scenes; evaluated on its val split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hf_sad import create_detector
from hf_sad.data import load_coco_detection
from hf_sad.demo import DemoConfig, train_and_evaluate, training_arguments
from hf_sad.synthetic import make_labeled_dataset, make_unlabeled_stream, synthetic_id2label

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "datasets" / "bccd"
DISCUSSION = "## Discussion"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    distill_loss: str = "none"
    unlabeled: str | None = None  # None, "same" or "shifted"
    teacher: str = "large"  # "large" or "same" (the trained baseline student)
    model: str = "student"  # "teacher" or "student"
    settings: tuple[tuple[str, float], ...] = ()  # other SADTrainingArguments of this row, e.g. a loss weight


ROWS = [
    Row("teacher", "teacher (wider, longer-trained), supervised", model="teacher"),
    Row("baseline", "student, supervised"),
    Row("kl", "student + KL distillation (labeled)", "kl"),
    Row("fdl", "student + focal distillation (labeled)", "fdl"),
    Row("adl", "student + ADL (labeled)", "adl"),
    Row("adl_same", "student + ADL, same-architecture teacher", "adl", teacher="same"),
    Row("hard", "student + hard pseudo-labels (unlabeled)", "hard", unlabeled="same"),
    Row("sad", "SAD: ADL, labeled + unlabeled", "adl", unlabeled="same"),
    Row("sad_shifted", "SAD, unlabeled from a shifted distribution", "adl", unlabeled="shifted"),
]
# Follow-up rows, run only when named in --rows: what was tried where a claim did not reproduce (docs/results.md).
INVESTIGATIONS = [
    Row("adl_w5", "student + ADL (labeled), distillation weight 5", "adl", settings=(("labeled_distill_weight", 5.0),)),
    Row("sad_w5", "SAD, distillation weights 5", "adl", unlabeled="same",
        settings=(("labeled_distill_weight", 5.0), ("unlabeled_distill_weight", 5.0))),
]
ALL_ROWS = ROWS + INVESTIGATIONS
# The row whose saved model a distillation row uses as its teacher (`Row.teacher`).
TEACHER_ROWS = {"large": ROWS[0], "same": ROWS[1]}

# synthetic = exactly the demo's settings, so rows teacher / baseline / sad of seed 0 are `hf-sad demo`'s three runs.
# BCCD images are 640x480 with ~13 cells each: 192x144 keeps platelets (~25 px at 640) at ~7 px, and a shorter
# student schedule keeps both seeds of its grid within ~30 minutes on 2 cores.
SETTINGS = {
    "synthetic": DemoConfig(),
    "bccd": replace(DemoConfig(), image_size=192, batch_size=4, teacher_steps=300, student_steps=200),
}
QUICK = {name: replace(c, num_train=16, num_val=16, teacher_steps=4, student_steps=4, batch_size=2)
         for name, c in SETTINGS.items()}


def scenario(dataset: str, seed: int, config: DemoConfig):
    """(labeled train, val, unlabeled stream, shifted unlabeled stream, id2label, processor size) of a dataset."""
    shifted = make_unlabeled_stream(seed=seed, image_size=config.image_size, shifted=True)
    if dataset == "synthetic":
        train = make_labeled_dataset(config.num_train, seed=seed, image_size=config.image_size)
        val = make_labeled_dataset(config.num_val, seed=1000, image_size=config.image_size)
        unlabeled = make_unlabeled_stream(seed=seed, image_size=config.image_size)
        size = {"height": config.image_size, "width": config.image_size}
        return train, val, unlabeled, shifted, synthetic_id2label(), size
    if dataset == "bccd":
        full = load_coco_detection(BCCD / "train.json", BCCD / "images").shuffle(seed=seed)
        half = len(full) // 2
        train = full.select(range(min(half, config.num_train * 4)))
        unlabeled = full.select(range(half, len(full))).select_columns(["image"])
        val = load_coco_detection(BCCD / "val.json", BCCD / "images")
        if config.num_val < 64:
            val = val.select(range(config.num_val))
        names = train.features["objects"]["category"].feature.names
        height = config.image_size * 3 // 4
        return train, val, unlabeled, shifted, dict(enumerate(names)), {"height": height, "width": config.image_size}
    raise ValueError(f"Unknown dataset {dataset!r}: expected 'synthetic' or 'bccd'.")


def run_row(row: Row, dataset: str, seed: int, config: DemoConfig, work: Path) -> dict:
    train, val, unlabeled, shifted, id2label, size = scenario(dataset, seed, config)
    teacher_model = row.model == "teacher"
    backbone = config.teacher_backbone if teacher_model else config.student_backbone
    width = config.teacher_width if teacher_model else config.student_width
    torch.manual_seed(seed)
    model, processor = create_detector(backbone, id2label, image_size=size, fpn_channels=width, head_channels=width,
                                       head_num_convs=config.head_num_convs, anchor_scale=config.anchor_scale)
    processor.pad_size_divisor = 32  # the pyramid handles any multiple of 32; padding to 128 would waste compute
    teacher = None
    if row.distill_loss != "none":
        teacher = str(work / TEACHER_ROWS[row.teacher].key)
    steps = config.teacher_steps if teacher_model else config.student_steps
    stream = {"same": unlabeled, "shifted": shifted}.get(row.unlabeled)
    batch = 2 * config.batch_size if stream is not None else config.batch_size
    args = training_arguments(
        replace(config, batch_size=batch, seed=seed), work / row.key, steps, distill_loss=row.distill_loss,
        unlabeled_ratio=0.5 if stream is not None else 0.0, disable_tqdm=True, **dict(row.settings),
    )
    trainer, metrics, seconds = train_and_evaluate(f"{dataset}/{seed}/{row.key}", model, processor, args, train, val,
                                                   teacher=teacher, unlabeled=stream)
    if row in TEACHER_ROWS.values():
        trainer.save_model(str(work / row.key))
    return {"map": metrics["map"], "map_50": metrics["map_50"], "seconds": round(seconds, 1)}


def load_runs(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["seed"], r["row"]): r for r in runs}


def summarize(runs: dict[tuple, dict], datasets: list[str]) -> dict[str, dict[str, tuple[float, float, int, float]]]:
    """dataset -> row key -> (mean mAP %, std mAP %, number of seeds, mean training seconds)."""
    table: dict[str, dict[str, tuple[float, float, int, float]]] = {}
    for dataset in datasets:
        table[dataset] = {}
        for row in ALL_ROWS:
            found = [r for (d, _, k), r in runs.items() if d == dataset and k == row.key]
            if found:
                values = [100 * r["map"] for r in found]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                seconds = statistics.mean(r["seconds"] for r in found)
                table[dataset][row.key] = (statistics.mean(values), std, len(values), seconds)
    return table


def write_chart(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(6 * len(table), 4.5), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], table.items()):
        keys = [r.key for r in ALL_ROWS if r.key in rows]
        means = [rows[k][0] for k in keys]
        stds = [rows[k][1] for k in keys]
        colours = ["#777777" if k in ("teacher", "baseline") else "#1f77b4" for k in keys]
        ax.bar(range(len(keys)), means, yerr=stds, color=colours, capsize=3)
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
        ax.set_ylabel("COCO mAP (%)")
        ax.set_title(f"{dataset} (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(table, settings: dict, command: str, path: Path) -> None:
    lines = [
        "# SAD in miniature: ablation results",
        "",
        "Produced by `bench/ablation.py` from every run recorded in its `runs.jsonl` (last command: "
        f"`{command}`). COCO mAP (%) on each dataset's validation split, mean ± std over seeds (n), and the mean "
        "training time of a run. Everything ran on a 2-core CPU.",
        "",
        "| row | " + " | ".join(table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for row in ROWS + [r for r in INVESTIGATIONS if any(r.key in rows for rows in table.values())]:
        cells = []
        for dataset in table:
            if row.key in table[dataset]:
                mean, std, n, seconds = table[dataset][row.key]
                cells.append(f"{mean:.1f} ± {std:.1f} (n={n}, {seconds:.0f} s)")
            else:
                cells.append("not run")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "![ablation](ablation.png)", "", "## Settings", ""]
    for dataset, config in settings.items():
        lines.append(f"- **{dataset}**: `{json.dumps(asdict(config))}`")
    lines += ["", "## Claims", ""]
    lines += claim_lines(table)
    # A hand-written "## Discussion" (what was investigated, why a claim does or does not hold) survives reruns.
    previous = path.read_text() if path.exists() else ""
    discussion = previous[previous.index(DISCUSSION):] if DISCUSSION in previous else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + discussion if discussion else ""))


def claim_lines(table) -> list[str]:
    """One line per claim and dataset: does the measured ordering support it (difference of means, in mAP points)?"""
    checks = [
        ("C1 ADL beats KL (labeled only)", "adl", "kl"),
        ("C1 ADL beats focal distillation (labeled only)", "adl", "fdl"),
        ("C1' ADL beats the supervised baseline", "adl", "baseline"),
        ("C2 ADL with a same-architecture teacher beats the baseline", "adl_same", "baseline"),
        ("C3 SAD (soft targets) beats hard pseudo-labels", "sad", "hard"),
        ("C4 shifted unlabeled data still beats the baseline", "sad_shifted", "baseline"),
        ("C5 the SAD student surpasses its teacher", "sad", "teacher"),
    ]
    lines = []
    for dataset, rows in table.items():
        for name, better, worse in checks:
            if better in rows and worse in rows:
                diff = rows[better][0] - rows[worse][0]
                noise = max(rows[better][1], rows[worse][1])
                verdict = "supported" if diff > noise else ("not supported" if diff < -noise else "within noise")
                lines.append(f"- {dataset}: {name}: {diff:+.1f} points ({verdict}; largest std {noise:.1f})")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny data and a few steps per row")
    parser.add_argument("--datasets", default="synthetic,bccd", help="comma-separated: synthetic, bccd")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per dataset (default: synthetic 3, bccd 2; 0 only rewrites the report)")
    parser.add_argument("--rows", default=",".join(r.key for r in ROWS),
                        help="comma-separated row keys (default: the grid; follow-ups: "
                        + ", ".join(r.key for r in INVESTIGATIONS) + ")")
    parser.add_argument("--work_dir", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--docs_dir", default=None, help="where results.md and ablation.png go (default: docs/, or "
                        "the work dir with --quick)")
    args = parser.parse_args(argv)
    datasets = args.datasets.split(",")
    configs = QUICK if args.quick else SETTINGS
    settings = {d: configs[d] for d in datasets}
    work_dir = Path(args.work_dir) / ("quick" if args.quick else "full")
    runs_file = work_dir / "runs.jsonl"
    runs = load_runs(runs_file)
    requested = args.rows.split(",")
    unknown = set(requested) - {r.key for r in ALL_ROWS}
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; rows: {[r.key for r in ALL_ROWS]}")
    wanted = [r for r in ALL_ROWS if r.key in requested]
    seeds = {d: {"synthetic": 3, "bccd": 2}[d] if args.seeds is None else args.seeds for d in datasets}
    plan = [(d, s, r) for d in datasets for s in range(seeds[d]) for r in wanted]
    done = sum((d, s, r.key) in runs for d, s, r in plan)
    print(f"{len(plan)} runs planned, {done} already done ({runs_file})", flush=True)
    start = time.perf_counter()

    def run_and_record(row: Row, dataset: str, seed: int, work: Path) -> None:
        result = run_row(row, dataset, seed, settings[dataset], work)
        record = {"dataset": dataset, "seed": seed, "row": row.key, **result}
        runs[(dataset, seed, row.key)] = record
        runs_file.parent.mkdir(parents=True, exist_ok=True)
        with runs_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    for i, (dataset, seed, row) in enumerate(plan, 1):
        if (dataset, seed, row.key) in runs:
            continue
        work = work_dir / f"{dataset}-{seed}"
        print(f"[{i}/{len(plan)}] {dataset} seed {seed}: {row.label} ({time.perf_counter() - start:.0f} s)", flush=True)
        # A distillation row needs its teacher's checkpoint, which a finished grid may no longer have on disk
        # (a follow-up row run later, elsewhere): train that teacher again; its new record replaces the old one.
        needed = TEACHER_ROWS[row.teacher] if row.distill_loss != "none" else None
        if needed is not None and not (work / needed.key).is_dir():
            print(f"  {dataset} seed {seed}: no {needed.key} checkpoint in {work}; training it first", flush=True)
            run_and_record(needed, dataset, seed, work)
        run_and_record(row, dataset, seed, work)
    # The report covers every dataset with recorded runs, not only this invocation's: a follow-up run on one
    # dataset must not drop the others from docs/results.md.
    reported = [d for d in SETTINGS if d in datasets or any(key[0] == d for key in runs)]
    table = summarize(runs, reported)
    docs = Path(args.docs_dir or (work_dir if args.quick else ROOT / "docs"))
    docs.mkdir(parents=True, exist_ok=True)
    command = "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(table, {d: configs[d] for d in reported}, command.strip(), docs / "results.md")
    write_chart(table, docs / "ablation.png")
    print((docs / "results.md").read_text())
    return table


if __name__ == "__main__":
    main()
