"""margin_ext: fused, sharded margin-softmax heads for millions of classes."""

from .backends import BackendUnavailable
from .checkpoint import CheckpointError, load_head, save_head
from .functional import margin_cross_entropy
from .monitoring import best_class, iter_cosines, top1_accuracy
from .partial_fc import PartialFC
from .row_sparse import RowSparseAdamW, RowSparseSGD
from .running_stats import RunningStatistics
from .subcenters import SubCenterDrop, subcenter_drop
from .margins import (
    SPECS,
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    InterFace,
    IntraLoss,
    MagFace,
    MarginSpec,
    SphereFace,
    SubCenterArcFace,
    sphereface_lambda,
)

__version__ = "0.1.0"

__all__ = [
    "AdaFace",
    "ArcFace",
    "BackendUnavailable",
    "CheckpointError",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "InterFace",
    "IntraLoss",
    "MagFace",
    "MarginSpec",
    "PartialFC",
    "RowSparseAdamW",
    "RowSparseSGD",
    "RunningStatistics",
    "SPECS",
    "SphereFace",
    "SubCenterArcFace",
    "SubCenterDrop",
    "best_class",
    "iter_cosines",
    "load_head",
    "margin_cross_entropy",
    "save_head",
    "sphereface_lambda",
    "subcenter_drop",
    "top1_accuracy",
]
