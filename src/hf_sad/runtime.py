"""Running an exported detector (`hf-sad export`) with ONNX Runtime or OpenVINO: the model folder's image processor
prepares the images, the exported graph does the rest (network, box decoding, NMS), and the score threshold is
applied last. The detections are those of the PyTorch model with `post_process_object_detection`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor

from .evaluation import DetectionMetrics, pack_detections, pack_targets
from .export import EXPORT_FORMATS, INSTALL_HINT, METADATA_KEY, post_processing_settings
from .model.image_processing_sad import SADImageProcessor

__all__ = ["BACKENDS", "ExportedDetector", "evaluate_exported"]

#: Backends of `ExportedDetector` -> the export format each runs.
BACKENDS = {"onnxruntime": "onnx", "openvino": "openvino"}


class ExportedDetector:
    """
    A detector exported by `hf-sad export`, run without PyTorch's network code.

    Args:
        path: the exported file (`model.onnx`, `model_int8.onnx`, `openvino_model.xml`).
        processor: the model's image processor; its post-processing settings must be those baked into the file.
        id2label: class index -> name.
        backend: `"onnxruntime"` (an `.onnx` file) or `"openvino"` (`.xml` or `.onnx`).
        num_threads: intra-op threads; default: the runtime's own choice (all cores).

    Call it with PIL images to get, per image, `{"scores" (k,), "labels" (k,) int64, "boxes" (k, 4) x1,y1,x2,y2
    absolute pixels}` (torch tensors, decreasing score), as `post_process_object_detection` with `target_sizes`.
    """

    def __init__(
        self,
        path: str | Path,
        processor: SADImageProcessor,
        id2label: Mapping[int, str],
        backend: str = "onnxruntime",
        num_threads: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}: expected one of {sorted(BACKENDS)}.")
        self.path, self.processor, self.backend = Path(path), processor, backend
        self.id2label = {int(k): v for k, v in id2label.items()}
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such exported model. Write it with `hf-sad export`.")
        self._run, baked = (_onnxruntime_session if backend == "onnxruntime" else _openvino_model)(
            self.path, num_threads
        )
        expected = post_processing_settings(processor)
        if baked is not None and baked != expected:
            raise ValueError(
                f"{self.path} was exported with post-processing settings {baked}, but the image processor now has "
                f"{expected}. Export the model again (`hf-sad export`) so that they agree."
            )

    @classmethod
    def from_pretrained(
        cls, model: str | Path, backend: str = "onnxruntime", file: str | None = None,
        num_threads: int | None = None, revision: str | None = None,
    ) -> ExportedDetector:
        """The exported detector of a model folder or Hub repository: `file` in it (default: what `hf-sad export`
        writes for the backend), with the model's image processor and class names."""
        if backend not in BACKENDS:
            raise ValueError(f"Unknown backend {backend!r}: expected one of {sorted(BACKENDS)}.")
        file = file or EXPORT_FORMATS[BACKENDS[backend]]
        folder = Path(model)
        if not folder.is_dir():
            folder = _download(str(model), file, revision)
        path = folder / file
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file. Export the model first: hf-sad export {model} --format {BACKENDS[backend]}."
            )
        processor = AutoImageProcessor.from_pretrained(str(folder))
        id2label = AutoConfig.from_pretrained(str(folder)).id2label
        return cls(path, processor, id2label, backend=backend, num_threads=num_threads)

    def inputs(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch of images: the processor's `pixel_values` and `pixel_mask`, and the
        images' (height, width) as `original_sizes`."""
        processed = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        sizes = torch.tensor([[image.height, image.width] for image in images])
        return _graph_inputs(processed["pixel_values"], processed["pixel_mask"], sizes)

    def run(self, inputs: Mapping[str, np.ndarray], threshold: float | None = 0.5) -> list[dict[str, torch.Tensor]]:
        """Detections of one batch of graph inputs scoring above `threshold` (strictly; `None`: the processor's
        `score_threshold`, as evaluation uses)."""
        threshold = self.processor.score_threshold if threshold is None else threshold
        boxes, scores, labels = self._run(dict(inputs))
        results = []
        for image_boxes, image_scores, image_labels in zip(boxes, scores, labels):
            keep = image_scores > threshold
            results.append({
                "scores": torch.from_numpy(image_scores[keep].astype(np.float32)),
                "labels": torch.from_numpy(image_labels[keep].astype(np.int64)),
                "boxes": torch.from_numpy(image_boxes[keep].astype(np.float32)),
            })
        return results

    def __call__(
        self, images: Sequence[Image.Image], threshold: float | None = 0.5, batch_size: int = 8
    ) -> list[dict[str, torch.Tensor]]:
        """Detections scoring above `threshold` (strictly), per image."""
        results = []
        for start in range(0, len(images), batch_size):
            results += self.run(self.inputs(images[start : start + batch_size]), threshold)
        return results


def evaluate_exported(detector: ExportedDetector, dataloader: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """COCO metrics of an exported detector over the batches of an evaluation dataloader (`SADTrainer`'s: the
    processor's inputs and labels with `orig_size`), with the processor's `score_threshold`, as
    `SADTrainer.evaluate` computes them for the PyTorch model."""
    predictions, targets = [], []
    for batch in tqdm(dataloader, desc=f"Evaluating {detector.path.name}", unit="batch"):
        sizes = torch.stack([target["orig_size"] for target in batch["labels"]])
        detections = detector.run(_graph_inputs(batch["pixel_values"], batch["pixel_mask"], sizes), threshold=None)
        predictions.append(pack_detections(detections).numpy())
        targets.append(pack_targets(batch["labels"]).numpy())
    return DetectionMetrics(detector.id2label)(SimpleNamespace(predictions=predictions, label_ids=targets))


def _graph_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor, sizes: torch.Tensor) -> dict[str, np.ndarray]:
    return {"pixel_values": pixel_values.float().numpy(), "pixel_mask": pixel_mask.long().numpy(),
            "original_sizes": sizes.long().numpy()}


def _download(repo_id: str, file: str, revision: str | None) -> Path:
    """The files of a Hub model that running `file` needs (OpenVINO's weights file too), in the local cache."""
    from huggingface_hub import snapshot_download

    patterns = [file, str(Path(file).with_suffix(".bin")), "config.json", "preprocessor_config.json"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def _onnxruntime_session(path: Path, num_threads: int | None) -> tuple[Any, dict | None]:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"The onnxruntime backend needs the onnxruntime package: {INSTALL_HINT}") from error
    options = onnxruntime.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = num_threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    baked = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(["boxes", "scores", "labels"], inputs)

    return run, json.loads(baked) if baked else None


def _openvino_model(path: Path, num_threads: int | None) -> tuple[Any, dict | None]:
    try:
        import openvino
    except ImportError as error:
        raise ImportError(f"The openvino backend needs the openvino package: {INSTALL_HINT}") from error
    core = openvino.Core()
    model = core.read_model(str(path))
    baked = model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None
    # f32: on CPUs with bf16 units OpenVINO would otherwise infer in bf16, and the detections would drift.
    config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": num_threads} if num_threads else {})}
    compiled = core.compile_model(model, "CPU", config)
    outputs = [compiled.output(name) for name in ("boxes", "scores", "labels")]

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = compiled(inputs)
        return [result[output] for output in outputs]

    return run, json.loads(baked) if baked else None
