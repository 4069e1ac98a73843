"""hf-sad performance benchmarks B1-B12 on the CPU: a table on stdout and a JSON file.

    python bench/run.py [--quick] [--only B1,B3] [--json bench/results.json] [--threads N] [--workers N]
                        [--bccd_model DIR]

Every benchmark runs at the demo scale (ResNet-18, 128 px, 64-channel FPN/heads, batch 4) and, unless `--quick`, at a
realistic scale (ResNet-50, 512 px, 256-channel FPN/heads, batch 2, 80 classes). See bench/README.md for what each id
measures and how. `main(argv) -> dict` returns what is written to the JSON file.

Timed work runs in worker subprocesses of this script (one per scale for B1/B2/B3/B5/B6, one fresh process per case
for the memory benchmark B7; B4 is `bench/bench_losses.py`, which spawns its own), with both sides of each ratio
timed in the same process, alternating call by call after warm-up; the median of the repeats is reported. B8-B12
(bench/bench_export.py: exported inference, compiled training, YOLO for context, padding, eager variants) run once
per run in one more worker, each on its own network.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

IDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12")
# Rows each id gives: B1 and B3 also compare with torchvision's RetinaNet in a row of their own; B8 gives the int8
# export's rows (B8b).
ROWS = {"B1": ("B1", "B1tv"), "B3": ("B3", "B3tv"), "B8": ("B8", "B8b")}
EXPORT_IDS = ("B8", "B9", "B10", "B11", "B12")
SPECS = {
    "B1": {
        "what": "supervised training step (forward + backward + SGD step)",
        "reference": "the network's own compute: backbone/FPN/heads forward, backward of fixed output gradients, "
                     "the same SGD step",
        "target": "<= 1.03x time",
    },
    "B1tv": {
        "what": "supervised training step (forward + backward + SGD step)",
        "reference": "torchvision RetinaNet, same backbone/FPN/heads/anchors/weights/batch/targets",
        "target": "<= 0.75x time",
    },
    "B2": {
        "what": "SAD training step (SADTrainer.compute_loss + backward + SGD step, prepared mixed batch)",
        "reference": "same networks' pure compute: student fwd + bwd, teacher fwd, same SGD step",
        "target": "<= 1.10x time",
    },
    "B3": {
        "what": "inference incl. post-processing (score 0.05, top-k 1000, NMS 0.5, 100 dets)",
        "reference": "the network's own forward (backbone/FPN/heads), same batch",
        "target": "<= 1.05x time",
    },
    "B3tv": {
        "what": "inference incl. post-processing (score 0.05, top-k 1000, NMS 0.5, 100 dets)",
        "reference": "torchvision RetinaNet in eval mode, same sizes and weights",
        "target": "<= 0.75x time",
    },
    "B4": {
        "what": "ADL forward + backward (hf_sad.distillation.losses.adaptive_distillation_loss)",
        "reference": "plain autograd formula (bench/bench_losses.py)",
        "target": "<= 0.5x time and <= 0.5x peak memory",
    },
    "B5": {
        "what": "COCO mAP of the same detections (hf_sad.evaluation, faster-coco-eval)",
        "reference": "pycocotools COCO + loadRes + COCOeval evaluate/accumulate/summarize",
        "target": ">= 5x faster, stats identical (<= 1e-4)",
    },
    "B6": {
        "what": "training data pipeline (stream + SADDataCollator + DataLoader from SADTrainer)",
        "reference": "images/s consumed by the SAD step (B2, same size and batch)",
        "target": ">= 3x the consumption",
    },
    "B7": {
        "what": "peak memory of a SAD step",
        "reference": "supervised student step with the teacher weights in memory",
        "target": "<= 1.25x",
    },
    "B8": {
        "what": "exported student (ONNX Runtime, post-processing in the graph)",
        "reference": "torchvision RetinaNet in eager PyTorch, same network and weights",
        "target": "<= 0.6x time",
    },
    "B8b": {
        "what": "int8 export (ONNX Runtime static quantisation, QDQ convolutions)",
        "reference": "the float export (speed); its mAP on BCCD (accuracy, --bccd_model)",
        "target": "faster, and <= 1 mAP point lost",
    },
    "B9": {
        "what": "torch.compile'd (inductor) training step",
        "reference": "the same step in eager PyTorch, same weights and batch",
        "target": "< 1.0x time to be recommended",
    },
    "B10": {
        "what": "our export (ONNX Runtime, with NMS)",
        "reference": "Ultralytics YOLO11n from its config, exported to ONNX with NMS: a different network, context",
        "target": "context only",
    },
    "B11": {
        "what": "inference, processor padding to the backbone's stride (32)",
        "reference": "the same, padding to a multiple of 128 (the old default); 416 px images, 192 px model",
        "target": "< 1.0x time",
    },
    "B12": {
        "what": "eager inference: channels_last / backbone BatchNorm folded / both",
        "reference": "plain eager inference, same network and batch",
        "target": "measured, kept where < 0.95x",
    },
}
# --quick keeps the B8/B12 cases (image side, batch) of this side only.
QUICK_SIDE = 320
# B5 sizes per scale: (images, repeats). 100 detections per image either way.
B5_SIZES = {"demo": (1000, 1), "realistic": (3000, 1)}
B6_BATCHES = {"demo": 30, "realistic": 15}


# ----------------------------------------------------------------------------------------------------------------------
# Worker side (runs inside a subprocess)
# ----------------------------------------------------------------------------------------------------------------------


def _emit(payload: dict) -> None:
    print("@@RESULT " + json.dumps(payload, default=_json_default), flush=True)


def _json_default(value):
    if isinstance(value, tuple):
        return list(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _run_one(bench_id: str, scale: str, fn):
    """Run one benchmark in a worker and emit its result (or its error, so that the other benchmarks go on); the
    torch seed is reset after it. Returns the result, or None on an error."""
    import torch

    start = time.perf_counter()
    try:
        result = fn()
        result["elapsed_s"] = time.perf_counter() - start
        _emit({"id": bench_id, "scale": scale, "ok": True, "result": result})
        return result
    except Exception:  # noqa: BLE001 - reported in the table, the other benchmarks go on
        _emit({"id": bench_id, "scale": scale, "ok": False, "error": traceback.format_exc()})
        return None
    finally:
        torch.manual_seed(0)


def _worker_timing(args: argparse.Namespace) -> None:
    """B1, B3, B2, B6, B5 for one scale, in this order (B6 needs B2's consumption)."""
    from common import SCALES, environment, quiet

    quiet()
    scale = SCALES[args.scale]
    wanted = args.ids.split(",")
    _emit({"id": "env", "environment": environment()})
    consumption = args.consumption

    def run(bench_id, fn):
        return _run_one(bench_id, scale.name, fn)

    if "B1" in wanted:
        import bench_detector

        run("B1", lambda: bench_detector.bench_train_step(scale))
    if "B3" in wanted:
        import bench_detector

        run("B3", lambda: bench_detector.bench_inference(scale))
    if "B2" in wanted:
        import bench_sad

        result = run("B2", lambda: bench_sad.bench_sad_step(scale, args.workdir))
        if result is not None:
            consumption = result["consumption_images_per_s"]
    if "B6" in wanted:
        import bench_sad

        def b6():
            result = bench_sad.bench_pipeline(scale, args.workdir, args.workers, B6_BATCHES[scale.name])
            result["consumption_images_per_s"] = consumption
            result["ratio"] = result["images_per_s"] / consumption if consumption else None
            return result

        run("B6", b6)
    if "B5" in wanted:
        import bench_coco

        def b5():
            num_images, repeats = B5_SIZES[scale.name]
            predictions, targets = bench_coco.make_data(num_images)
            from common import interleaved_times, ratio_row

            outputs, eval_only = {}, []

            def ours():
                outputs["ours"] = bench_coco.ours(predictions, targets)

            def reference():
                timings = {}
                outputs["reference"] = bench_coco.reference(predictions, targets, timings)
                eval_only.append(timings["eval_s"])

            times = interleaved_times({"ours": ours, "reference": reference}, repeats, 0)
            ratios = ratio_row(times, "ours", "reference")
            speedup = 1.0 / ratios["ratio"]
            return {
                "sizes": {"images": num_images, "detections_per_image": bench_coco.DETECTIONS_PER_IMAGE,
                          "ground_truth_boxes": sum(len(t["labels"]) for t in targets),
                          "classes": bench_coco.NUM_CLASSES},
                "repeats": repeats,
                "times": times,
                "speedup": speedup,
                "wall_speedup": 1.0 / ratios["wall_ratio"],
                "reference_eval_accumulate_summarize_s": statistics.median(eval_only),
                "max_abs_stat_diff": bench_coco.max_abs_diff(outputs["ours"], outputs["reference"]),
                "stats_ours": outputs["ours"],
                "stats_reference": outputs["reference"],
            }

        run("B5", b5)


def _worker_export(args: argparse.Namespace) -> None:
    """B8 (+ B8b), B9, B10, B11, B12: exported inference, compiled training, YOLO for context, padding, eager
    variants; each on its own network (bench_export.py), once per run."""
    import bench_export
    from common import SCALES, environment, quiet

    quiet()
    wanted = args.ids.split(",")
    _emit({"id": "env", "environment": environment()})

    def run(bench_id, fn):
        return _run_one(bench_id, "export", fn)

    def cases(all_cases):
        return tuple(case for case in all_cases if case[0] == QUICK_SIDE) if args.quick else all_cases

    b8_cases = cases(bench_export.B8_CASES)
    if "B8" in wanted:
        run("B8", lambda: bench_export.bench_exported_inference(args.threads, True, args.workdir, b8_cases))
        if args.bccd_model:
            bccd = Path(args.bccd_dir)
            run("B8acc", lambda: bench_export.int8_accuracy(args.bccd_model, bccd / "val.json", bccd / "images",
                                                            args.workdir))
    if "B9" in wanted:
        run("B9", lambda: bench_export.bench_compiled_training(SCALES["demo"], args.workdir))
    if "B10" in wanted:
        run("B10", lambda: bench_export.bench_yolo(args.threads, args.workdir, size=max(side for side, _ in b8_cases)))
    if "B11" in wanted:
        run("B11", lambda: bench_export.bench_padding(SCALES["demo"]))
    if "B12" in wanted:
        run("B12", lambda: bench_export.bench_eager_variants(cases(bench_export.B12_CASES)))


def _worker_memory(args: argparse.Namespace) -> None:
    from common import SCALES, quiet

    quiet()
    import bench_sad

    try:
        result = bench_sad.memory_case(SCALES[args.scale], args.workdir, args.case)
        _emit({"id": "B7case", "ok": True, "result": result})
    except Exception:  # noqa: BLE001
        _emit({"id": "B7case", "ok": False, "error": traceback.format_exc()})


# ----------------------------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------------------------


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    src = str(BENCH_DIR.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), src, env.get("PYTHONPATH", "")) if p)
    return env


