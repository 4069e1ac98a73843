"""Exporting a detector to run without PyTorch: ONNX with box decoding and NMS inside the graph, OpenVINO IR, and
int8 ONNX by static quantisation.

The exported graph is `DetectorWithPostProcessing`: the network, then the post-processing of
`SADImageProcessor.post_process_object_detection` with the processor's settings (`pre_nms_top_k`,
`nms_iou_threshold`, `max_detections`: their one home, read at export time and recorded in the file's metadata).
Only the score threshold stays outside, so a caller still chooses it per call. NMS is ONNX's own
`NonMaxSuppression` (per image and class, as `torchvision.ops.batched_nms` groups them), reached through the
`hf_sad::multiclass_nms` custom operator and the exporter's `custom_translation_table`: written here because neither
torchvision's `nms` (one image, one class) nor the exporter offers a batched, multi-class NMS.

Requires the `export` extra: `pip install 'hf-sad[export]'`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.ops import box_convert

from .model.box_ops import top_candidates
from .model.image_processing_sad import SADImageProcessor
from .model.modeling_sad import SADForObjectDetection

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "DetectorWithPostProcessing",
    "export_onnx",
    "export_openvino",
    "exported_file",
    "multiclass_nms",
    "post_processing_settings",
    "quantize_onnx",
]

#: `hf-sad export --format` -> the file written into the model folder (OpenVINO: the .xml, its weights in a .bin).
EXPORT_FORMATS = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
#: The ONNX metadata key holding the post-processing settings baked into the graph.
METADATA_KEY = "hf_sad.post_processing"
OPSET = 18
INSTALL_HINT = "pip install 'hf-sad[export]'"


@torch.library.custom_op("hf_sad::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float) -> torch.Tensor:
    """
    ONNX `NonMaxSuppression` (with `score_threshold=0`) in PyTorch: per image and class, greedy NMS over the boxes
    whose score for that class is above 0.

    Args:
        boxes: `(batch_size, num_boxes, 4)` x1,y1,x2,y2 (any units).
        scores: `(batch_size, num_classes, num_boxes)`; a box takes part in a class where its score is > 0.
        max_per_class: most boxes kept per image and class.
        iou_threshold: a box is suppressed by a higher-scoring box of its image and class with IoU above this.

    Returns:
        `(num_selected, 3)` int64 rows (image index, class index, box index), ordered by image, class, then
        decreasing score, as ONNX Runtime returns them.
    """
    num_classes = scores.shape[1]
    images, classes, indices = torch.nonzero(scores > 0, as_tuple=True)
    groups = images * num_classes + classes
    # float64: the coordinate trick of batched_nms offsets each group's boxes; fp32 would round them.
    kept = torchvision.ops.batched_nms(
        boxes[images, indices].double(), scores[images, classes, indices].double(), groups, iou_threshold
    )
    sorted_groups, order = torch.sort(groups[kept], stable=True)  # score order kept within a group
    kept = kept[order]
    counts = torch.bincount(sorted_groups, minlength=scores.shape[0] * num_classes)
    rank = torch.arange(len(kept), device=kept.device) - (counts.cumsum(0) - counts)[sorted_groups]
    kept = kept[rank < max_per_class]
    return torch.stack([images[kept], classes[kept], indices[kept]], dim=1)


@multiclass_nms.register_fake
def _(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float) -> torch.Tensor:
    num_selected = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((num_selected, 3), dtype=torch.int64)


def _onnx_translation_table() -> dict:
    """`hf_sad::multiclass_nms` -> ONNX `NonMaxSuppression`, for `torch.onnx.export(custom_translation_table=...)`."""
    try:
        from onnxscript import opset18 as op
    except ImportError as error:
        raise ImportError(f"Exporting to ONNX needs onnx and onnxscript: {INSTALL_HINT}") from error

    def non_max_suppression(boxes, scores, max_per_class: int, iou_threshold: float):
        return op.NonMaxSuppression(
            boxes, scores, op.Constant(value_ints=[max_per_class]), op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[0.0]), center_point_box=0,
        )

    return {torch.ops.hf_sad.multiclass_nms.default: non_max_suppression}


def post_processing_settings(processor: SADImageProcessor) -> dict[str, float | int]:
    """The processor's post-processing settings that an exported graph bakes in."""
    return {
        "pre_nms_top_k": int(processor.pre_nms_top_k),
        "nms_iou_threshold": float(processor.nms_iou_threshold),
        "max_detections": int(processor.max_detections),
    }


