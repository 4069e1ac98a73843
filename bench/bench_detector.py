"""B1 (supervised training step) and B3 (inference with post-processing): ours against the network's own compute
(the limit) and against torchvision's RetinaNet.

The network's own compute is the backbone, pyramid and heads alone (`network_outputs`): for training their forward,
the backward of fixed random gradients of the head outputs, and the same SGD step; for inference their forward. The
ratio to it is everything our detector adds: anchors, box decoding, matching, losses, post-processing.

torchvision's detector has the same backbone, pyramid, heads and anchors and starts from a copy of our weights
(`common.build_reference`), so the network compute is the same and that ratio compares what each library adds. Each
benchmark also times that part alone (on fixed head outputs) as a breakdown.
"""

from __future__ import annotations

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
from torchvision.models.detection.image_list import ImageList

from hf_sad.model.detection_loss import detection_loss

LR = 0.01


def _sizes(scale: Scale, model, pixel_values: torch.Tensor) -> dict:
    with torch.no_grad():
        out = model.eval()(pixel_values[:1])
    return {
        "backbone": scale.backbone,
        "fpn_channels": scale.channels,
        "head_channels": scale.channels,
        "head_num_convs": scale.num_convs,
        "image_size": scale.image_size,
        "batch_size": scale.batch_size,
        "num_classes": scale.num_classes,
        "num_anchors": int(out.anchors.shape[0]),
        "parameters": num_parameters(model),
    }


def _split_like_torchvision(ref, features, head_outputs, anchors):
    """The per-level split `RetinaNet.forward` does before `postprocess_detections`."""
    per_level = [f.size(2) * f.size(3) for f in features]
    num_anchors = head_outputs["cls_logits"].size(1) // sum(per_level)
    per_level = [hw * num_anchors for hw in per_level]
    split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    return split_outputs, split_anchors