def _spawn(worker_args: list[str], threads: int) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), *worker_args, "--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(threads))


def _collect(proc: subprocess.Popen) -> tuple[list[dict], str]:
    out, err = proc.communicate()
    payloads = [json.loads(line[len("@@RESULT "):]) for line in out.splitlines() if line.startswith("@@RESULT ")]
    if proc.returncode != 0:
        err = f"worker exited with {proc.returncode}\n{err[-4000:]}"
    return payloads, err


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _row(bench_id: str, scale: str, measured: str, passed: bool | None, details: dict, **extra) -> dict:
    spec = SPECS[bench_id]
    return {
        "id": bench_id,
        "scale": scale,
        "what": spec["what"],
        "reference": spec["reference"],
        "target": spec["target"],
        "measured": measured,
        "pass": passed,
        **extra,
        "details": details,
    }


def _timing_rows(payloads: list[dict], scale: str) -> list[dict]:
    rows = []
    for p in payloads:
        bench_id = p.get("id")
        if bench_id not in SPECS:
            continue
        if not p["ok"]:
            rows.append(_row(bench_id, scale, "ERROR", False, {"error": p["error"]}))
            continue
        r = p["result"]
        if bench_id in ("B1", "B3"):
            limit = r["network"]
            target = 1.03 if bench_id == "B1" else 1.05
            measured = f"{limit['ratio']:.3f}x (wall {limit['wall_ratio']:.3f}x)"
            rows.append(_row(bench_id, scale, measured, limit["ratio"] <= target, r, ratio=limit["ratio"],
                             wall_ratio=limit["wall_ratio"], sizes=r["sizes"], repeats=r["repeats"]))
            b = r["breakdown"]
            part = "loss+matching" if bench_id == "B1" else "post-processing"
            share = b["share_of_step_ours" if bench_id == "B1" else "share_of_inference_ours"]
            measured = (f"{r['ratio']:.2f}x (wall {r['wall_ratio']:.2f}x); {part} alone {b['ratio']:.2f}x, "
                        f"{100 * share:.0f}% of ours")
            rows.append(_row(f"{bench_id}tv", scale, measured, r["ratio"] <= 0.75, r, ratio=r["ratio"],
                             wall_ratio=r["wall_ratio"], component_ratio=b["ratio"], sizes=r["sizes"],
                             repeats=r["repeats"]))
        elif bench_id == "B2":
            b = r["breakdown"]
            measured = (f"{r['ratio']:.3f}x (wall {r['wall_ratio']:.3f}x); SAD-specific work alone "
                        f"{1e3 * b['times']['cpu_time_s']:.0f} ms = +{100 * b['share_of_pure_compute']:.1f}% of "
                        f"{r['times']['reference']['cpu_time_s']:.2f} s")
            rows.append(_row(bench_id, scale, measured, r["ratio"] <= 1.10, r, ratio=r["ratio"],
                             wall_ratio=r["wall_ratio"], sizes=r["sizes"], repeats=r["repeats"]))
        elif bench_id == "B6":
            ratio = r["ratio"]
            measured = (f"{_fmt_ratio(ratio)} ({r['images_per_s']:.1f} img/s, {r['workers']} workers, vs "
                        f"{r['consumption_images_per_s']:.2f} img/s consumed)" if ratio else "no B2 consumption")
            rows.append(_row(bench_id, scale, measured, None if ratio is None else ratio >= 3.0, r, ratio=ratio,
                             sizes={"images": r["images"], "batches": r["batches"], "workers": r["workers"],
                                    "padded_sizes": r["padded_sizes"]}, repeats=r["batches"]))
        elif bench_id == "B5":
            ok = r["speedup"] >= 5.0 and r["max_abs_stat_diff"] <= 1e-4
            measured = (f"{r['speedup']:.1f}x faster (wall {r['wall_speedup']:.1f}x; CPU "
                        f"{r['times']['ours']['cpu_time_s']:.1f} s vs {r['times']['reference']['cpu_time_s']:.1f} s),"
                        f" max |diff| {r['max_abs_stat_diff']:.1e}")
            rows.append(_row(bench_id, scale, measured, ok, r, ratio=1.0 / r["speedup"], speedup=r["speedup"],
                             sizes=r["sizes"], repeats=r["repeats"]))
    return rows


