"""B8 (exported inference), B9 (compiled training), B10 (an Ultralytics YOLO for context) and B11 (padding).

B8: our student exported with its post-processing (`hf_sad.export.export_onnx`: network, box decoding, top-k,
class-wise NMS in one ONNX graph) run by ONNX Runtime, against torchvision's RetinaNet with the same network and a
copy of the weights in eager PyTorch (`common.build_reference`), on the same normalised tensors, at 320 and 640 px,
batch 1 and 8. Our eager PyTorch inference (forward + `post_process_object_detection`) is timed alongside, and the
int8 export (`hf_sad.export.quantize_onnx`, calibrated on generated scenes) where asked (B8b); B8b's accuracy (mAP on
BCCD of the float and the int8 export of a trained detector) needs such a detector (`--bccd_model`).

B9: a compiled training step (`torch.compile`, inductor) against the eager one, supervised and SAD, same weights and
batch; compilation itself is timed apart.

B10: for context only, a different network: Ultralytics' YOLO11n built from its config (no weights), exported to ONNX
with its NMS, run by ONNX Runtime at the same input size as our export.

B11: the same inference with the image processor padding to the backbone's stride (32) and to the old multiple of
128, for a 192-px model given 416x416 images (padded to 192x192 and 256x256).

B12: eager PyTorch inference variants of the B8 network against plain eager: `channels_last` tensors and weights, the
backbone's BatchNorm folded into its convolutions (`torch.fx.experimental.optimization.fuse`), and both.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import (
    Scale,
    build_reference,
    build_student,
    calibrate_scores,
    interleaved_times,
    num_parameters,
    ratio_row,
    scene_batch,
)

#: The network of B8/B10: a small COCO-sized student (ResNet-18, 128-channel FPN and heads, 4 convs, 80 classes).
EXPORT_SCALE = Scale("export", "resnet18", 128, 4, 320, 1, 80, "resnet50", 128, repeats=6, warmup=2)
#: (image side, batch) cases of B8 and of B12.
B8_CASES = ((320, 1), (320, 8), (640, 1), (640, 8))
B12_CASES = ((320, 8), (640, 1))


def _session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(threads, 1)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dynamic_student(scale: Scale):
    """The student with a processor that keeps any square size (shortest edge = the image side, no resize) and pads
    to the backbone's stride: one export for every size."""
    model, processor = build_student(scale)
    processor.size = {"shortest_edge": 640, "longest_edge": 640}
    processor.do_resize = False
    return model.eval(), processor


def bench_exported_inference(threads: int, int8: bool, workdir: str | Path, cases=B8_CASES,
                             scale: Scale = EXPORT_SCALE) -> dict:
    """B8 (and B8b's speed with `int8`): ONNX Runtime vs torchvision eager vs our eager PyTorch, per (size, batch)."""
    from hf_sad.export import export_onnx, quantize_onnx

    model, processor = _dynamic_student(scale)
    workdir = Path(workdir)
    # Scores spread once (on a 320 px batch) so that ~2000 (anchor, class) candidates per image pass 0.05, as for a
    # trained detector; then one export (any size and batch) serves every case.
    calibration_batch = scene_batch(replace(scale, image_size=320, batch_size=8), processor, seed=2)[0]
    fraction = calibrate_scores(model, calibration_batch, threshold=0.05, per_image=2000)
    onnx_path = export_onnx(model, processor, workdir / "export" / "model.onnx")
    sessions = {"onnxruntime": _session(onnx_path, threads)}
    if int8:
        calibration = [scene_image(320, 50_000 + i) for i in range(16)]
        int8_path = quantize_onnx(onnx_path, workdir / "export" / "model_int8.onnx", processor, calibration)
        sessions["onnxruntime_int8"] = _session(int8_path, threads)
    results = {"network": {"backbone": scale.backbone, "channels": scale.channels, "num_convs": scale.num_convs,
                           "classes": scale.num_classes, "parameters": num_parameters(model)},
               "threads": threads, "score_fraction_above_0.05": fraction, "cases": []}
    for size, batch in cases:
        results["cases"].append(_exported_case(model, processor, sessions, replace(scale, image_size=size,
                                                                                   batch_size=batch)))
    return results


