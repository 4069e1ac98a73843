"""hf-sad: small, fast object detectors by Semi-supervised Adaptive Distillation (SAD).

`import hf_sad` registers the detector with transformers' auto classes, so `AutoModelForObjectDetection`,
`AutoImageProcessor` and `pipeline("object-detection")` load saved students without `trust_remote_code`. The training
side (`SADTrainer`, `SADTrainingArguments`, ...) is imported on first use, so that loading a detector stays light.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, AutoVideoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

from .model.builder import create_detector
from .model.configuration_sad import SADConfig
from .model.image_processing_sad import SADImageProcessor
from .model.modeling_sad import SADForObjectDetection, SADObjectDetectionOutput

if TYPE_CHECKING:
    from .arguments import DetectionTrainingArguments, DistillationArguments, SADTrainingArguments
    from .distillation.sad_loss import sad_loss
    from .training.trainer import SADTrainer

__version__ = "0.1.0"

# Route (a): local registration, used whenever hf_sad is importable.
AutoConfig.register(SADConfig.model_type, SADConfig, exist_ok=True)
AutoModelForObjectDetection.register(SADConfig, SADForObjectDetection, exist_ok=True)
AutoImageProcessor.register(SADConfig, image_processor_classes={"torchvision": SADImageProcessor}, exist_ok=True)
# SAD models have no video processor. Without this entry, `pipeline("object-detection")` derives a remote one from
# the image processor's auto_map (route b) and asks whether to run custom code.
AutoVideoProcessor.register(SADConfig, video_processor_classes={}, exist_ok=True)
# The one place hf_sad touches transformers beyond its registration APIs: `pipeline("object-detection")` checks the
# model's class name against this static table, not against the registry above, and logs "not supported for
# object-detection" for every registered model; transformers offers no supported way to add to it.
# tests/test_transformers_example.py::test_pipeline_name_table_shim_is_still_needed fails once transformers no longer
# needs it.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(SADConfig.model_type, SADForObjectDetection.__name__)

# Route (b): save_pretrained copies the flat modeling/config/processor files next to the weights and writes
# `auto_map`, so a saved student also loads with trust_remote_code=True where hf_sad is not installed.
SADConfig.register_for_auto_class()
SADForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
SADImageProcessor.register_for_auto_class("AutoImageProcessor")

# Training-side names, imported when first accessed (PEP 562).
_LAZY = {
    "SADTrainer": "training.trainer",
    "SADTrainingArguments": "arguments",
    "DetectionTrainingArguments": "arguments",
    "DistillationArguments": "arguments",
    "sad_loss": "distillation.sad_loss",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DetectionTrainingArguments",
    "DistillationArguments",
    "SADConfig",
    "SADForObjectDetection",
    "SADImageProcessor",
    "SADObjectDetectionOutput",
    "SADTrainer",
    "SADTrainingArguments",
    "create_detector",
    "sad_loss",
]