def _export_rows(payloads: list[dict], bccd_model: str | None) -> list[dict]:
    rows = []
    for p in payloads:
        bench_id = p.get("id")
        if bench_id not in SPECS and bench_id != "B8acc":
            continue
        if not p["ok"]:
            rows.append(_row("B8b" if bench_id == "B8acc" else bench_id, "export", "ERROR", False,
                             {"error": p["error"]}))
            continue
        r = p["result"]
        if bench_id == "B8":
            rows += _b8_rows(r)
            if not bccd_model:
                rows.append(_row("B8b", "BCCD mAP", "skipped: pass --bccd_model (a detector trained on BCCD)", None,
                                 {}))
        elif bench_id == "B8acc":
            change = r["map_change_points"]
            measured = (f"mAP {100 * r['int8']['map']:.1f} vs float {100 * r['float']['map']:.1f} "
                        f"({change:+.2f} points) on {r['images']} images")
            rows.append(_row("B8b", "BCCD mAP", measured, change >= -1.0, r, map_change_points=change))
        elif bench_id == "B9":
            for step, m in r["steps"].items():
                measured = f"{m['ratio']:.2f}x (wall {m['wall_ratio']:.2f}x); compiling took {m['compile_s']:.0f} s"
                rows.append(_row("B9", f"demo {step}", measured, m["ratio"] < 1.0, m, ratio=m["ratio"],
                                 wall_ratio=m["wall_ratio"], repeats=len(m["times"]["compiled"]["times_s"])))
        elif bench_id == "B10":
            if "skipped" in r:
                rows.append(_row("B10", "export", f"skipped: {r['skipped']}", None, r))
                continue
            t = r["times"]
            measured = (f"ours {1e3 * t['ours']['cpu_time_s']:.0f} ms ({r['parameters']['ours'] / 1e6:.1f} M params) "
                        f"vs YOLO11n {1e3 * t['yolo11n']['cpu_time_s']:.0f} ms "
                        f"({r['parameters']['yolo11n'] / 1e6:.1f} M): {r['ratio']:.1f}x")
            rows.append(_row("B10", f"{r['image_size']}px x{r['batch_size']}", measured, None, r, ratio=r["ratio"]))
        elif bench_id == "B11":
            shapes = r["input_shapes"]
            measured = (f"{r['ratio']:.2f}x (wall {r['wall_ratio']:.2f}x); tensors {shapes['stride'][2:]} vs "
                        f"{shapes['multiple_of_128'][2:]}")
            rows.append(_row("B11", f"demo {r['image_side']}px", measured, r["ratio"] < 1.0, r, ratio=r["ratio"],
                             wall_ratio=r["wall_ratio"]))
        elif bench_id == "B12":
            for case in r["cases"]:
                measured = ", ".join(f"{name} {m['ratio']:.2f}x" for name, m in case["ratios"].items())
                rows.append(_row("B12", f"{case['image_size']}px x{case['batch_size']}", measured, None, case))
    return rows