def _exported_case(model, processor, sessions: dict, scale: Scale) -> dict:
    """One (size, batch) of B8: each ONNX Runtime session, torchvision eager and ours eager, interleaved."""
    size, batch = scale.image_size, scale.batch_size
    pixel_values, pixel_mask, _, _ = scene_batch(scale, processor, seed=3)
    ref = build_reference(model, scale).eval()
    sizes = torch.tensor([[size, size]] * batch)
    feed = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy(), "original_sizes": sizes.numpy()}
    images = list(pixel_values)
    counts = {}

    def run_session(name):
        def call():
            _, scores, _ = sessions[name].run(None, feed)
            counts[name] = int((scores > 0.05).sum())
        return call

    def torchvision_eager():
        with torch.no_grad():
            found = ref(images)
        counts["torchvision"] = sum(len(d["scores"]) for d in found)

    def ours_eager():
        with torch.no_grad():
            out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            found = processor.post_process_object_detection(out, threshold=0.05, target_sizes=sizes)
        counts["ours_eager"] = sum(len(d["scores"]) for d in found)

    fns = {name: run_session(name) for name in sessions}
    fns.update({"torchvision": torchvision_eager, "ours_eager": ours_eager})
    times = interleaved_times(fns, scale.repeats, scale.warmup)
    case = {"image_size": size, "batch_size": batch, "detections": counts, "times": times,
            "onnxruntime_vs_torchvision": ratio_row(times, "onnxruntime", "torchvision"),
            "ours_eager_vs_torchvision": ratio_row(times, "ours_eager", "torchvision")}
    if "onnxruntime_int8" in sessions:
        case["int8_vs_torchvision"] = ratio_row(times, "onnxruntime_int8", "torchvision")
        case["int8_vs_onnxruntime"] = ratio_row(times, "onnxruntime_int8", "onnxruntime")
    return case


def scene_image(size: int, seed: int):
    from hf_sad.data.synthetic import generate_scene

    return generate_scene(seed, image_size=size)[0]


