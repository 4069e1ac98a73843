"""Exports (`hf_sad.export`, `hf_sad.runtime`, `hf-sad export`): the in-graph NMS against ONNX's own operator, the
exported detections against PyTorch's post-processing (ONNX Runtime and OpenVINO, CNN and ViT, several sizes and
batch sizes, real images), int8, the CLI, and what a stale or unsupported export says."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from torchvision.ops import box_iou

from hf_sad.cli import main
from hf_sad.export import DetectorWithPostProcessing, export_onnx, export_openvino, multiclass_nms
from hf_sad.runtime import ExportedDetector

from .utils import BCCD, save_detector, tiny_detector

BCCD_LABELS = {0: "RBC", 1: "WBC", 2: "Platelets"}
# Tolerances of the comparison with PyTorch: the same float32 network run by other kernels (other summation orders):
# scores within 1e-4 and box coordinates within 1e-3 relative, as the export promises.
SCORE_ATOL, BOX_RTOL = 1e-4, 1e-3


def spread_scores(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """An untrained head scores every anchor near its prior (0.01), where float noise reorders near-ties: random
    classification weights spread the scores, so that the comparison is about detections, not ties."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.class_head.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def bccd_images(count: int, start: int = 0) -> list[Image.Image]:
    files = sorted((BCCD / "images").glob("*.jpg"))[start : start + count]
    return [Image.open(file).convert("RGB") for file in files]


def resized(images: list[Image.Image], sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """The images at other (width, height): a batch of mixed sizes, as users give them."""
    return [image.resize(size) for image, size in zip(images, sizes)]


def assert_same_detections(expected: dict, actual: dict, threshold: float) -> None:
    """The same detections up to float noise: equal sorted scores, and each expected box matched by an actual box of
    its class (order among near-equal scores may differ). Detections within SCORE_ATOL of the threshold may be on
    either side of it."""
    def clear(detections):
        keep = (detections["scores"] - threshold).abs() > SCORE_ATOL
        return {key: value[keep] for key, value in detections.items()}

    expected, actual = clear(expected), clear(actual)
    assert len(expected["scores"]) == len(actual["scores"])
    torch.testing.assert_close(actual["scores"].sort().values, expected["scores"].sort().values, rtol=0,
                               atol=SCORE_ATOL)
    unused = torch.ones(len(actual["scores"]), dtype=torch.bool)
    for box, label in zip(expected["boxes"], expected["labels"]):
        candidates = unused & (actual["labels"] == label)
        assert candidates.any(), f"no detection of class {int(label)} left to match {box.tolist()}"
        overlap = box_iou(box[None], actual["boxes"])[0].masked_fill(~candidates, -1)
        match = int(overlap.argmax())
        torch.testing.assert_close(actual["boxes"][match], box, rtol=BOX_RTOL, atol=BOX_RTOL)
        unused[match] = False


def pytorch_detections(model, processor, images, threshold):
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    sizes = [(image.height, image.width) for image in images]
    return processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)


# ------------------------------------------------------------------------------------------------------------ NMS


def onnx_nms(boxes: np.ndarray, scores: np.ndarray, max_per_class: int, iou: float) -> np.ndarray:
    """ONNX Runtime's NonMaxSuppression (score_threshold 0), the operator the export emits."""
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "threshold"], ["selected"])
    graph = helper.make_graph(
        [node], "nms",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, None)],
        [helper.make_tensor("max", TensorProto.INT64, [1], [max_per_class]),
         helper.make_tensor("iou", TensorProto.FLOAT, [1], [iou]),
         helper.make_tensor("threshold", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"boxes": boxes, "scores": scores})[0]


@pytest.mark.parametrize(("max_per_class", "iou"), [(100, 0.5), (3, 0.5), (100, 0.3)])
def test_multiclass_nms_is_onnx_nonmaxsuppression(max_per_class, iou):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(3, 60, 2, generator=generator) * 80
    boxes = torch.cat([corners, corners + 5 + torch.rand(3, 60, 2, generator=generator) * 30], dim=-1)
    scores = torch.rand(3, 4, 60, generator=generator)
    scores[torch.rand(3, 4, 60, generator=generator) < 0.5] = -1.0  # boxes that do not take part in a class
    expected = onnx_nms(boxes.numpy(), scores.numpy(), max_per_class, iou)
    assert len(expected) > 12  # suppression and selection both happen
    np.testing.assert_array_equal(multiclass_nms(boxes, scores, max_per_class, iou).numpy(), expected)