def _b8_rows(r: dict) -> list[dict]:
    rows = []
    for case in r["cases"]:
        scale = f"{case['image_size']}px x{case['batch_size']}"
        ort, eager = case["onnxruntime_vs_torchvision"], case["ours_eager_vs_torchvision"]
        measured = f"{ort['ratio']:.2f}x (wall {ort['wall_ratio']:.2f}x); ours eager {eager['ratio']:.2f}x"
        rows.append(_row("B8", scale, measured, ort["ratio"] <= 0.6, case, ratio=ort["ratio"],
                         wall_ratio=ort["wall_ratio"]))
        if "int8_vs_onnxruntime" in case:
            int8 = case["int8_vs_onnxruntime"]
            measured = (f"{int8['ratio']:.2f}x of the float export; "
                        f"{case['int8_vs_torchvision']['ratio']:.2f}x of torchvision eager")
            rows.append(_row("B8b", scale, measured, int8["ratio"] < 1.0, case, ratio=int8["ratio"]))
    return rows


def _b4_rows(args: argparse.Namespace) -> list[dict]:
    import bench_losses

    # Full mode: fewer repeats than bench_losses' default (its COCO size takes seconds per call on one thread).
    argv = ["--quick"] if args.quick else ["--repeats", "6", "--warmup", "1"]
    if args.threads > 0:
        argv += ["--threads", str(args.threads)]
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            result = bench_losses.main(argv)
    except Exception:  # noqa: BLE001
        return [_row("B4", "cpu", "ERROR", False, {"error": traceback.format_exc(), "output": buffer.getvalue()})]
    rows = []
    for name, size in result["sizes"].items():
        if "skipped" in size:
            if not (args.quick and name != "cpu"):
                rows.append(_row("B4", name, f"skipped: {size['skipped']}", None, size, sizes=size["shape"]))
            continue
        mem = size["memory_ratio"]
        measured = (f"time {size['time_ratio']:.2f}x (cpu {size['cpu_time_ratio']:.2f}x), peak mem "
                    f"{_fmt_ratio(mem)} ({_mib(size['library']['peak_bytes'])} vs "
                    f"{_mib(size['reference']['peak_bytes'])})")
        rows.append(_row("B4", f"{name} {tuple(size['shape'])}", measured, bool(size["meets_target"]), size,
                         ratio=size["time_ratio"], memory_ratio=mem, sizes={"shape (B, N, C)": size["shape"]},
                         repeats=size["repeats"]))
    return rows