def int8_accuracy(model_dir: str | Path, data: str | Path, image_dir: str | Path, workdir: str | Path) -> dict:
    """B8b's accuracy: COCO mAP of the float and the int8 export of a trained detector on a labeled COCO set
    (`evaluate_exported` for both, so that only the quantisation differs), int8 calibrated on 64 of its images."""
    import shutil

    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from hf_sad.arguments import SADTrainingArguments
    from hf_sad.data import load_coco_detection
    from hf_sad.export import export_onnx, quantize_onnx
    from hf_sad.runtime import ExportedDetector, evaluate_exported
    from hf_sad.training.trainer import SADTrainer

    folder = Path(workdir) / "int8-accuracy"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.onnx", "openvino_model.*", "checkpoint-*"))
    model = AutoModelForObjectDetection.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    dataset = load_coco_detection(data, image_dir)
    calibration = [row["image"] for row in dataset.select(range(min(64, len(dataset))))]
    export_onnx(model, processor, folder / "model.onnx")
    quantize_onnx(folder / "model.onnx", folder / "model_int8.onnx", processor, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        args = SADTrainingArguments(output_dir=tmp, distill_loss="none", report_to="none", use_cpu=True,
                                    per_device_eval_batch_size=4, disable_tqdm=True)
        trainer = SADTrainer(model, None, args, eval_dataset=dataset, processing_class=processor)
        metrics = {}
        for name in ("model.onnx", "model_int8.onnx"):
            exported = ExportedDetector.from_pretrained(folder, file=name)
            metrics[name] = evaluate_exported(exported, trainer.get_eval_dataloader())
    keys = ("map", "map_50", "map_75")
    return {"model": str(model_dir), "data": str(data), "images": len(dataset),
            "float": {k: metrics["model.onnx"][k] for k in keys},
            "int8": {k: metrics["model_int8.onnx"][k] for k in keys},
            "map_change_points": 100 * (metrics["model_int8.onnx"]["map"] - metrics["model.onnx"]["map"])}


# ----------------------------------------------------------------------------------------------------------------------
# B9
# ----------------------------------------------------------------------------------------------------------------------


def bench_compiled_training(scale: Scale, workdir: str | Path) -> dict:
    """B9: eager vs `torch.compile`d (inductor) training step, supervised and SAD, on copies with the same weights."""
    import time

    import bench_sad

    results = {}
    student, trainer, batch, _ = bench_sad.setup_sad(scale, workdir)
    compiled_student = torch.compile(copy.deepcopy(student))
    eager_opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    compiled_opt = torch.optim.SGD(compiled_student.parameters(), lr=0.01, momentum=0.9)
    steps = {
        "supervised": (bench_sad._supervised_step_fn(student, batch, eager_opt),
                       bench_sad._supervised_step_fn(compiled_student, batch, compiled_opt)),
    }
    eager_teacher = trainer._teacher_call
    compiled_teacher = torch.compile(trainer.teacher)

    def sad_with(model, optimizer, teacher_call):
        step = bench_sad._sad_step_fn(model, trainer, batch, optimizer)

        def call():
            trainer._teacher_call = teacher_call
            step()
        return call

    steps["sad"] = (sad_with(student, eager_opt, eager_teacher),
                    sad_with(compiled_student, compiled_opt, compiled_teacher))
    for name, (eager, compiled) in steps.items():
        start = time.perf_counter()
        compiled()  # compilation
        compile_s = time.perf_counter() - start
        times = interleaved_times({"compiled": compiled, "eager": eager}, scale.repeats, scale.warmup)
        results[name] = {"compile_s": compile_s, "times": times, **ratio_row(times, "compiled", "eager")}
    trainer._teacher_call = eager_teacher
    return {"scale": scale.describe(), "steps": results}


# ----------------------------------------------------------------------------------------------------------------------
# B10
# ----------------------------------------------------------------------------------------------------------------------


def bench_yolo(threads: int, workdir: str | Path, size: int = 640, batch: int = 1,
               scale: Scale = EXPORT_SCALE) -> dict:
    """B10: Ultralytics YOLO11n (from its config, exported to ONNX with NMS) and our export, ONNX Runtime, same input
    size and batch: latencies side by side. Different networks: context, not a like-for-like comparison."""
    try:
        from ultralytics import YOLO
    except ImportError:
        return {"skipped": "needs the ultralytics package (pip install ultralytics)"}
    from hf_sad.export import export_onnx

    workdir = Path(workdir) / "yolo"
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(workdir):  # Ultralytics writes the export beside the config's name, in the working dir
        yolo = YOLO("yolo11n.yaml")
        yolo_parameters = num_parameters(yolo.model)
        exported = Path(yolo.export(format="onnx", imgsz=size, batch=batch, nms=True, simplify=False,
                                    verbose=False)).resolve()
    yolo_session = _session(Path(exported), threads)
    yolo_feed = {yolo_session.get_inputs()[0].name: np.random.default_rng(0).random(
        (batch, 3, size, size), dtype=np.float32)}

    model, processor = _dynamic_student(replace(scale, image_size=size, batch_size=batch))
    pixel_values, pixel_mask, _, _ = scene_batch(replace(scale, image_size=size, batch_size=batch), processor, seed=3)
    calibrate_scores(model, pixel_values, threshold=0.05, per_image=2000)
    ours_session = _session(export_onnx(model, processor, workdir / "ours.onnx"), threads)
    ours_feed = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy(),
                 "original_sizes": np.array([[size, size]] * batch, dtype=np.int64)}
    times = interleaved_times({"ours": lambda: ours_session.run(None, ours_feed),
                               "yolo11n": lambda: yolo_session.run(None, yolo_feed)}, scale.repeats, scale.warmup)
    return {"image_size": size, "batch_size": batch, "threads": threads,
            "parameters": {"ours": num_parameters(model), "yolo11n": yolo_parameters},
            "times": times, **ratio_row(times, "ours", "yolo11n")}


# ----------------------------------------------------------------------------------------------------------------------
# B11
# ----------------------------------------------------------------------------------------------------------------------