class DetectorWithPostProcessing(nn.Module):
    """
    A detector followed by its processor's post-processing, as one module to export (it also runs in PyTorch).

    Inputs:
        - `pixel_values` float32 `(batch_size, 3, height, width)` and `pixel_mask` int64 `(batch_size, height,
          width)`: the processor's outputs.
        - `original_sizes` int64 `(batch_size, 2)`: (height, width) of each image before processing.

    Outputs, per image the `max_detections` best detections after NMS (fewer when the image has fewer candidates),
    by decreasing score:
        - `boxes` float32 `(batch_size, num_detections, 4)`: x1,y1,x2,y2 in absolute pixels of the original image,
          clipped to it.
        - `scores` float32 `(batch_size, num_detections)`: sigmoid scores; 0 on padding rows.
        - `labels` int64 `(batch_size, num_detections)`: class index; -1 on padding rows.

    Keeping the detections scoring above a threshold gives those of `post_process_object_detection(outputs,
    threshold, target_sizes=original_sizes)`: thresholding after NMS keeps the same boxes, because a box is only
    ever suppressed by a higher-scoring one.
    """

    def __init__(self, model: SADForObjectDetection, processor: SADImageProcessor) -> None:
        super().__init__()
        self.model = model
        settings = post_processing_settings(processor)
        self.pre_nms_top_k = settings["pre_nms_top_k"]
        self.nms_iou_threshold = settings["nms_iou_threshold"]
        self.max_detections = settings["max_detections"]

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, original_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        # As post_process_object_detection: fp32 scores, boxes clipped to the image (normalised) before NMS.
        scores = outputs.logits.float().sigmoid()
        boxes = box_convert(outputs.pred_boxes.float(), "cxcywh", "xyxy").clamp(0.0, 1.0)
        top_scores, labels, boxes = top_candidates(scores, boxes, self.pre_nms_top_k)
        batch_size, num_candidates = top_scores.shape
        num_classes = scores.shape[-1]
        # Each candidate is one (anchor, class): it scores for its own class only (-1 elsewhere: never selected).
        classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1)
        per_class = torch.where(labels.unsqueeze(1) == classes, top_scores.unsqueeze(1), -1.0)
        selected = multiclass_nms(boxes, per_class, self.max_detections, self.nms_iou_threshold)
        images, candidates = selected[:, 0], selected[:, 2]
        kept_scores = torch.full_like(top_scores, -1.0).index_put((images, candidates), top_scores[images, candidates])
        # The max_detections best survivors of each image (NMS capped them per class, not per image).
        scores, index = kept_scores.topk(min(self.max_detections, num_candidates), dim=1)
        boxes = boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
        labels = labels.gather(1, index)
        found = scores >= 0
        scale = original_sizes.flip(-1).repeat(1, 2).to(boxes.dtype).unsqueeze(1)  # (w, h, w, h)
        boxes = torch.where(found.unsqueeze(-1), boxes * scale, 0.0)
        return boxes, scores.clamp(min=0.0), torch.where(found, labels, -1)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's messages that say nothing about the user's model: its progress lines, that axes sharing
    a dimension keep one name, and onnx_ir's note on an empty attribute list."""
    ir_logger = logging.getLogger("onnx_ir._convenience")
    level = ir_logger.level
    ir_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        ir_logger.setLevel(level)


def _fixed_input_size(processor: SADImageProcessor) -> bool:
    """Whether every batch the processor makes has the same height and width (a fixed `size` or `pad_size`): the
    graph is then exported for that size, and what depends on it alone (anchors, a ViT's resampled position
    embeddings) is computed once, at export."""
    size, pad_size = processor.size, processor.pad_size
    return bool((processor.do_pad and pad_size is not None and pad_size.height)
                or (processor.do_resize and size.height and size.width))