def network_outputs(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network alone: backbone, pyramid and heads, (class logits, box regression), nothing else."""
    pyramid = model.pyramid(model.backbone(pixel_values))
    return model.class_head(pyramid), model.box_head(pyramid)


def bench_train_step(scale: Scale) -> dict:
    """B1: forward + backward + SGD step on the same batch, ours, the network alone and torchvision's; plus anchors +
    matching + loss fwd/bwd alone."""
    model, processor = build_student(scale)
    pixel_values, pixel_mask, labels, targets = scene_batch(scale, processor)
    sizes = _sizes(scale, model, pixel_values)
    sizes["boxes_per_image"] = [len(t["boxes"]) for t in targets]
    ref = build_reference(model, scale)
    if num_parameters(ref) != num_parameters(model):
        raise RuntimeError(f"reference has {num_parameters(ref)} parameters, ours {num_parameters(model)}")
    model.train()
    ref.train()
    opt_ours = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9)
    images = list(pixel_values)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        grads = [torch.randn(o.shape, generator=generator) * 1e-4 for o in network_outputs(model, pixel_values)]

    def ours():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        out.loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def network():
        torch.autograd.backward(list(network_outputs(model, pixel_values)), grads)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def reference():
        losses = ref(images, targets)
        sum(losses.values()).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    times = interleaved_times({"ours": ours, "network": network, "reference": reference}, scale.repeats,
                              scale.warmup)
    row = {"sizes": sizes, "repeats": scale.repeats, "warmup": scale.warmup, "times": times,
           "network": ratio_row(times, "ours", "network")}
    row.update(ratio_row(times, "ours", "reference"))

    # Breakdown: what each does besides the network, on fixed head outputs (anchors, matching, losses, backward).
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        features = list(ref.backbone(pixel_values).values())
    logits = out.logits.detach().requires_grad_()
    box_regression = out.box_regression.detach().requires_grad_()
    spatial_shapes = [tuple(s) for s in out.spatial_shapes.tolist()]
    image_sizes = out.image_sizes
    image_list = ImageList(pixel_values, [tuple(pixel_values.shape[-2:])] * len(images))
    shapes_only = [torch.empty(f.shape[:2] + f.shape[2:]) for f in features]

    def ours_loss():
        anchors = model.anchors_for(spatial_shapes, pixel_values.device)
        loss, _, _ = detection_loss(logits, box_regression, anchors, labels, image_sizes, model.config)
        loss.backward()
        logits.grad = box_regression.grad = None

    def reference_loss():
        anchors = ref.anchor_generator(image_list, shapes_only)
        losses = ref.compute_loss(targets, {"cls_logits": logits, "bbox_regression": box_regression}, anchors)
        sum(losses.values()).backward()
        logits.grad = box_regression.grad = None

    row["breakdown"] = _breakdown(
        "anchors + matching + focal/box loss, forward + backward, on fixed head outputs", "step",
        ours_loss, reference_loss, times, scale,
    )
    return row


def _breakdown(what: str, whole: str, ours, reference, whole_times: dict, scale: Scale) -> dict:
    """Time one part of both sides (`ours`, `reference`) and its share of the `whole_times` measured before."""
    reps = max(scale.repeats, 10)
    times = interleaved_times({"ours": ours, "reference": reference}, reps, 2)
    return {
        "what": what,
        "repeats": reps,
        "times": times,
        **ratio_row(times, "ours", "reference"),
        **{f"share_of_{whole}_{side}": times[side]["time_s"] / whole_times[side]["time_s"]
           for side in ("ours", "reference")},
    }


def bench_inference(scale: Scale) -> dict:
    """B3: eval-mode forward + post-processing (score > 0.05, top-k 1000, NMS 0.5, 100 detections, boxes in pixels),
    ours, the network alone and torchvision's."""
    model, processor = build_student(scale)
    pixel_values, pixel_mask, _, _ = scene_batch(scale, processor, seed=1)
    # Fresh heads predict the 0.01 prior everywhere (nothing above 0.05): spread the scores so that ~2000 (anchor,
    # class) candidates per image pass the threshold, as for a trained detector, before copying the weights.
    fraction = calibrate_scores(model, pixel_values, threshold=0.05, per_image=2000)
    sizes = _sizes(scale, model, pixel_values)
    sizes["score_fraction_above_0.05"] = fraction
    ref = build_reference(model, scale)
    model.eval()
    ref.eval()
    images = list(pixel_values)
    target_sizes = [tuple(pixel_values.shape[-2:])] * len(images)
    last = {}

    def ours():
        with torch.no_grad():
            out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            last["ours"] = processor.post_process_object_detection(out, threshold=0.05, target_sizes=target_sizes)

    def reference():
        with torch.no_grad():
            last["reference"] = ref(images)

    def network():
        with torch.no_grad():
            network_outputs(model, pixel_values)

    times = interleaved_times({"ours": ours, "network": network, "reference": reference}, scale.repeats,
                              scale.warmup)
    row = {"sizes": sizes, "repeats": scale.repeats, "warmup": scale.warmup, "times": times,
           "network": ratio_row(times, "ours", "network")}
    row.update(ratio_row(times, "ours", "reference"))
    row["detections_per_image"] = {k: [len(d["scores"]) for d in v] for k, v in last.items()}

    # Breakdown: post-processing alone, on fixed outputs.
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        image_list, _ = ref.transform(images)
        features = list(ref.backbone(image_list.tensors).values())
        head_outputs = ref.head(features)
        anchors = ref.anchor_generator(image_list, features)
        split_outputs, split_anchors = _split_like_torchvision(ref, features, head_outputs, anchors)

    def ours_post():
        return processor.post_process_object_detection(out, threshold=0.05, target_sizes=target_sizes)

    def reference_post():
        detections = ref.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
        return ref.transform.postprocess(detections, image_list.image_sizes, target_sizes)

    row["breakdown"] = _breakdown(
        "post-processing alone (scores, top-k, decode, NMS, rescale) on fixed outputs", "inference",
        ours_post, reference_post, times, scale,
    )
    return row