def bench_padding(scale: Scale, image_side: int = 416, model_size: int = 192) -> dict:
    """B11: inference (forward + post-processing) of `image_side` px images through a `model_size` model, the
    processor padding to the backbone's stride (the default) vs to a multiple of 128 (the old default)."""
    from hf_sad import create_detector
    from hf_sad.data.synthetic import SYNTHETIC_LABELS

    torch.manual_seed(0)
    model, processor = create_detector(scale.backbone, dict(enumerate(SYNTHETIC_LABELS)), image_size=model_size,
                                       fpn_channels=scale.channels, head_channels=scale.channels,
                                       head_num_convs=scale.num_convs)
    model.eval()
    images = [scene_image(image_side, 70_000 + i) for i in range(scale.batch_size)]
    batches, shapes = {}, {}
    for name, divisor in (("stride", processor.pad_size_divisor), ("multiple_of_128", 128)):
        batches[name] = processor(images=images, pad_size_divisor=divisor, return_tensors="pt")
        shapes[name] = list(batches[name]["pixel_values"].shape)
    calibrate_scores(model, batches["stride"]["pixel_values"], threshold=0.05, per_image=2000)
    sizes = [(image.height, image.width) for image in images]

    def infer(name):
        def call():
            with torch.no_grad():
                out = model(pixel_values=batches[name]["pixel_values"], pixel_mask=batches[name]["pixel_mask"])
                processor.post_process_object_detection(out, threshold=0.05, target_sizes=sizes)
        return call

    times = interleaved_times({name: infer(name) for name in batches}, scale.repeats, scale.warmup)
    return {"image_side": image_side, "model_size": model_size, "batch_size": scale.batch_size,
            "divisor": processor.pad_size_divisor, "input_shapes": shapes, "times": times,
            **ratio_row(times, "stride", "multiple_of_128")}


# ----------------------------------------------------------------------------------------------------------------------
# B12
# ----------------------------------------------------------------------------------------------------------------------


def bench_eager_variants(cases=B12_CASES, scale: Scale = EXPORT_SCALE) -> dict:
    """B12: inference (forward + post-processing) of the B8 network in eager PyTorch: plain, `channels_last`, the
    backbone's BatchNorm folded into its convolutions, and both; ratios to plain, and the largest logit change."""
    from torch.fx.experimental.optimization import fuse

    model, processor = _dynamic_student(scale)
    calibration_batch = scene_batch(replace(scale, image_size=320, batch_size=8), processor, seed=2)[0]
    calibrate_scores(model, calibration_batch, threshold=0.05, per_image=2000)
    folded = copy.deepcopy(model)
    folded.backbone.body = fuse(folded.backbone.body)
    variants = {"plain": (model, False),
                "channels_last": (copy.deepcopy(model).to(memory_format=torch.channels_last), True),
                "folded_bn": (folded, False),
                "folded_bn_channels_last": (copy.deepcopy(folded).to(memory_format=torch.channels_last), True)}
    results = {"network": {"backbone": scale.backbone, "channels": scale.channels, "classes": scale.num_classes},
               "cases": []}
    for size, batch in cases:
        results["cases"].append(_eager_variants_case(variants, processor, replace(scale, image_size=size,
                                                                                  batch_size=batch)))
    return results


def _eager_variants_case(variants: dict, processor, scale: Scale) -> dict:
    pixel_values, pixel_mask, _, _ = scene_batch(scale, processor, seed=4)
    sizes = [(scale.image_size, scale.image_size)] * scale.batch_size
    logits = {}

    def infer(name):
        network, last = variants[name]
        inputs = pixel_values.contiguous(memory_format=torch.channels_last) if last else pixel_values

        def call():
            with torch.no_grad():
                out = network(pixel_values=inputs, pixel_mask=pixel_mask)
                processor.post_process_object_detection(out, threshold=0.05, target_sizes=sizes)
            logits[name] = out.logits
        return call

    times = interleaved_times({name: infer(name) for name in variants}, scale.repeats, scale.warmup)
    others = [name for name in variants if name != "plain"]
    return {"image_size": scale.image_size, "batch_size": scale.batch_size, "times": times,
            "ratios": {name: ratio_row(times, name, "plain") for name in others},
            "max_abs_logit_change": {name: float((logits[name] - logits["plain"]).abs().max()) for name in others}}
