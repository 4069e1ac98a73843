"""Tests of `SADImageProcessor`: resizing, padding, annotations, post-processing, serialisation. Small images, CPU only.

`select_detections`, which post-processing calls, is tested in test_box_ops.py.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.utils import ModelOutput

from hf_sad.model.image_processing_sad import SADImageProcessor

from .utils import save_detector, tiny_detector


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _image_extent(pixel_mask: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the real pixels of one `(H, W)` mask whose padding is bottom/right."""
    return int(pixel_mask[:, 0].sum()), int(pixel_mask[0, :].sum())


def _coco(image_id: int, *objects: dict) -> dict:
    return {"image_id": image_id, "annotations": list(objects)}


# --------------------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    ("size", "image_hw", "expected_hw"),
    [
        # shortest edge 40 -> 64 keeps the longest edge (96) under 100
        ({"shortest_edge": 64, "longest_edge": 100}, (40, 60), (64, 96)),
        # shortest edge to 64 would make the longest 160 > 100: the longest edge is capped instead
        ({"shortest_edge": 64, "longest_edge": 100}, (40, 100), (40, 100)),
        ({"shortest_edge": 64, "longest_edge": 100}, (100, 20), (100, 20)),
        ({"longest_edge": 50}, (40, 100), (20, 50)),
        ({"longest_edge": 50}, (100, 30), (50, 15)),
        ({"height": 32, "width": 48}, (40, 100), (32, 48)),
    ],
)
def test_resize_modes(size, image_hw, expected_hw):
    processor = SADImageProcessor(size=size, pad_size_divisor=32)
    out = processor(Image.fromarray(_rgb(*image_hw)), annotations=_coco(0))
    assert _image_extent(out["pixel_mask"][0]) == expected_hw
    assert out["labels"][0]["size"].tolist() == list(expected_hw)
    assert out["labels"][0]["orig_size"].tolist() == list(image_hw)


def test_default_size_matches_detr_rule():
    processor = SADImageProcessor()
    out = processor(Image.fromarray(_rgb(100, 200)), annotations=_coco(0))
    # 512 on the short side would give 1024 > 853 on the long side, so the long side is 853.
    assert out["labels"][0]["size"].tolist() == [426, 853]
    assert out["pixel_values"].shape == (1, 3, 448, 864)  # padded to multiples of 32


# ---------------------------------------------------------------------------------------------------------- padding


def test_padding_to_multiple_and_batch_max():
    images = [_rgb(30, 50, seed=1), _rgb(70, 20, seed=2)]
    out = SADImageProcessor(do_resize=False, pad_size_divisor=32)(images)
    pixel_values, pixel_mask = out["pixel_values"], out["pixel_mask"]
    assert pixel_values.shape == (2, 3, 96, 64) and pixel_values.dtype == torch.float32
    assert pixel_mask.shape == (2, 96, 64) and pixel_mask.dtype == torch.int64

    for index, (height, width) in enumerate([(30, 50), (70, 20)]):
        expected = torch.zeros(96, 64, dtype=torch.int64)
        expected[:height, :width] = 1
        assert torch.equal(pixel_mask[index], expected)
        # padding is bottom/right with zeros (after normalisation)
        assert (pixel_values[index][:, ~expected.bool()] == 0).all()


def test_padding_default_divisor_and_no_divisor():
    image = _rgb(30, 50)
    assert SADImageProcessor(do_resize=False)(image)["pixel_values"].shape == (1, 3, 32, 64)
    out = SADImageProcessor(do_resize=False, pad_size_divisor=None)([image, _rgb(70, 20)])
    assert out["pixel_values"].shape == (2, 3, 70, 50)


def test_no_padding_gives_full_mask_and_rejects_mixed_sizes():
    out = SADImageProcessor(do_resize=False, do_pad=False)([_rgb(30, 50), _rgb(30, 50, seed=3)])
    assert out["pixel_values"].shape == (2, 3, 30, 50)
    assert (out["pixel_mask"] == 1).all()
    with pytest.raises(ValueError, match="do_pad"):
        SADImageProcessor(do_resize=False, do_pad=False)([_rgb(30, 50), _rgb(20, 50)])


# ---------------------------------------------------------------------------------------------------- normalisation


