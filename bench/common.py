"""Shared pieces of the hf-sad benchmarks (`bench/run.py`): scales, models, the torchvision reference, batches, timing.

Everything here runs on the CPU. Timings are taken with both implementations in one process, alternating call by call
(the order flipping every repeat) after warm-up, and the median of the repeats is reported, so that load from other
processes on a shared machine hits both alike.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torchvision
import transformers
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from hf_sad import create_detector
from hf_sad.data.synthetic import SYNTHETIC_LABELS, generate_scene

# COCO-sized label set for the realistic scale (only the count matters to the benchmarks).
COCO_NUM_CLASSES = 80


@dataclass(frozen=True)
class Scale:
    """One benchmark scale: student (and teacher) architecture, image side, batch."""

    name: str
    backbone: str
    channels: int  # FPN and head width (torchvision's RetinaNetHead uses the FPN width inside its heads)
    num_convs: int
    image_size: int
    batch_size: int
    num_classes: int
    teacher_backbone: str
    teacher_channels: int
    repeats: int  # timed repeats per implementation (after warm-up)
    warmup: int

    def describe(self) -> dict:
        return asdict(self)


SCALES = {
    "demo": Scale("demo", "resnet18", 64, 4, 128, 4, len(SYNTHETIC_LABELS), "resnet50", 128, 10, 2),
    "realistic": Scale("realistic", "resnet50", 256, 4, 512, 2, COCO_NUM_CLASSES, "resnet50", 256, 3, 1),
}


def id2label_for(scale: Scale) -> dict[int, str]:
    """The synthetic classes first (so synthetic datasets map onto the model by name), then filler names."""
    names = list(SYNTHETIC_LABELS) + [f"class_{i}" for i in range(len(SYNTHETIC_LABELS), scale.num_classes)]
    return dict(enumerate(names[: scale.num_classes]))


# ----------------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------------


def quiet() -> None:
    """No warnings, progress bars or info logs from datasets/transformers in a benchmark's output."""
    import warnings

    import datasets

    warnings.filterwarnings("ignore")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def environment() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
        cores = len(names)
    except OSError:
        cores = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        mem_total = None
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": cores,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_bytes": mem_total,
        "device": "cpu",
    }


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def build_student(scale: Scale, seed: int = 0):
    """(model, processor) of the student at `scale`, with a fixed image size (no resize of same-size inputs)."""
    torch.manual_seed(seed)
    return create_detector(
        scale.backbone,
        id2label_for(scale),
        image_size={"height": scale.image_size, "width": scale.image_size},
        fpn_channels=scale.channels,
        head_channels=scale.channels,
        head_num_convs=scale.num_convs,
    )


def build_teacher(scale: Scale, seed: int = 1):
    torch.manual_seed(seed)
    model, _ = create_detector(
        scale.teacher_backbone,
        id2label_for(scale),
        image_size={"height": scale.image_size, "width": scale.image_size},
        fpn_channels=scale.teacher_channels,
        head_channels=scale.teacher_channels,
        head_num_convs=scale.num_convs,
    )
    return model


def build_reference(model, scale: Scale) -> RetinaNet:
    """torchvision RetinaNet with the same structure as `model` (a ResNet SAD detector) and a copy of its weights.

    Backbone: torchvision's ResNet of the same name (identical module and parameter names as timm's ResNet) with plain
    BatchNorm and every layer trainable, as `model`; FPN over C3-C5 with P6/P7 from P5 (`LastLevelP6P7` with equal
    widths), `scale.channels` wide; `RetinaNetHead` cut to `scale.num_convs` convs per tower; 3 scales x 3 ratios
    anchors on P3-P7 (32..512 px). The transform does not resize (`min_size = max_size =` the image side) nor
    normalise (mean 0, std 1): both models get the same already-normalised tensors. Its box loss is smooth-L1, as
    ours. Predictor channels are permuted to torchvision's anchor order (ratio-major; ours is scale-major).
    """
    body = getattr(torchvision.models, scale.backbone)(weights=None, norm_layer=nn.BatchNorm2d)
    c = scale.channels
    in_channels = [model.backbone.body.feature_info.channels()[i] for i in model.backbone.feature_indices]
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=in_channels,
        out_channels=c,
        extra_blocks=LastLevelP6P7(c, c),
    )
    sizes = tuple(tuple(32 * 2**lv * 2 ** (i / 3) for i in range(3)) for lv in range(5))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    head = RetinaNetHead(c, 9, scale.num_classes)
    for tower in (head.classification_head, head.regression_head):
        tower.conv = nn.Sequential(*list(tower.conv)[: scale.num_convs])
    head.regression_head._loss_type = "smooth_l1"
    ref = RetinaNet(
        backbone,
        scale.num_classes,
        min_size=scale.image_size,
        max_size=scale.image_size,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        anchor_generator=anchors,
        head=head,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
        topk_candidates=1000,
    )
    copy_weights_to_reference(model, ref)
    return ref


