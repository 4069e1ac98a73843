"""The detector as a transformers model (`hf_sad.model.modeling_sad`, `hf_sad.model.configuration_sad`): shapes,
training, save/load in both routes, pipeline, backbones. Its supervised loss is tested in test_detection_loss.py."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops import box_convert, box_iou
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

import hf_sad
from hf_sad import SADConfig, SADForObjectDetection, create_detector

from .utils import LABELS, TINY, make_labels, save_detector, tiny_detector

# What save_pretrained copies beside the weights for trust_remote_code loading.
REMOTE_CODE = ("configuration_sad", "modeling_sad", "image_processing_sad", "box_ops", "detection_loss")


def test_output_shapes_and_anchor_counts(tiny_model):
    model, _ = tiny_model
    out = model(torch.randn(2, 3, 128, 192))
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]  # strides 8..128; stride-2 convs round up
    assert out.spatial_shapes.tolist() == [list(s) for s in shapes]
    num_anchors = sum(h * w for h, w in shapes) * 9
    assert out.logits.shape == (2, num_anchors, 3)
    assert out.pred_boxes.shape == (2, num_anchors, 4)
    assert out.box_regression.shape == (2, num_anchors, 4)
    assert out.anchors.shape == (num_anchors, 4)
    assert out.image_sizes.tolist() == [[128.0, 192.0]] * 2
    assert out.loss is None


def test_pred_boxes_are_normalised_to_valid_region(tiny_model):
    """With padding, boxes are relative to each image's real pixels, so target_sizes scaling is exact."""
    model, _ = tiny_model
    pixels = torch.randn(2, 3, 128, 128)
    mask = torch.ones(2, 128, 128, dtype=torch.long)
    mask[1, 64:, :] = 0  # second image is 64 x 128, padded below
    with torch.no_grad():
        out = model(pixels, pixel_mask=mask)
        out_nomask = model(pixels)
    assert out.image_sizes.tolist() == [[128.0, 128.0], [64.0, 128.0]]
    torch.testing.assert_close(out.pred_boxes[0], out_nomask.pred_boxes[0])
    scale = torch.tensor([1.0, 2.0, 1.0, 2.0])  # y and h double when normalised by 64 instead of 128
    torch.testing.assert_close(out.pred_boxes[1], out_nomask.pred_boxes[1] * scale)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="box_loss"):
        SADConfig(box_loss="l2")
    with pytest.raises(ValueError, match="min_level"):
        SADConfig(min_level=5, max_level=4)
    with pytest.raises(ValueError, match="min_level=1 needs stride 2"):
        SADForObjectDetection(SADConfig(backbone="convnext_atto", min_level=1, **TINY))  # finest stride is 4


