"""tsjax: teacher-student defect detection for SEM wafer image pairs.

The package layout follows the pipeline: ``io`` (load), ``align``,
``teacher``, ``students``, ``score``, ``postprocess``, tied together by
``pipeline.detect`` with the settings in ``config.DetectionConfig``.
"""

from tsjax.align import Alignment, align_pair
from tsjax.config import DetectionConfig
from tsjax.hub import resolve_teacher
from tsjax.io import ImageError, load_image
from tsjax.pipeline import Detection, detect
from tsjax.students import STUDENTS, Student, make_student
from tsjax.teacher import ResNet18, load_pretrained

__all__ = [
    "Alignment",
    "align_pair",
    "DetectionConfig",
    "resolve_teacher",
    "ImageError",
    "load_image",
    "Detection",
    "detect",
    "STUDENTS",
    "Student",
    "make_student",
    "ResNet18",
    "load_pretrained",
]
