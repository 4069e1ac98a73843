"""Teachers: what a SAD student learns from, behind one interface (`hf_sad.teachers.base.Teacher`), built by
`load_teacher`.

- `base.py`: the interface, its output, a saved hf-sad detector as a teacher (`DetectorTeacher`), and what every kind
  shares (the compatibility check, renormalising pixels).
- `ensemble.py`: several detectors as one teacher (mean / ERA aggregation).
- `ema.py`: the mean teacher (an exponential moving average of the student).
- `transformers_detector.py`: any transformers detector (DETR family, OWL-ViT / OWLv2) on the student's anchors.
- `loading.py`: `load_teacher`, the one place that tells the kinds apart.
"""

from .base import DetectorTeacher, Teacher, TeacherOutput
from .ema import EMA_TEACHER_FILE, EMATeacher
from .ensemble import SADTeacherEnsemble, aggregate_logits, teacher_disagreement
from .loading import load_teacher
from .transformers_detector import TransformersDetectorTeacher

__all__ = [
    "EMA_TEACHER_FILE",
    "DetectorTeacher",
    "EMATeacher",
    "SADTeacherEnsemble",
    "Teacher",
    "TeacherOutput",
    "TransformersDetectorTeacher",
    "aggregate_logits",
    "load_teacher",
    "teacher_disagreement",
]