def _anchor_permutation(num_scales: int = 3, num_ratios: int = 3) -> list[int]:
    # torchvision anchor j = r * S + s takes our anchor s * R + r.
    return [(j % num_scales) * num_ratios + j // num_scales for j in range(num_scales * num_ratios)]


def copy_weights_to_reference(model, ref: RetinaNet) -> None:
    perm = _anchor_permutation()
    with torch.no_grad():
        body_state = {k: v for k, v in model.backbone.body.state_dict().items()}
        missing, unexpected = ref.backbone.body.load_state_dict(body_state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"backbone weights do not line up: missing {missing}, unexpected {unexpected}")
        fpn = ref.backbone.fpn
        for i, conv in enumerate(model.pyramid.lateral):
            fpn.inner_blocks[i][0].load_state_dict(conv.state_dict())
        for i, conv in enumerate(model.pyramid.output):
            fpn.layer_blocks[i][0].load_state_dict(conv.state_dict())
        fpn.extra_blocks.p6.load_state_dict(model.pyramid.extra.convs[0].state_dict())
        fpn.extra_blocks.p7.load_state_dict(model.pyramid.extra.convs[1].state_dict())
        pairs = (
            (model.class_head, ref.head.classification_head, ref.head.classification_head.cls_logits),
            (model.box_head, ref.head.regression_head, ref.head.regression_head.bbox_reg),
        )
        for ours, theirs, predictor in pairs:
            convs = [m for m in ours.tower if isinstance(m, nn.Conv2d)]
            for conv, block in zip(convs, theirs.conv):
                block[0].load_state_dict(conv.state_dict())
            k = ours.out_per_anchor
            w = ours.predictor.weight.view(9, k, *ours.predictor.weight.shape[1:])[perm]
            predictor.weight.copy_(w.reshape_as(predictor.weight))
            predictor.bias.copy_(ours.predictor.bias.view(9, k)[perm].reshape(-1))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def calibrate_scores(model, pixel_values: torch.Tensor, threshold: float, per_image: int) -> float:
    """Make a fresh detector's class scores look trained: spread them and let ~`per_image` (anchor, class) entries per
    image score above `threshold` on `pixel_values` (only the classification predictor is changed).

    A fresh head predicts the 0.01 prior everywhere, so no detection passes a 0.05 threshold and post-processing or
    pseudo-labelling would have nothing to do. Returns the fraction of entries above the threshold.
    """
    was_training = model.training
    model.eval()
    predictor = model.class_head.predictor
    with torch.no_grad():
        logits = model(pixel_values).logits.float()
        centred = logits - predictor.bias.mean()
        predictor.weight.mul_(2.0 / centred.std().clamp_min(1e-12))  # logit spread ~ 2
        logits = model(pixel_values).logits.float()
        fraction = min(0.1, per_image / logits[0].numel())
        cutoff = torch.quantile(logits.flatten()[:: max(1, logits.numel() // 4_000_000)], 1 - fraction)
        shift = math.log(threshold / (1 - threshold)) - cutoff + 1e-3
        predictor.bias.add_(shift)  # the same shift on every class logit
        above = ((logits + shift).sigmoid() > threshold).float().mean().item()
    model.train(was_training)
    return above


# ----------------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------------


def scene_batch(scale: Scale, processor, seed: int = 0, first_index: int = 0):
    """A batch of synthetic scenes at `scale` through the processor (no resize: the scenes have the target size).

    Returns `(pixel_values, pixel_mask, labels, targets)`: labels in the transformers format (normalised cxcywh) for
    ours, targets `{"boxes": absolute xyxy, "labels"}` for torchvision. Class ids are folded into `num_classes`.
    """
    images, annotations = [], []
    for i in range(scale.batch_size):
        image, target = generate_scene(seed * 100_000 + first_index + i, image_size=scale.image_size)
        images.append(image)
        annotations.append({
            "image_id": i,
            "annotations": [
                {"bbox": b, "category_id": c % scale.num_classes} for b, c in zip(target["bbox"], target["category"])
            ],
        })
    batch = processor(images=images, annotations=annotations, return_tensors="pt")
    labels = batch["labels"]
    targets = []
    for label in labels:
        h, w = label["size"].tolist()
        boxes = torchvision.ops.box_convert(label["boxes"] * torch.tensor([w, h, w, h]), "cxcywh", "xyxy")
        targets.append({"boxes": boxes, "labels": label["class_labels"]})
    return batch["pixel_values"], batch["pixel_mask"], labels, targets


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Wall and process-CPU times of each callable, alternating call by call (order reversed every other repeat)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        n: {
            "time_s": statistics.median(wall[n]),
            "cpu_time_s": statistics.median(cpu[n]),
            "min_time_s": min(wall[n]),
            "times_s": [round(t, 6) for t in wall[n]],
            "cpu_times_s": [round(t, 6) for t in cpu[n]],
        }
        for n in names
    }


def ratio_row(times: dict[str, dict], ours: str, ref: str) -> dict:
    """Time ratios ours / reference, each the median over repeats of ours_i / reference_i, the two calls of repeat i
    having run back to back.

    `ratio` (the one judged) uses process CPU time: the workers run torch on one thread, so a call's CPU time is the
    time its work takes on a core, while its wall time also counts every moment other jobs on this shared machine
    held the core (single repeats of a 15 s step were seen to take 60% longer). `wall_ratio` is the same on wall time,
    `wall_ratio_of_medians` the plain ratio of median wall times.
    """
    a, b = times[ours], times[ref]
    return {
        "ratio": statistics.median(x / y for x, y in zip(a["cpu_times_s"], b["cpu_times_s"])),
        "wall_ratio": statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"])),
        "wall_ratio_of_medians": a["time_s"] / b["time_s"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Memory (resident set of this process, Linux /proc)
# ----------------------------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset VmHWM (the peak resident set) to the current resident set; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), so that RSS counts live memory only."""
    import ctypes
    import gc

    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