def test_rescale_and_normalize_values():
    image = np.full((8, 8, 3), 128, dtype=np.uint8)
    image[..., 1] = 0
    image[..., 2] = 255
    mean, std = [0.5, 0.25, 0.75], [0.5, 0.2, 0.1]
    out = SADImageProcessor(do_resize=False, do_pad=False, image_mean=mean, image_std=std)(image)
    expected = [(128 / 255 - 0.5) / 0.5, (0 - 0.25) / 0.2, (1 - 0.75) / 0.1]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(out["pixel_values"][0, channel], torch.full((8, 8), value), rtol=0, atol=1e-5)

    out = SADImageProcessor(do_resize=False, do_pad=False, do_normalize=False)(image)
    torch.testing.assert_close(out["pixel_values"][0, 0], torch.full((8, 8), 128 / 255))


# ------------------------------------------------------------------------------------------------------ annotations


def test_coco_annotation_to_normalised_cxcywh_unchanged_by_resize():
    # image height 100, width 200; bbox x=10, y=20, w=30, h=40 -> x1y1x2y2 (10, 20, 40, 60) -> cx 25, cy 40
    expected = torch.tensor([[25 / 200, 40 / 100, 30 / 200, 40 / 100]], dtype=torch.float32)
    annotation = _coco(7, {"bbox": [10, 20, 30, 40], "category_id": 3})
    image = Image.fromarray(_rgb(100, 200))
    for size in ({"height": 50, "width": 100}, {"height": 64, "width": 64}, {"shortest_edge": 64, "longest_edge": 90}):
        labels = SADImageProcessor(size=size)(image, annotations=annotation)["labels"][0]
        assert torch.equal(labels["boxes"], expected)
        assert labels["boxes"].dtype == torch.float32
        assert labels["class_labels"].tolist() == [3] and labels["class_labels"].dtype == torch.int64
        assert labels["image_id"].item() == 7 and labels["image_id"].dtype == torch.int64
        assert labels["orig_size"].tolist() == [100, 200]
        assert labels["iscrowd"].tolist() == [0]

    labels = SADImageProcessor(size={"height": 50, "width": 100})(image, annotations=annotation)["labels"][0]
    assert labels["size"].tolist() == [50, 100]
    # area: 30 * 40 input pixels, x (50 / 100) * (100 / 200) in resized pixels
    assert labels["area"].tolist() == [300.0] and labels["area"].dtype == torch.float32


def test_given_area_and_iscrowd_are_kept():
    annotation = _coco(1, {"bbox": [0, 0, 10, 10], "category_id": 0, "area": 55.0, "iscrowd": 1})
    labels = SADImageProcessor(size={"height": 200, "width": 400})(_rgb(100, 200), annotations=annotation)["labels"]
    assert labels[0]["area"].tolist() == [220.0]
    assert labels[0]["iscrowd"].tolist() == [1]


def test_unconverted_annotations_are_absolute_xyxy_in_resized_pixels():
    annotation = _coco(0, {"bbox": [10, 20, 30, 40], "category_id": 1})
    processor = SADImageProcessor(size={"height": 50, "width": 400}, do_convert_annotations=False)
    labels = processor(_rgb(100, 200), annotations=annotation)["labels"][0]
    assert torch.equal(labels["boxes"], torch.tensor([[20.0, 10.0, 80.0, 30.0]]))


def test_empty_annotations():
    labels = SADImageProcessor()(
        [_rgb(40, 60), _rgb(50, 50)], annotations=[_coco(1), _coco(2, {"bbox": [1, 1, 5, 5], "category_id": 0})]
    )["labels"]
    assert labels[0]["boxes"].shape == (0, 4) and labels[0]["boxes"].dtype == torch.float32
    assert labels[0]["class_labels"].shape == (0,) and labels[0]["class_labels"].dtype == torch.int64
    assert labels[0]["area"].shape == (0,) and labels[0]["iscrowd"].shape == (0,)
    assert labels[1]["boxes"].shape == (1, 4)


