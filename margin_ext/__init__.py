"""margin_ext: fused, sharded margin-softmax heads for millions of classes."""

from .backends import BackendUnavailable
from .functional import margin_cross_entropy
from .monitoring import best_class, iter_cosines, top1_accuracy
from .margins import (
    SPECS,
    ArcFace,
    CombinedMargin,
    CosFace,
    ElasticArcFace,
    ElasticCosFace,
    InterFace,
    IntraLoss,
    MarginSpec,
    SphereFace,
    sphereface_lambda,
)

__version__ = "0.1.0"

__all__ = [
    "ArcFace",
    "BackendUnavailable",
    "CombinedMargin",
    "CosFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "InterFace",
    "IntraLoss",
    "MarginSpec",
    "SPECS",
    "SphereFace",
    "best_class",
    "iter_cosines",
    "margin_cross_entropy",
    "sphereface_lambda",
    "top1_accuracy",
]
