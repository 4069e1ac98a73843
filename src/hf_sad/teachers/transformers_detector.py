"""Any transformers object detector as a SAD teacher: DETR-family set predictors and OWL-ViT / OWLv2.

Such a teacher predicts a set of boxes with class scores instead of logits on the student's anchors, so
`TransformersDetectorTeacher` turns its boxes into what `sad_loss` needs from a teacher: dense soft targets on the
student's anchors (ADL, KL, ... then run unchanged), and per anchor a box, from which the pseudo-boxes and the ignore
band follow as with an hf-sad teacher.

The rule, per image, with p_b(c) the teacher's probability of student class c for its box b:

    q(a, c) = max_b p_b(c) * ramp(a, b),  ramp(a, b) = clamp((IoU(a, b) - bg) / (fg - bg), 0, 1)

with fg / bg the student's `fg_iou_threshold` / `bg_iou_threshold` (0.5 / 0.4), and ramp = 1 also for each box's
best-overlapping anchors when their IoU is above the student's `low_quality_match_min_iou` (the low-quality matches
its own matching keeps): an anchor that the student's matching would make a positive of box b gets b's class
probabilities, one it would make a negative gets nothing from b, and the ignore band in between a linear share.
Entries no box reaches get the probability `background_probability` (the logit of exactly 0 would be -inf). Each
anchor also gets the box b that gives its largest q, as box deltas on the anchor (no box: zero deltas), so that the
teacher's box regression has a target too. The pseudo-boxes and the ignore band come from the teacher's own boxes
(`TeacherOutput.detections`: its set of boxes through the student's post-processing, so the threshold,
NMS and detection count settings are the student processor's), not from the dense targets, where an anchor between
two boxes would pair one box with the other's class.

Probabilities: sigmoid of the logits for sigmoid detectors (Deformable DETR, RT-DETR, D-FINE, OWL-ViT, ...); softmax
without the last, "no object", class for softmax detectors (DETR, YOLOS, ...), recognised by a logit per class plus
one. Classes map by name (`label_map` renames student classes to the teacher's); OWL-ViT / OWLv2 are queried with the
(renamed) student class names as text.

The teacher sees the student's augmented image (its valid region, unnormalised) through its own image processor, so
its own input size and normalisation apply; box coordinates come back to the student's pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.ops import box_convert, box_iou
from transformers import (
    AutoConfig,
    AutoModelForObjectDetection,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from ..model.box_ops import encode_boxes
from ..model.configuration_sad import SADConfig
from ..model.image_processing_sad import SADImageProcessor
from ..model.modeling_sad import SADForObjectDetection, detection_outputs
from .base import Teacher, TeacherOutput, normalization_affine

__all__ = [
    "OPEN_VOCABULARY_TYPES",
    "TransformersDetectorTeacher",
    "is_sad_source",
    "load_transformers_teacher",
    "teacher_probabilities",
]

#: Model types queried with the student's class names as text.
OPEN_VOCABULARY_TYPES = ("owlvit", "owlv2")
#: Model types whose boxes are normalised by the side of the square the image is padded to.
_SQUARE_PADDED_TYPES = ("owlv2",)


def is_sad_source(teacher) -> bool:
    """Whether `teacher` (a model, or a path / Hub id) is an hf-sad detector, or something `load_detector` should
    explain; False only for transformers detectors of other kinds."""
    if isinstance(teacher, str):
        if Path(teacher).is_file():
            return True
        try:
            return AutoConfig.from_pretrained(teacher).model_type == SADConfig.model_type
        except (OSError, ValueError):
            return True
    # Any other module with a config (a transformers detector, or one shaped like it) goes through the adapter.
    return isinstance(teacher, SADForObjectDetection) or not (isinstance(teacher, nn.Module) and hasattr(
        teacher, "config"))


def load_transformers_teacher(source: str | Path):
    """A transformers detector saved at `source` (folder or Hub id): `AutoModelForZeroShotObjectDetection` for
    OWL-ViT / OWLv2, else `AutoModelForObjectDetection`."""
    config = AutoConfig.from_pretrained(source)
    auto = AutoModelForZeroShotObjectDetection if config.model_type in OPEN_VOCABULARY_TYPES else (
        AutoModelForObjectDetection
    )
    return auto.from_pretrained(source)


def default_processor(model: nn.Module, processor=None):
    """The teacher's processor: `processor` when given, else the one saved with the model, else (image processors
    only) its model type's default."""
    if processor is not None:
        return processor
    source = getattr(model, "name_or_path", "")
    if source:
        try:
            return AutoProcessor.from_pretrained(source)
        except (OSError, ValueError):
            pass
    model_type = model.config.model_type
    if model_type in OPEN_VOCABULARY_TYPES:
        raise ValueError(
            f"The {model_type} teacher has no saved processor (it needs a tokenizer for the class-name queries): pass "
            "teacher_processor, e.g. AutoProcessor.from_pretrained of its checkpoint."
        )
    # transformers' table of image processor class names per model type: a name, a (slow, fast) pair, or by backend.
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(names, dict):
        names = [names.get("torchvision"), *names.values()]
    elif isinstance(names, str):
        names = [names]
    for name in names or ():
        image_processor = get_image_processor_class_from_name(name) if name else None
        if image_processor is not None:
            return image_processor()
    raise ValueError(f"No default image processor is known for a {model_type} teacher: pass teacher_processor.")