def test_boxes_are_clipped_and_empty_ones_dropped():
    annotation = _coco(
        5,
        {"bbox": [-10, -10, 30, 30], "category_id": 1},  # top-left corner outside -> (0, 0, 20, 20)
        {"bbox": [300, 10, 5, 5], "category_id": 2},  # entirely right of the image -> dropped
        {"bbox": [190, 90, 50, 50], "category_id": 3},  # bottom-right outside -> (190, 90, 200, 100)
        {"bbox": [10, 10, 0, 5], "category_id": 4},  # zero width -> dropped
    )
    labels = SADImageProcessor(do_resize=False)(_rgb(100, 200), annotations=annotation)["labels"][0]
    assert labels["class_labels"].tolist() == [1, 3]
    expected = torch.tensor([[10 / 200, 10 / 100, 20 / 200, 20 / 100], [195 / 200, 95 / 100, 10 / 200, 10 / 100]])
    assert torch.equal(labels["boxes"], expected)
    assert labels["area"].tolist() == [400.0, 100.0]


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([{"category_id": 1}], r"image_id=42.*annotations\[0\].*'bbox'"),
        ([{"bbox": [1, 2, 3, 4]}], r"image_id=42.*annotations\[0\].*'category_id'"),
        ([{"bbox": [1, 2, 3, 4], "category_id": 1}, {"bbox": [1, 2, 3], "category_id": 1}], r"image_id=42.*\[1\]"),
        ([{"bbox": [1, 2, math.nan, 4], "category_id": 1}], r"image_id=42.*bbox.*NaN or infinite"),
        ([{"bbox": [1, 2, 3, math.inf], "category_id": 1}], r"image_id=42.*bbox.*NaN or infinite"),
        ([{"bbox": [1, 2, 3, 4], "category_id": 1.5}], r"image_id=42.*category_id.*integer"),
        ([{"bbox": "1234", "category_id": 1}], r"image_id=42.*bbox.*numbers"),
    ],
)
def test_invalid_annotations_raise_naming_image_id(objects, message):
    with pytest.raises(ValueError, match=message):
        SADImageProcessor()(_rgb(20, 20), annotations={"image_id": 42, "annotations": objects})


def test_annotation_structure_errors():
    processor = SADImageProcessor()
    with pytest.raises(ValueError, match="2 images but 1 annotations"):
        processor([_rgb(20, 20), _rgb(20, 20)], annotations=[_coco(0)])
    with pytest.raises(ValueError, match="COCO detection format"):
        processor(_rgb(20, 20), annotations={"annotations": []})


# ----------------------------------------------------------------------------------------------------- input types


def test_input_types_agree():
    rgb = _rgb(20, 30)
    processor = SADImageProcessor(do_resize=False, do_pad=False)
    reference = processor(Image.fromarray(rgb))["pixel_values"]
    inputs = {
        "numpy HWC": rgb,
        "numpy CHW": np.ascontiguousarray(rgb.transpose(2, 0, 1)),
        "tensor CHW uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "tensor HWC float": torch.from_numpy(rgb).float(),
        "RGBA PIL, opaque": Image.fromarray(np.concatenate([rgb, np.full((20, 30, 1), 255, np.uint8)], axis=-1)),
    }
    for name, image in inputs.items():
        torch.testing.assert_close(processor(image)["pixel_values"], reference, msg=name)
    # a float image already in [0, 1] is processed as such with do_rescale=False
    torch.testing.assert_close(
        processor(torch.from_numpy(rgb).float() / 255, do_rescale=False)["pixel_values"], reference
    )


def test_grayscale_inputs_become_rgb():
    gray = np.random.default_rng(0).integers(0, 256, size=(20, 30), dtype=np.uint8)
    processor = SADImageProcessor(do_resize=False, do_pad=False, do_normalize=False)
    for image in (Image.fromarray(gray, mode="L"), gray, gray[..., None], torch.from_numpy(gray)[None]):
        pixel_values = processor(image)["pixel_values"]
        assert pixel_values.shape == (1, 3, 20, 30)
        for channel in range(3):
            torch.testing.assert_close(pixel_values[0, channel], torch.from_numpy(gray).float() / 255)


# ------------------------------------------------------------------------------------------------- post-processing


def _outputs(logits: list, pred_boxes: list) -> dict:
    """Model outputs from per-image probabilities (turned into logits) and normalised cx,cy,w,h boxes."""
    probabilities = torch.tensor(logits, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    return {"logits": torch.logit(probabilities), "pred_boxes": torch.tensor(pred_boxes, dtype=torch.float32)}


@dataclass
class _DetectionOutput(ModelOutput):
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None


def test_post_process_absolute_boxes_and_clipping():
    outputs = _outputs(
        [[[0.1, 0.9], [0.8, 0.2], [0.01, 0.02]]],
        [[[0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0]]],
    )
    processor = SADImageProcessor()
    for target_sizes in ([(100, 200)], torch.tensor([[100, 200]]), torch.IntTensor([[100, 200]])):
        (result,) = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=target_sizes)
        assert result["labels"].tolist() == [1, 0]
        torch.testing.assert_close(result["scores"], torch.tensor([0.9, 0.8]))
        # cx 0.5, cy 0.5, w 0.2, h 0.4 of a 200 x 100 image; the second box is clipped at x = 200 and y = 0
        torch.testing.assert_close(
            result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [170.0, 0.0, 200.0, 30.0]])
        )

    (normalised,) = processor.post_process_object_detection(_DetectionOutput(**outputs), threshold=0.5)
    torch.testing.assert_close(normalised["boxes"], torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.85, 0.0, 1.0, 0.3]]))