def test_frozen_batchnorm_keeps_its_statistics_and_round_trips(tmp_path):
    model, processor = tiny_detector(freeze_batchnorm=True)
    frozen = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    out = model(torch.randn(2, 3, 64, 64) * 3 + 1, labels=make_labels([(0, 0.5, 0.5, 0.4, 0.3)], []))
    out.loss.backward()
    changed = [k for k, v in model.state_dict().items() if k.startswith("backbone") and not torch.equal(v, before[k])]
    assert not changed, changed  # statistics and affine parameters are buffers: a forward in training leaves them
    assert all(not p.requires_grad or p.grad is not None for p in model.parameters())
    save_detector((model, processor), tmp_path)
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path)
    assert loaded.config.freeze_batchnorm and type(loaded.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_init_from_copies_backbone_and_pyramid_and_starts_fresh_heads(tmp_path):
    source, processor = tiny_detector(seed=3)
    save_detector((source, processor), tmp_path / "pretrained")
    model, _ = create_detector("resnet18", {0: "x"}, init_from=tmp_path / "pretrained", image_size=64, **TINY)
    fresh, _ = tiny_detector(seed=0, id2label={0: "x"})
    assert model.config.freeze_batchnorm  # the default for a pretrained start
    for key, value in source.state_dict().items():
        if key.startswith(("backbone.", "pyramid.")) and not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.class_head.predictor.weight.shape[0] == 9  # one class, 9 anchors: its own head
    assert not torch.equal(model.box_head.tower[0].weight, source.box_head.tower[0].weight)
    assert fresh.class_head.predictor.bias[0] == model.class_head.predictor.bias[0]  # the prior bias
    with pytest.raises(ValueError, match=r"init_from .*do not fit this detector \(resnet18, fpn_channels=16\)"):
        create_detector("resnet18", {0: "x"}, init_from=tmp_path / "pretrained", fpn_channels=16)
    with pytest.raises(FileNotFoundError, match="model.safetensors does not exist"):
        create_detector("resnet18", {0: "x"}, init_from=tmp_path / "nowhere")


def test_bf16_autocast_forward_agrees_with_float32(tiny_model):
    """Under bf16 autocast the network runs in bf16 and the loss and boxes in float32, and they agree with the float32
    forward to bf16's precision. bf16 keeps 8 significant bits (rounding error 2^-9 of a value); through the ~20
    layers before the heads the errors add up to about 1% of an output's largest magnitude here (measured: logits
    0.4%, deltas 1.2%), so outputs must agree within 2^-5 (3%) of it. The loss, computed in float32 from the bf16
    logits, within 2^-6 of its value (measured 0.1%); boxes, decoded in float32, within 2^-9 of the image side
    (measured 1.4e-4): bf16 anchors or decoding would be off by up to 2^-9 of a coordinate."""
    model, _ = tiny_model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh heads all predict the prior; make their outputs vary
        for head in (model.class_head, model.box_head):
            head.predictor.weight.copy_(torch.randn(head.predictor.weight.shape, generator=generator) * 0.05)
    model.eval()
    pixels = torch.randn(2, 3, 128, 128, generator=generator)
    labels = make_labels([(0, 0.5, 0.5, 0.4, 0.3)], [(1, 0.3, 0.3, 0.2, 0.2)])
    with torch.no_grad():
        reference = model(pixels, labels=labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(pixels, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.box_regression.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.pred_boxes.dtype == torch.float32
    for name in ("logits", "box_regression"):
        low, high = getattr(out, name).float(), getattr(reference, name)
        assert (low - high).abs().max() <= 2**-5 * high.abs().max(), name
    assert (out.loss - reference.loss).abs() <= 2**-6 * reference.loss
    torch.testing.assert_close(out.pred_boxes, reference.pred_boxes, rtol=0, atol=2**-9)

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixels, labels=labels).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def squares_scene(seed: int, size: int = 128):
    """An image with 1-2 solid coloured shapes on black, and its labels (class = colour)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    boxes, classes = [], []
    for _ in range(rng.integers(1, 3)):
        w, h = rng.integers(24, 56, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        c = int(rng.integers(0, 3))
        image[y : y + h, x : x + w] = colours[c]
        boxes.append([x, y, w, h])
        classes.append(c)
    annotations = [{"bbox": [float(v) for v in b], "category_id": c, "area": float(b[2] * b[3])}
                   for b, c in zip(boxes, classes)]
    return Image.fromarray(image), {"image_id": seed, "annotations": annotations}


def test_tiny_model_overfits_a_few_images():
    # 16 channels, not TINY's 8: the model must fit these scenes within 80 steps; 128 px as the scenes.
    model, processor = tiny_detector(id2label=LABELS, image_size={"height": 128, "width": 128}, fpn_channels=16,
                                     head_channels=16)
    scenes = [squares_scene(s) for s in range(4)]
    batch = processor(images=[s[0] for s in scenes], annotations=[s[1] for s in scenes], return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(80):
        out = model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), (losses[:5], losses[-5:])

    model.eval()
    with torch.no_grad():
        out = model(batch["pixel_values"], batch["pixel_mask"])
    detections = processor.post_process_object_detection(out, threshold=0.3, target_sizes=[(128, 128)] * 4)
    for (_, target), det in zip(scenes, detections):
        gt = box_convert(torch.tensor([a["bbox"] for a in target["annotations"]]), "xywh", "xyxy")
        gt_classes = torch.tensor([a["category_id"] for a in target["annotations"]])
        iou = box_iou(gt, det["boxes"])
        # Every object is found: a same-class detection overlaps it with IoU > 0.5.
        hit = (iou > 0.5) & (gt_classes[:, None] == det["labels"][None, :])
        assert hit.any(dim=1).all(), (gt, det)


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    model, processor = tiny_model
    model.eval()
    save_detector((model, processor), tmp_path)
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert type(loaded) is SADForObjectDetection
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__ == "SADImageProcessor"
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    # Batch-norm statistics are persistent buffers and must come back too.
    for (name, buf), (_, buf2) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(buf, buf2), name


def test_remote_code_route_loads_without_hf_sad(tiny_model, tmp_path):
    model, processor = tiny_model
    model.eval()
    save_detector((model, processor), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForObjectDetection"] == "modeling_sad.SADForObjectDetection"
    for name in REMOTE_CODE:
        assert (tmp_path / f"{name}.py").exists(), name
        assert not re.search(r"^\s*(from|import)\s+hf_sad", (tmp_path / f"{name}.py").read_text(), re.MULTILINE)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = model(x).logits
    save_file({"x": x, "logits": expected}, str(tmp_path / "io.safetensors"))

    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_sad"] = None  # make `import hf_sad` fail in this process
        import torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModelForObjectDetection
        io = load_file(r"{tmp_path / 'io.safetensors'}")
        model = AutoModelForObjectDetection.from_pretrained(r"{tmp_path}", trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(r"{tmp_path}", trust_remote_code=True)
        assert "hf_sad" not in type(model).__module__, type(model).__module__
        with torch.no_grad():
            logits = model(io["x"]).logits
        assert torch.equal(logits, io["logits"]), (logits - io["logits"]).abs().max()
        print("OK", type(model).__module__, type(processor).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK transformers_modules"), result.stdout


def test_remote_code_files_import_only_safe_packages_and_flat_siblings():
    # These files run with trust_remote_code where hf_sad is not installed: only the libraries a transformers
    # detector already needs, and each other by flat relative imports (what save_pretrained copies).
    allowed = {"torch", "torchvision", "numpy", "PIL", "transformers", "timm"}
    for name in REMOTE_CODE:
        tree = ast.parse((Path(hf_sad.__file__).parent / "model" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = {alias.name.split(".")[0] for alias in node.names}
                assert modules <= allowed | set(sys.stdlib_module_names), (name, modules)
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in REMOTE_CODE, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed | set(sys.stdlib_module_names), (name, node.module)


def test_pipeline_returns_named_detections(tiny_model, tmp_path):
    model, processor = tiny_model
    save_detector((model, processor), tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), threshold=0.0)
    image, _ = squares_scene(0, size=160)
    results = detector(image)
    assert results, "a threshold of 0 must return detections"
    assert len(results) <= processor.max_detections
    for r in results:
        assert r["label"] in LABELS.values()
        box = r["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= 160 and 0 <= box["ymin"] <= box["ymax"] <= 160


def test_pipeline_loads_without_prompt_or_error_log(tiny_model, tmp_path):
    # transformers' pipeline checks a static table of class names and looks for a video processor, which it would
    # derive from the image processor's auto_map as remote code: a "not supported" error and a custom-code prompt.
    model, processor = tiny_model
    save_detector((model, processor), tmp_path)
    script = f"import hf_sad; from transformers import pipeline; pipeline('object-detection', model=r'{tmp_path}')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "custom code" not in output and "not supported" not in output, output[-3000:]


TINY_CLIP = {"embed_dim": 32, "depth": 3, "num_heads": 2}  # timm's features_only ViT takes its last 3 blocks


@pytest.mark.parametrize(
    ("backbone", "kwargs", "stride"),
    [("resnet18", {}, 32), ("vit_tiny_patch16_224", {"backbone_kwargs": {"dynamic_img_size": True}}, 16)],
)
def test_the_processor_pads_to_what_the_network_needs(backbone, kwargs, stride):
    """Padding is to the backbone's coarsest stride, not to P7's 128: a 416x416 image for a 192-px model is a
    192x192 input (256x256 with the old multiple of 128: 1.78x the pixels)."""
    model, processor = tiny_detector(backbone=backbone, id2label=LABELS, image_size=192, **kwargs)
    assert processor.pad_size_divisor == stride
    inputs = processor(images=[Image.new("RGB", (416, 416)), Image.new("RGB", (300, 200))], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 192, 288)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[1] == len(out.anchors) and torch.isfinite(out.pred_boxes).all()


@pytest.mark.parametrize(
    "backbone,kwargs",
    [
        ("resnet18", {}),
        ("convnext_atto", {}),
        ("efficientnet_b0", {}),
        ("mobilenetv3_small_050", {}),
        ("vit_tiny_patch16_224", {"backbone_kwargs": {"dynamic_img_size": True}}),
        # A CLIP image tower (timm's *_clip_* ViTs) at a tiny width and depth, with the simple feature pyramid.
        ("vit_base_patch16_clip_224", {"backbone_kwargs": {"dynamic_img_size": True, **TINY_CLIP}}),
    ],
)
def test_backbone_families_train_and_round_trip(backbone, kwargs, tmp_path):
    model, _processor = tiny_detector(backbone=backbone, id2label=LABELS, **kwargs)
    labels = make_labels([(0, 0.5, 0.5, 0.4, 0.3)], [])
    out = model(torch.randn(2, 3, 128, 128), labels=labels)
    assert out.spatial_shapes.tolist() == [[16, 16], [8, 8], [4, 4], [2, 2], [1, 1]]
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "every parameter gets a finite gradient"

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    expected, restored = model.state_dict(), loaded.state_dict()
    assert expected.keys() == restored.keys()
    assert all(torch.equal(expected[k], restored[k]) for k in expected), "weights and buffers restored bit-exactly"
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        # Not torch.equal: safetensors tensors are memory-mapped, and for some layers (EfficientNet's depthwise convs)
        # oneDNN picks another kernel for a non-64-byte-aligned weight, which rounds differently (~1e-7).
        torch.testing.assert_close(model(x).logits, loaded(x).logits, rtol=0, atol=1e-5)