def teacher_probabilities(logits: torch.Tensor, num_labels: int, open_vocabulary: bool) -> torch.Tensor:
    """(B, Q, K) teacher logits -> (B, Q, num_labels) float32 class probabilities: softmax without the last column
    when there is one logit per class plus "no object" (and not open-vocabulary), else sigmoid."""
    logits = logits.float()
    if not open_vocabulary and logits.shape[-1] == num_labels + 1:
        return logits.softmax(-1)[..., :-1]
    return torch.sigmoid(logits)


class TransformersDetectorTeacher(Teacher):
    """
    A transformers detector as a teacher on the student's anchors (see the module docstring for the rule).

    Args:
        model: the detector (`AutoModelForObjectDetection` or, for OWL-ViT / OWLv2,
            `AutoModelForZeroShotObjectDetection`); frozen here.
        processor: its image processor (a processor with a tokenizer for OWL-ViT / OWLv2); default: see
            `default_processor`.
        student_config: the student's `SADConfig`: its classes, and its matching thresholds (the ramp's ends).
        student_processor: the student's image processor (to undo its normalisation).
        label_map: student class name -> teacher class name (or text query), for renamed classes.
        background_probability: the target of entries no teacher box reaches.
        source: where it comes from (default: the folder or Hub id it was loaded from).
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        student_config: SADConfig,
        student_processor: SADImageProcessor,
        label_map: Mapping[str, str] | None = None,
        background_probability: float = 1e-4,
        source: str | None = None,
    ):
        super().__init__(source if source is not None else model.name_or_path,
                         getattr(model.config, "backbone", None) or model.config.model_type)
        self.model = model.requires_grad_(False).eval()
        self.processor = default_processor(model, processor)
        self.student_processor = student_processor
        self.model_type = model.config.model_type
        self.open_vocabulary = self.model_type in OPEN_VOCABULARY_TYPES
        self.student_config = student_config
        self.fg, self.bg = student_config.fg_iou_threshold, student_config.bg_iou_threshold
        self.low_quality_min_iou = student_config.low_quality_match_min_iou
        if not 0 < background_probability < 0.5:
            raise ValueError(f"background_probability must be in (0, 0.5), got {background_probability}.")
        self.background_probability = background_probability
        label_map = dict(label_map or {})
        student = [student_config.id2label[i] for i in range(student_config.num_labels)]
        unknown = sorted(set(label_map) - set(student))
        if unknown:
            raise ValueError(f"teacher_label_map renames {unknown}, which are not student classes {student}.")
        self.queries = [label_map.get(name, name) for name in student]
        if self.open_vocabulary:
            self.class_index = None  # query i is student class i
        else:
            by_name = {name: int(i) for i, name in model.config.id2label.items()}
            missing = [f"{name!r}" + (f" (as {query!r})" if query != name else "")
                       for name, query in zip(student, self.queries) if query not in by_name]
            if missing:
                raise ValueError(
                    f"Student classes {', '.join(missing)} are not classes of the teacher "
                    f"({type(model).__name__}, classes {sorted(by_name)}): map them with teacher_label_map "
                    "(student name -> teacher name)."
                )
            self.register_buffer("class_index", torch.tensor([by_name[q] for q in self.queries]), persistent=False)

    def teacher_boxes(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's boxes on a student batch: (B, Q, 4) absolute xyxy in the student's input pixels, and their
        (B, Q, C) probabilities of the student's classes (float32)."""
        images = self._student_images(pixel_values, image_sizes)
        if self.open_vocabulary:
            inputs = self.processor(text=[self.queries] * len(images), images=images, do_rescale=False,
                                    return_tensors="pt", padding="max_length", truncation=True)
        else:
            inputs = self.processor(images=images, do_rescale=False, return_tensors="pt")
        device = pixel_values.device
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
                  for k, v in inputs.items()}
        outputs = self.model(**inputs)
        probabilities = teacher_probabilities(outputs.logits, self.model.config.num_labels, self.open_vocabulary)
        if self.class_index is not None:
            probabilities = probabilities[..., self.class_index]
        heights, widths = image_sizes[:, 0].float(), image_sizes[:, 1].float()
        if self.model_type in _SQUARE_PADDED_TYPES:
            heights = widths = torch.maximum(heights, widths)
        scale = torch.stack([widths, heights, widths, heights], -1)[:, None, :]
        boxes = box_convert(outputs.pred_boxes.float(), "cxcywh", "xyxy") * scale
        return boxes, probabilities

    def _student_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's valid region with the student's normalisation undone: (3, h, w) float in [0, 1]."""
        a, b = (v.to(pixel_values.device, torch.float32)[:, None, None]
                for v in normalization_affine(self.student_processor))
        images = (pixel_values.float() - b) / (a * 255.0)
        return [image[:, : int(h), : int(w)].clamp(0, 1).cpu() for image, (h, w) in zip(images, image_sizes.tolist())]

    def dense_targets(
        self, boxes: torch.Tensor, probabilities: torch.Tensor, anchors: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) logits of q(a, c) and (B, N, 4) box deltas of each anchor's dominant teacher box (zero where no
        box reaches), from (B, Q, 4) xyxy boxes, (B, Q, C) probabilities and (N, 4) xyxy anchors."""
        batch, num_classes, num_anchors = boxes.shape[0], probabilities.shape[-1], anchors.shape[0]
        floor = self.background_probability
        logits = boxes.new_full((batch, num_anchors, num_classes), float(torch.logit(torch.tensor(floor))))
        deltas = boxes.new_zeros((batch, num_anchors, 4))
        for i in range(batch):
            iou = box_iou(boxes[i], anchors)  # (Q, N)
            ramp = ((iou - self.bg) / (self.fg - self.bg)).clamp(0, 1)
            best = iou.amax(1, keepdim=True)
            ramp = torch.where((iou == best) & (best > max(self.low_quality_min_iou, 0.0)), 1.0, ramp)
            box_index, anchor_index = ramp.nonzero(as_tuple=True)
            if box_index.numel() == 0:
                continue
            values = ramp[box_index, anchor_index, None] * probabilities[i, box_index]  # (K, C)
            q = torch.zeros(num_anchors, num_classes, device=boxes.device).scatter_reduce_(
                0, anchor_index[:, None].expand(-1, num_classes), values, "amax"
            )
            # The dominant box of each reached anchor: the largest ramp x best class probability (the anchor's largest
            # q); where every box reaching it has probability 0, the one with the largest ramp.
            strength = ramp * probabilities[i].amax(-1, keepdim=True)  # (Q, N)
            reached = (ramp > 0).any(0)
            dominant = torch.where(strength.amax(0) > 0, strength.argmax(0), ramp.argmax(0))
            deltas[i, reached] = encode_boxes(boxes[i, dominant[reached]], anchors[reached])
            logits[i] = torch.logit(q.clamp(floor, 1 - floor))
        return logits, deltas

    # Its forward runs its image processor in Python: left eager under --torch_compile.
    compilable = False

    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        *,
        anchors: torch.Tensor,
        image_sizes: torch.Tensor,
    ) -> TeacherOutput:
        """A teacher output on the student's `anchors` ((N, 4) xyxy absolute) for images whose valid regions are
        `image_sizes` ((B, 2) height, width): `logits`, `box_regression`, `pred_boxes` as an hf-sad detector gives
        them, its own boxes as `detection_logits` / `detection_boxes`, and with `labels` the student's supervised loss
        of these targets (for evaluation). `pixel_mask` is accepted for a detector's signature; the valid regions are
        `image_sizes`."""
        boxes, probabilities = self.teacher_boxes(pixel_values, image_sizes)
        logits, deltas = self.dense_targets(boxes, probabilities, anchors.float())
        floor = self.background_probability
        scale = image_sizes.float().flip(-1).repeat(1, 2)[:, None, :]
        return detection_outputs(
            logits, deltas, anchors, image_sizes, self.student_config, labels, output_class=TeacherOutput,
            detection_logits=torch.logit(probabilities.clamp(floor, 1 - floor)),
            detection_boxes=box_convert(boxes, "xyxy", "cxcywh") / scale,
        )