# ---------------------------------------------------------------------------------------------- the module itself


@pytest.mark.parametrize("top_k", [1000, 40])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_the_export_module_gives_the_processors_detections(top_k, threshold):
    model, processor = tiny_detector(id2label=BCCD_LABELS, image_size=64)
    spread_scores(model)
    processor.pre_nms_top_k = top_k  # 40: fewer candidates than the 100 detections kept
    images = resized(bccd_images(3), [(96, 64), (64, 64), (50, 120)])
    expected = pytorch_detections(model, processor, images, threshold)
    inputs = processor(images=images, return_tensors="pt")
    sizes = torch.tensor([[image.height, image.width] for image in images])
    with torch.no_grad():
        boxes, scores, labels = DetectorWithPostProcessing(model, processor)(
            inputs["pixel_values"], inputs["pixel_mask"], sizes)
    assert boxes.shape == (3, min(top_k, processor.max_detections), 4)
    assert (labels[scores == 0] == -1).all()
    assert (scores == 0).any() == (top_k == 40)  # padding rows where fewer than the rows survive NMS
    for i, detections in enumerate(expected):
        keep = scores[i] > threshold
        assert_same_detections(detections, {"scores": scores[i][keep], "labels": labels[i][keep],
                                            "boxes": boxes[i][keep]}, threshold)


