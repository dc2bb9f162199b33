"""Image-generation metrics: FID/KID and precision/recall (our FID Inception), CLIP-FD/CLIP-KID and CLIP score (our
CLIP); the COCO zero-shot protocol (coco.py, coco_eval.py, resize.py)."""

from dalle2.metrics.clip_score import ClipScorer, clip_score
from dalle2.metrics.fid import OrderedKID, PrecomputedFeatures, frechet_distance, kernel_distance, make_fid
from dalle2.metrics.inception import FIDInceptionV3, InceptionWeightsError, load_fid_inception
from dalle2.metrics.precision_recall import precision_recall

__all__ = [
    "ClipScorer",
    "clip_score",
    "OrderedKID",
    "PrecomputedFeatures",
    "frechet_distance",
    "kernel_distance",
    "make_fid",
    "FIDInceptionV3",
    "InceptionWeightsError",
    "load_fid_inception",
    "precision_recall",
]