def test_post_process_threshold():
    outputs = _outputs([[[0.9, 0.3], [0.06, 0.04]]], [[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]]])
    processor = SADImageProcessor()
    assert processor.post_process_object_detection(outputs, threshold=0.5)[0]["scores"].numel() == 1
    assert processor.post_process_object_detection(outputs, threshold=0.2)[0]["scores"].numel() == 2
    # threshold=None falls back to score_threshold (0.05): 0.9, 0.3 and 0.06 pass
    assert processor.post_process_object_detection(outputs, threshold=None)[0]["scores"].numel() == 3


def test_post_process_class_wise_nms():
    boxes = [[[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4]]]  # IoU about 0.95
    processor = SADImageProcessor()
    different = processor.post_process_object_detection(_outputs([[[0.9, 0.0], [0.0, 0.8]]], boxes), threshold=0.5)
    assert sorted(different[0]["labels"].tolist()) == [0, 1]
    same = processor.post_process_object_detection(_outputs([[[0.9, 0.0], [0.8, 0.0]]], boxes), threshold=0.5)
    assert same[0]["labels"].tolist() == [0]
    torch.testing.assert_close(same[0]["scores"], torch.tensor([0.9]))
    # a looser IoU threshold keeps both
    kept = processor.post_process_object_detection(
        _outputs([[[0.9, 0.0], [0.8, 0.0]]], boxes), threshold=0.5, nms_iou_threshold=0.99
    )
    assert kept[0]["labels"].tolist() == [0, 0]


def test_post_process_images_do_not_suppress_each_other():
    outputs = _outputs([[[0.9, 0.0]], [[0.8, 0.0]]], [[[0.5, 0.5, 0.4, 0.4]], [[0.5, 0.5, 0.4, 0.4]]])
    results = SADImageProcessor().post_process_object_detection(outputs, threshold=0.5, target_sizes=[(10, 10)] * 2)
    assert [r["labels"].tolist() for r in results] == [[0], [0]]
    torch.testing.assert_close(results[1]["scores"], torch.tensor([0.8]))