def _b7_row(scale: str, payloads: dict[str, list[dict]], errors: dict[str, str]) -> dict:
    cases = {}
    for case, items in payloads.items():
        found = [p for p in items if p.get("id") == "B7case"]
        if not found or not found[0]["ok"]:
            error = found[0]["error"] if found else errors[case]
            return _row("B7", scale, "ERROR", False, {"error": error})
        cases[case] = found[0]["result"]
    sad, sup = cases["sad"], cases["supervised"]
    ratio = sad["peak_over_imports"] / sup["peak_over_imports"]
    step_ratio = sad["peak_over_setup"] / sup["peak_over_setup"]
    measured = (f"{ratio:.2f}x ({_mib(sad['peak_over_imports'])} vs {_mib(sup['peak_over_imports'])}; "
                f"step's own {step_ratio:.2f}x)")
    return _row("B7", scale, measured, ratio <= 1.25, cases, ratio=ratio, step_ratio=step_ratio,
                sizes={"student_weights": sad["student_weight_bytes"], "teacher_weights": sad["teacher_weight_bytes"]},
                repeats=1)


def _print_table(report: dict) -> None:
    env = report["environment"]
    print(f"\nhf-sad benchmarks ({'quick' if report['settings']['quick'] else 'full'}), CPU: {env.get('cpu')} "
          f"({env.get('logical_cpus')} logical CPUs), torch {env.get('torch')}, torchvision {env.get('torchvision')}, "
          f"transformers {env.get('transformers')}, timm {env.get('timm')}; torch threads per process: "
          f"{report['settings']['threads_label']}")
    print("Time ratios ours / reference (B1-B3, B5, B8-B12): median over repeats of ours_i / reference_i in process "
          "CPU time (one torch thread; calls interleaved back to back after warm-up, in one process); wall = the same "
          "on wall time. B4: bench_losses.py's own figures (wall). B6: wall-time throughput. Memory: peak RSS "
          "(VmHWM) in fresh processes.")
    head = f"{'id':<6}{'scale':<22}{'target':<40}{'result':<7}measured"
    print(head)
    print("-" * 150)
    for row in report["results"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[row["pass"]]
        print(f"{row['id']:<6}{row['scale']:<22}{row['target']:<40}{verdict:<7}{row['measured']}")
    print(f"\ntotal {report['total_time_s']:.0f} s; JSON: {report['settings']['json']}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo scale only (B4: its CPU size only)")
    parser.add_argument("--only", default=None, help="comma-separated ids, e.g. B1,B3")
    parser.add_argument("--json", default=str(BENCH_DIR / "results.json"), help="where to write the results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per benchmark process (default 1: steadiest on a shared "
                             "machine; 0 = torch's default)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for B6 (default: SADTrainingArguments' dataloader_num_workers)")
    parser.add_argument("--workdir", default=None, help="folder for the synthetic data (default: a temporary one)")
    parser.add_argument("--bccd_model", default=None,
                        help="a detector trained on BCCD (a saved model folder): B8b then reports the int8 export's "
                             "mAP change on BCCD's validation split")
    parser.add_argument("--bccd_dir", default=str(BENCH_DIR.parent.parent / "shared" / "datasets" / "bccd"),
                        help="BCCD in COCO format (val.json, images/)")
    parser.add_argument("--worker", choices=("timing", "memory", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--scale", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--consumption", type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _progress(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)


def _default_workers() -> int:
    return 0  # SADTrainingArguments inherits transformers' dataloader_num_workers default


def main(argv: list[str] | None = None) -> dict:
    """Run the selected benchmarks; returns {"environment", "settings", "results": [row, ...], "total_time_s"}."""
    args = _parse(argv)
    if args.worker:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        {"timing": _worker_timing, "memory": _worker_memory, "export": _worker_export}[args.worker](args)
        return {}

    start = time.perf_counter()
    selected = [i.strip().upper() for i in args.only.split(",")] if args.only else list(IDS)
    unknown = sorted(set(selected) - set(IDS))
    if unknown:
        raise SystemExit(f"unknown benchmark ids {unknown}; choose from {', '.join(IDS)}")
    if args.workers is None:
        args.workers = _default_workers()
    scales = ["demo"] if args.quick else ["demo", "realistic"]
    timing_ids = [i for i in ("B1", "B3", "B2", "B6", "B5") if i in selected]
    if "B6" in timing_ids and "B2" not in timing_ids:
        timing_ids.insert(timing_ids.index("B6"), "B2")  # B6 compares with the SAD step's consumption

    environment: dict = {}
    rows: list[dict] = []
    cleanup = None
    if args.workdir is None:
        cleanup = tempfile.TemporaryDirectory(prefix="hf-sad-bench-")
        args.workdir = cleanup.name
    try:
        for scale in scales:
            if timing_ids:
                _progress(start, f"[{scale}] {', '.join(timing_ids)}")
                worker = ["--worker", "timing", "--scale", scale, "--ids", ",".join(timing_ids),
                          "--workdir", args.workdir, "--workers", str(args.workers)]
                payloads, err = _collect(_spawn(worker, args.threads))
                for p in payloads:
                    if p.get("id") == "env":
                        environment = p["environment"]
                scale_rows = _timing_rows(payloads, scale)
                done = {r["id"] for r in scale_rows}
                for missing in [i for i in timing_ids if i not in done]:
                    scale_rows.append(_row(missing, scale, "ERROR (worker died)", False, {"error": err}))
                rows += [r for r in scale_rows if r["id"] in {row for i in selected for row in ROWS.get(i, (i,))}]
            if "B7" in selected:
                _progress(start, f"[{scale}] B7")
                # Memory only: the two fresh processes may run side by side.
                procs = {case: _spawn(["--worker", "memory", "--scale", scale, "--case", case,
                                       "--workdir", args.workdir], args.threads)
                         for case in ("sad", "supervised")}
                collected = {case: _collect(proc) for case, proc in procs.items()}
                rows.append(_b7_row(scale, {c: v[0] for c, v in collected.items()},
                                    {c: v[1] for c, v in collected.items()}))
        if "B4" in selected:
            _progress(start, "[B4] bench/bench_losses.py")
            rows += _b4_rows(args)
        export_ids = [i for i in EXPORT_IDS if i in selected]
        if export_ids:
            _progress(start, f"[export] {', '.join(export_ids)}")
            worker = ["--worker", "export", "--ids", ",".join(export_ids), "--workdir", args.workdir,
                      *(["--quick"] if args.quick else []),
                      *(["--bccd_model", args.bccd_model, "--bccd_dir", args.bccd_dir] if args.bccd_model else [])]
            payloads, err = _collect(_spawn(worker, args.threads))
            export_rows = _export_rows(payloads, args.bccd_model)
            done = {r["id"] for r in export_rows}
            export_rows += [_row(i, "export", "ERROR (worker died)", False, {"error": err})
                            for i in export_ids if i not in done]
            rows += export_rows
    finally:
        if cleanup is not None:
            cleanup.cleanup()

    _progress(start, "done")
    if not environment:
        from common import environment as env_fn

        environment = env_fn()
    order = {row: n for n, row in enumerate(row for i in IDS for row in ROWS.get(i, (i,)))}
    rows.sort(key=lambda r: (order[r["id"]], 0 if r["scale"].startswith(("demo", "cpu")) else 1))
    report = {
        "environment": environment,
        "settings": {
            "quick": args.quick,
            "selected": selected,
            "threads": args.threads,
            "threads_label": str(args.threads) if args.threads > 0 else "torch default",
            "b6_workers": args.workers,
            "json": args.json,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        },
        "method": {
            "timing": "B1-B3, B5: both implementations in one worker process with one torch thread, called "
                      "alternately (order flipped every repeat) after warm-up; judged ratio = median over repeats of "
                      "ours_i / reference_i in process CPU time (wall-time figures alongside); B4: bench_losses.py "
                      "(median wall times, alternating calls); B6: wall-time throughput of the DataLoader; B8-B12 "
                      "as B1-B3, ONNX Runtime sessions with as many intra-op threads as torch (--threads)",
            "memory": "B7: peak resident set (VmHWM, reset via /proc/self/clear_refs after setup) of one step "
                      "(SGD momentum buffers created beforehand) minus the resident set after imports, each case in a "
                      "fresh process, freed heap trimmed (malloc_trim) before each baseline; B4: bench_losses.py's "
                      "own method (VmHWM delta of one cold fwd+bwd in a fresh process)",
        },
        "results": rows,
        "total_time_s": time.perf_counter() - start,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=_json_default)
    _print_table(report)
    return report


if __name__ == "__main__":
    main()