def _sample_inputs(processor: SADImageProcessor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two images of different sizes through the processor: a batch whose dimensions are all different and above
    1, so that the exporter treats none of them as a constant."""
    images = [Image.new("RGB", (160, 120)), Image.new("RGB", (96, 200))]
    inputs = processor(images=images, return_tensors="pt")
    sizes = torch.tensor([[image.height, image.width] for image in images])
    return inputs["pixel_values"], inputs["pixel_mask"], sizes


def export_onnx(
    model: SADForObjectDetection,
    processor: SADImageProcessor,
    path: str | Path,
    *,
    opset_version: int = OPSET,
) -> Path:
    """
    Export `model` with its post-processing (`DetectorWithPostProcessing`) to an ONNX file, checked by
    `onnx.checker`. The batch size is dynamic, and so are height and width (multiples of `pad_size_divisor`) unless
    the processor makes every image one size (a fixed `size` or `pad_size`).

    Args:
        model: the detector; exported in float32, on the CPU, in eval mode (the model itself is not changed).
        processor: its image processor: the post-processing settings baked into the graph come from here.
        path: the `.onnx` file to write.
        opset_version: ONNX opset.

    Returns:
        The path written. Its metadata holds the baked settings (`hf_sad.post_processing`) and `id2label`.
    """
    try:
        import onnx
    except ImportError as error:
        raise ImportError(f"Exporting to ONNX needs onnx and onnxscript: {INSTALL_HINT}") from error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = DetectorWithPostProcessing(copy.deepcopy(model).float().cpu().eval(), processor).eval()
    sample = _sample_inputs(processor)
    batch = torch.export.Dim("batch_size", min=1)
    image, mask = {0: batch}, {0: batch}
    if not _fixed_input_size(processor):
        # Multiples of the padding divisor: the shapes the processor produces and the network is built for.
        divisor = processor.pad_size_divisor or 1
        height, width = torch.export.Dim("height_blocks", min=1), torch.export.Dim("width_blocks", min=1)
        image.update({2: divisor * height, 3: divisor * width})
        mask.update({1: divisor * height, 2: divisor * width})
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            sample,
            dynamo=True,
            input_names=["pixel_values", "pixel_mask", "original_sizes"],
            output_names=["boxes", "scores", "labels"],
            dynamic_shapes=(image, mask, {0: batch}),
            custom_translation_table=_onnx_translation_table(),
            opset_version=opset_version,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    metadata = {METADATA_KEY: json.dumps(post_processing_settings(processor)),
                "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()})}
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_openvino(onnx_path: str | Path, path: str | Path) -> Path:
    """
    Convert an exported ONNX file to OpenVINO IR: `path` (.xml) and its weights beside it (.bin), float32 weights (no
    fp16 compression, so that detections match the ONNX file's).

    Constant subgraphs are computed first, by ONNX Runtime: OpenVINO computes ONNX's antialiased `Resize`
    differently, and a ViT's position embeddings, resampled to a fixed input size, are such a subgraph. An
    antialiased resize that depends on the input (a ViT exported for any size) is a ValueError.
    """
    try:
        import onnx
        import onnxruntime
        import openvino
    except ImportError as error:
        raise ImportError(f"Exporting to OpenVINO needs onnxruntime and openvino: {INSTALL_HINT}") from error
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        options = onnxruntime.SessionOptions()
        # The basic level only folds constants and removes redundant nodes: the graph keeps standard ONNX ops.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(folded)).graph
        antialiased = [node.name for node in graph.node if node.op_type == "Resize"
                       and any(a.name == "antialias" and a.i for a in node.attribute)]
        if antialiased:
            raise ValueError(
                f"{onnx_path} resizes with antialiasing inside the graph ({len(antialiased)} node(s), e.g. a ViT "
                "resampling its position embeddings for each input size), which OpenVINO computes differently from "
                "PyTorch. Give the image processor a fixed size (size={'height': ..., 'width': ...}) and export "
                "again, or run the ONNX file with ONNX Runtime."
            )
        converted = openvino.convert_model(str(folded))
    for entry in onnx.load(str(onnx_path), load_external_data=False).metadata_props:
        if entry.key == METADATA_KEY:
            converted.set_rt_info(entry.value, [METADATA_KEY])
    openvino.save_model(converted, str(path), compress_to_fp16=False)
    return path


def quantize_onnx(
    onnx_path: str | Path,
    path: str | Path,
    processor: SADImageProcessor,
    calibration_images: Sequence[Image.Image],
) -> Path:
    """
    Static int8 quantisation of an exported ONNX file (ONNX Runtime, QDQ format, per-channel int8 weights, uint8
    activations), calibrated on `calibration_images` (a hundred or so images like those it will see). Only the
    convolutions are quantised; box decoding and NMS stay float32.
    """
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as error:
        raise ImportError(f"int8 quantisation needs onnxruntime: {INSTALL_HINT}") from error
    if not calibration_images:
        raise ValueError("int8 quantisation needs calibration images; none were given.")

    class Reader(CalibrationDataReader):
        def __init__(self, images: Iterable[Image.Image]) -> None:
            self.images = iter(images)

        def get_next(self) -> dict[str, Any] | None:
            image = next(self.images, None)
            if image is None:
                return None
            inputs = processor(images=[image.convert("RGB")], return_tensors="pt")
            return {"pixel_values": inputs["pixel_values"].numpy(), "pixel_mask": inputs["pixel_mask"].numpy(),
                    "original_sizes": torch.tensor([[image.height, image.width]]).numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        # ONNX Runtime's recommended preparation (shape inference, graph clean-up); its symbolic shape inference
        # does not follow NMS's data-dependent output size, and is not needed for convolutions.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(path), Reader(calibration_images), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
        )
    return Path(path)


def exported_file(model_dir: str | Path, format: str = "onnx") -> Path:
    """The file `hf-sad export` writes for `format` in a model folder."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}: expected one of {sorted(EXPORT_FORMATS)}.")
    return Path(model_dir) / EXPORT_FORMATS[format]
