"""Training throughput on a GPU in bf16: images/s of a supervised step and a SAD step, and torchvision's RetinaNet.

    python bench/bench_gpu.py                          # CUDA: ResNet-50 student, ResNet-101 teacher, 640 px, batch 8
    python bench/bench_gpu.py --batch_size 16 --repeats 20
    python bench/bench_gpu.py --device cpu --quick     # the same code at a toy size on the CPU (a smoke run)

Three steps, each forward + backward + SGD step under `torch.autocast(dtype=torch.bfloat16)`, weights in fp32:

- `supervised`: `SADForObjectDetection(pixel_values, pixel_mask, labels)` of the student;
- `torchvision`: torchvision's `RetinaNet` with the same network and a copy of the weights (`common.build_reference`),
  fed the same tensors and boxes: B1's reference, on the GPU;
- `sad`: `SADTrainer.compute_loss` on a prepared mixed batch (half labeled, half unlabeled), student and teacher on the
  device, the teacher in bf16 as `SADTrainingArguments(bf16=True)` puts it.

The three run alternately, call by call, after warm-up; each call ends with a device synchronisation, and the median
wall time of a call gives images/s. Also recorded: the peak memory allocated by each step (`torch.cuda`), the device,
and the versions. Writes `bench/results_gpu.json` (`--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from bench_sad import setup_sad  # noqa: E402
from common import (  # noqa: E402
    COCO_NUM_CLASSES,
    Scale,
    build_reference,
    build_student,
    environment,
    interleaved_times,
    quiet,
    scene_batch,
)

LR = 0.01
GPU_SCALE = Scale("gpu", "resnet50", 256, 4, 640, 8, COCO_NUM_CLASSES, "resnet101", 256, repeats=10, warmup=3)
QUICK_SCALE = Scale("quick", "resnet18", 32, 1, 128, 2, 6, "resnet18", 32, repeats=1, warmup=0)


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": str(device)}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "memory_bytes": props.total_memory,
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device, step) -> int | None:
    """Peak bytes allocated during one call of `step` (CUDA only)."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def _train_step(parameters, loss_fn, device: torch.device):
    optimizer = torch.optim.SGD(parameters, lr=LR, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    return step


def bench(scale: Scale, device: torch.device, workdir: str) -> dict:
    """images/s of the three steps at `scale` on `device`, measured side by side."""
    student, processor = build_student(scale)
    reference = build_reference(student, scale).to(device).train()
    pixel_values, pixel_mask, labels, targets = scene_batch(scale, processor)
    pixel_values, pixel_mask = pixel_values.to(device), pixel_mask.to(device)
    labels = [{k: v.to(device) for k, v in label.items()} for label in labels]
    images = list(pixel_values)
    targets = [{k: v.to(device) for k, v in target.items()} for target in targets]

    sad_student, trainer, batch, above = setup_sad(scale, workdir, device=device.type, bf16=True)
    student.to(device).train()

    def sad_loss():
        trainer._metrics.clear()
        return trainer.compute_loss(sad_student, batch)

    steps = {
        "supervised": _train_step(
            student.parameters(),
            lambda: student(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss,
            device,
        ),
        "torchvision": _train_step(reference.parameters(), lambda: sum(reference(images, targets).values()), device),
        "sad": _train_step(sad_student.parameters(), sad_loss, device),
    }
    times = interleaved_times(steps, scale.repeats, scale.warmup)
    result = {
        "sizes": {
            "student": f"{scale.backbone} FPN/heads {scale.channels} x {scale.num_convs} convs",
            "teacher": f"{scale.teacher_backbone} FPN/heads {scale.teacher_channels} x {scale.num_convs} convs",
            "image_size": scale.image_size,
            "batch_size": scale.batch_size,
            "num_classes": scale.num_classes,
            "labeled_in_sad_batch": int(batch["is_labeled"].sum()),
            "teacher_fraction_above_0.5": above,
        },
        "precision": "bf16 autocast, fp32 weights (SAD teacher in bf16)",
        "repeats": scale.repeats,
        "warmup": scale.warmup,
        "steps": {},
    }
    for name, step in steps.items():
        result["steps"][name] = {
            "images_per_s": scale.batch_size / times[name]["time_s"],
            "step_s": times[name]["time_s"],
            "times_s": times[name]["times_s"],
            "peak_memory_bytes": _peak_memory(device, step),
        }
    result["supervised_over_torchvision_time"] = times["supervised"]["time_s"] / times["torchvision"]["time_s"]
    result["sad_over_supervised_time"] = times["sad"]["time_s"] / times["supervised"]["time_s"]
    return result


def _print(report: dict) -> None:
    r = report["result"]
    print(f"\n{report['device']['device']}, torch {report['environment']['torch']}, {r['precision']}; "
          f"{r['sizes']['student']} (teacher {r['sizes']['teacher']}), {r['sizes']['image_size']} px, "
          f"batch {r['sizes']['batch_size']}, median of {r['repeats']} steps")
    for name, step in r["steps"].items():
        memory = step["peak_memory_bytes"]
        memory = "" if memory is None else f", peak {memory / 2**30:.2f} GiB"
        print(f"  {name:<12} {step['images_per_s']:8.1f} images/s ({1e3 * step['step_s']:.0f} ms/step{memory})")
    print(f"  supervised / torchvision step time: {r['supervised_over_torchvision_time']:.2f}x; "
          f"sad / supervised: {r['sad_over_supervised_time']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--quick", action="store_true", help="a toy size (ResNet-18, 128 px, batch 2), 1 repeat")
    parser.add_argument("--batch_size", type=int, default=None, help=f"default {GPU_SCALE.batch_size}")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed steps per case (default {GPU_SCALE.repeats})")
    parser.add_argument("--json", default=str(BENCH_DIR / "results_gpu.json"), help="where to write the results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; `--device cpu --quick` runs the same code at a toy size")
    scale = QUICK_SCALE if args.quick else GPU_SCALE
    scale = replace(scale, batch_size=args.batch_size or scale.batch_size, repeats=args.repeats or scale.repeats)
    quiet()
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest convolutions

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hf-sad-bench-gpu-") as workdir:
        result = bench(scale, device, workdir)
    report = {
        "environment": environment(),
        "device": device_info(device),
        "command": " ".join(["bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "result": result,
        "total_time_s": time.perf_counter() - start,
    }
    report["environment"]["device"] = str(device)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    _print(report)
    return report


if __name__ == "__main__":
    main()