# ---------------------------------------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def cnn_folder(tmp_path_factory):
    """A saved ResNet-18 detector (any input size), exported by `hf-sad export` as ONNX (+ int8) and OpenVINO."""
    folder = tmp_path_factory.mktemp("cnn")
    model, processor = tiny_detector(id2label=BCCD_LABELS, image_size=64)
    save_detector((spread_scores(model), processor), folder)
    calibration = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(bccd_images(8, start=20)):
        image.save(calibration / f"{i}.jpg")
    written = main(["export", str(folder), "--int8", "--calibration_data", str(calibration)])
    assert written == {"onnx": str(folder / "model.onnx"), "onnx_int8": str(folder / "model_int8.onnx")}
    export_openvino(folder / "model.onnx", folder / "openvino_model.xml")
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A saved ViT detector with a fixed input size, exported as ONNX and OpenVINO."""
    folder = tmp_path_factory.mktemp("vit")
    model, processor = tiny_detector(backbone="vit_tiny_patch16_224", id2label=BCCD_LABELS,
                                     image_size={"height": 64, "width": 96},
                                     backbone_kwargs={"dynamic_img_size": True})
    save_detector((spread_scores(model), processor), folder)
    export_onnx(model, processor, folder / "model.onnx")
    export_openvino(folder / "model.onnx", folder / "openvino_model.xml")
    return folder


def load(folder: Path):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    return AutoModelForObjectDetection.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("network", ["cnn", "vit"])
def test_exported_detections_equal_pytorch(request, backend, network):
    folder = request.getfixturevalue(f"{network}_folder")
    model, processor = load(folder)
    exported = ExportedDetector.from_pretrained(folder, backend=backend)
    images = bccd_images(6)
    batches = [resized(images[:1], [(64, 48)]),  # batch 1
               resized(images[1:4], [(100, 60), (64, 64), (40, 130)]),  # mixed sizes, padded
               images[4:6]]  # full size (640x480): resized by the processor
    for batch in batches:
        for threshold in (0.0, 0.3):
            expected = pytorch_detections(model, processor, batch, threshold)
            for want, got in zip(expected, exported(batch, threshold=threshold, batch_size=len(batch))):
                assert_same_detections(want, got, threshold)


def test_the_cnn_export_takes_any_size_and_the_fixed_size_vit_one_size(cnn_folder, vit_folder):
    shapes = {}
    for name, folder in (("cnn", cnn_folder), ("vit", vit_folder)):
        graph = onnx.load(str(folder / "model.onnx")).graph
        shapes[name] = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(shapes["cnn"][0], str) and all(isinstance(d, str) for d in shapes["cnn"][2:])
    assert isinstance(shapes["vit"][0], str) and shapes["vit"][2:] == [64, 96]


def test_int8_export_is_quantised_and_gives_valid_detections(cnn_folder):
    graph = onnx.load(str(cnn_folder / "model_int8.onnx")).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert not any(node.op_type == "QuantizeLinear" for node in onnx.load(str(cnn_folder / "model.onnx")).graph.node)
    images = bccd_images(2)
    exported = ExportedDetector.from_pretrained(cnn_folder, file="model_int8.onnx")
    float_model = ExportedDetector.from_pretrained(cnn_folder)
    for image, got, reference in zip(images, exported(images, threshold=0.0), float_model(images, threshold=0.0)):
        assert 0 < len(got["scores"]) <= 100 and ((got["scores"] > 0) & (got["scores"] <= 1)).all()
        assert ((got["labels"] >= 0) & (got["labels"] < 3)).all()
        assert (got["boxes"] >= 0).all() and (got["boxes"][:, [0, 2]] <= image.width).all()
        # Quantised, not broken: its best detection is one of the float model's 100.
        assert box_iou(got["boxes"][:1], reference["boxes"]).max() > 0.5


def test_predict_and_evaluate_with_export_backends_match_pytorch(cnn_folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(bccd_images(3, start=40)):
        image.save(images / f"blood_{i}.jpg")
    found = {}
    for backend in ("pytorch", "onnxruntime", "openvino"):
        output = tmp_path / backend
        main(["predict", "--model", str(cnn_folder), "--images", str(images), "--output_dir", str(output),
              "--backend", backend, "--threshold", "0.3"])
        found[backend] = json.loads((output / "detections.json").read_text())
        assert sorted(p.name for p in output.iterdir()) == ["blood_0.png", "blood_1.png", "blood_2.png",
                                                            "detections.json"]
    for backend in ("onnxruntime", "openvino"):
        assert found[backend].keys() == found["pytorch"].keys()
        for name, expected in found["pytorch"].items():
            def as_tensors(found_in_image):
                return {"scores": torch.tensor([d["score"] for d in found_in_image]),
                        "labels": torch.tensor([list(BCCD_LABELS.values()).index(d["label"])
                                                for d in found_in_image]),
                        "boxes": torch.tensor([list(d["box"].values()) for d in found_in_image]).reshape(-1, 4)}
            # The JSON rounds scores to 4 decimals and boxes to 0.01 px.
            assert_same_detections(as_tensors(expected), as_tensors(found[backend][name]), 0.3)

    metrics = {}
    for backend in ("pytorch", "onnxruntime"):
        metrics[backend] = main(["evaluate", "--model", str(cnn_folder), "--data", str(BCCD / "val.json"),
                                 "--image_dir", str(BCCD / "images"), "--backend", backend,
                                 "--output_file", str(tmp_path / f"{backend}.json")])
    assert metrics["pytorch"]["mar_100"] > 0  # some boxes match: the comparison is not between empty results
    for key in ("map", "map_50", "mar_100", "map_RBC"):
        assert metrics["onnxruntime"][key] == pytest.approx(metrics["pytorch"][key], abs=1e-3)


# ------------------------------------------------------------------------------------------------------- refusals


def test_a_stale_export_is_refused(cnn_folder, tmp_path):
    model, processor = load(cnn_folder)
    processor.nms_iou_threshold = 0.6
    with pytest.raises(ValueError, match=r"exported with post-processing settings .*Export the model again"):
        ExportedDetector(cnn_folder / "model.onnx", processor, model.config.id2label)
    with pytest.raises(FileNotFoundError, match="hf-sad export .* --format openvino"):
        ExportedDetector.from_pretrained(tmp_path, backend="openvino")


def test_openvino_refuses_an_antialiased_resize_it_would_compute_differently(tmp_path):
    """A ViT exported for any input size resamples its position embeddings with an antialiased resize in the graph;
    OpenVINO computes that operator differently from PyTorch and ONNX Runtime."""
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", antialias=1)
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["sizes"]), node], "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match=r"antialiasing .* fixed size"):
        export_openvino(tmp_path / "m.onnx", tmp_path / "openvino_model.xml")


def test_cli_export_errors(tmp_path):
    with pytest.raises(ValueError, match="--int8 .* needs --calibration_data"):
        main(["export", str(tmp_path), "--int8"])
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        main(["export", str(tmp_path / "missing")])
