"""hf-sad: small, fast object detectors by Semi-supervised Adaptive Distillation (SAD).

`import hf_sad` registers the detector with transformers' auto classes, so `AutoModelForObjectDetection`,
`AutoImageProcessor` and `pipeline("object-detection")` load saved students without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, AutoVideoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

from .builder import create_detector
from .configuration_sad import SADConfig
from .image_processing_sad import SADImageProcessor
from .modeling_sad import SADForObjectDetection, SADObjectDetectionOutput

__version__ = "0.1.0"

# Route (a): local registration, used whenever hf_sad is importable.
AutoConfig.register(SADConfig.model_type, SADConfig, exist_ok=True)
AutoModelForObjectDetection.register(SADConfig, SADForObjectDetection, exist_ok=True)
AutoImageProcessor.register(SADConfig, image_processor_classes={"torchvision": SADImageProcessor}, exist_ok=True)
# `pipeline("object-detection")` checks the model's class name against this static table, not the registry above,
# and would log "not supported for object-detection" for every SAD model.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(SADConfig.model_type, SADForObjectDetection.__name__)
# The pipeline also looks for a video processor. Without a local entry, transformers derives a remote one from the
# image processor's auto_map (route b) and asks whether to run custom code; SAD models have no video processor.
AutoVideoProcessor.register(SADConfig, video_processor_classes={}, exist_ok=True)

# Route (b): save_pretrained copies the flat modeling/config/processor files next to the weights and writes
# `auto_map`, so a saved student also loads with trust_remote_code=True where hf_sad is not installed.
SADConfig.register_for_auto_class()
SADForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
SADImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "SADConfig",
    "SADForObjectDetection",
    "SADImageProcessor",
    "SADObjectDetectionOutput",
    "create_detector",
]