def test_post_process_max_detections_keeps_best_sorted():
    num_anchors = 12
    probabilities = [[[0.5 + 0.04 * i] for i in range(num_anchors)]]
    # disjoint boxes on a grid so that NMS removes nothing
    boxes = [[[(i % 4) * 0.25 + 0.125, (i // 4) * 0.25 + 0.125, 0.2, 0.2] for i in range(num_anchors)]]
    processor = SADImageProcessor(max_detections=5)
    (result,) = processor.post_process_object_detection(_outputs(probabilities, boxes), threshold=0.1)
    torch.testing.assert_close(result["scores"], torch.tensor([0.5 + 0.04 * i for i in range(11, 6, -1)]))
    (result,) = processor.post_process_object_detection(_outputs(probabilities, boxes), threshold=0.1, max_detections=3)
    assert result["scores"].numel() == 3
    (result,) = processor.post_process_object_detection(_outputs(probabilities, boxes), threshold=0.1, top_k=2)
    assert result["scores"].numel() == 2


def test_post_process_target_sizes_length_mismatch():
    outputs = _outputs([[[0.9]], [[0.9]]], [[[0.5, 0.5, 0.1, 0.1]], [[0.5, 0.5, 0.1, 0.1]]])
    with pytest.raises(ValueError, match="target sizes"):
        SADImageProcessor().post_process_object_detection(outputs, target_sizes=[(10, 10)])


# -------------------------------------------------------------------------------------------------- serialisation


def test_save_and_load_round_trip(tmp_path):
    processor = SADImageProcessor(
        size={"height": 96, "width": 160},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.3, 0.4],
        pad_size_divisor=64,
        do_convert_annotations=False,
        score_threshold=0.3,
        nms_iou_threshold=0.6,
        pre_nms_top_k=50,
        max_detections=7,
    )
    processor.save_pretrained(tmp_path)
    loaded = SADImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    for name in ("score_threshold", "nms_iou_threshold", "pre_nms_top_k", "max_detections", "pad_size_divisor"):
        assert getattr(loaded, name) == getattr(processor, name), name
    assert loaded.model_input_names == ["pixel_values", "pixel_mask"]

    image = _rgb(50, 70)
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    assert loaded(image)["pixel_values"].shape == (1, 3, 128, 192)


@pytest.mark.parametrize(
    "image",
    [Image.new("RGB", (1, 1)), Image.new("RGB", (1, 2000)), Image.new("RGB", (2000, 1)), Image.new("RGB", (3, 5)),
     Image.new("L", (50, 40)), Image.new("RGBA", (50, 40)), Image.new("CMYK", (50, 40)), Image.new("P", (50, 40)),
     Image.fromarray(np.full((40, 50), 40000, np.uint16)), np.zeros((40, 50), np.uint8),
     np.zeros((40, 50, 4), np.uint8), np.zeros((3, 40, 50), np.uint8), torch.zeros(40, 50, 3, dtype=torch.uint8)],
    ids=["1x1", "1x2000", "2000x1", "3x5", "L", "RGBA", "CMYK", "P", "I16", "np_hw", "np_hw4", "np_chw", "torch_hwc"],
)
def test_odd_but_legal_images_give_detections_inside_them(image):
    """Any image shape or mode a user can hand the processor runs through the model to boxes inside the image."""
    model, processor = tiny_detector(id2label={0: "a"}, image_size=128)
    width, height = image.size if isinstance(image, Image.Image) else (50, 40)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    (found,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(height, width)])
    assert len(found["boxes"]) > 0 and torch.isfinite(found["boxes"]).all()
    assert (found["boxes"][:, 2] <= width).all() and (found["boxes"][:, 3] <= height).all()


def test_no_image_is_a_clear_error():
    with pytest.raises(ValueError, match="No images were given"):
        SADImageProcessor()(images=[], return_tensors="pt")


def test_pipeline_batches_when_the_processor_has_a_fixed_size(tmp_path):
    """transformers' pipeline stacks per-image outputs: with batch_size > 1 every image must come out the same size,
    which a fixed `size` or `pad_size` gives (the processor itself batches any sizes by padding)."""
    import hf_sad  # noqa: F401  (local registration)

    model, processor = tiny_detector(id2label={0: "a"}, image_size=128)
    processor.pad_size = {"height": 256, "width": 256}  # every 128-px-shortest-edge image fits
    save_detector((model, processor), tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), batch_size=3)
    images = [Image.new("RGB", size) for size in ((128, 128), (200, 128), (128, 180))]
    results = detector(images, threshold=0.0)
    assert len(results) == 3 and all(results)
    processor.pad_size = None  # the processor alone pads a batch of any sizes to its largest image (x 32)
    mixed = processor(images=images, return_tensors="pt")
    assert mixed["pixel_values"].shape == (3, 3, 192, 224) and mixed["pixel_mask"][1, :128, :200].all()


def test_post_process_defaults_and_any_object_with_logits_and_boxes():
    """The pipeline's threshold 0.5 by default; the processor's own top-k and NMS settings apply unless overridden; an
    object that is not a mapping but has `logits` and `pred_boxes` works too."""
    from types import SimpleNamespace

    outputs = _outputs([[[0.9], [0.6], [0.4]]], [[[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]]])
    processor = SADImageProcessor()
    assert processor.post_process_object_detection(outputs)[0]["scores"].numel() == 2
    as_object = SimpleNamespace(logits=outputs["logits"], pred_boxes=outputs["pred_boxes"])
    assert processor.post_process_object_detection(as_object)[0]["scores"].numel() == 2
    single = SADImageProcessor(pre_nms_top_k=1)
    assert single.post_process_object_detection(outputs, threshold=0.1)[0]["scores"].numel() == 1
    assert single.post_process_object_detection(outputs, threshold=0.1, top_k=3)[0]["scores"].numel() == 3
    (found,) = processor.post_process_object_detection(outputs, target_sizes=[(10, 20)])
    assert found["boxes"].dtype == torch.float32
    torch.testing.assert_close(found["boxes"][0], torch.tensor([3.0, 1.5, 5.0, 2.5]))
