"""Image-generation metrics: FID/KID (our FID Inception), CLIP-FD/CLIP-KID and CLIP score (our CLIP)."""

from dalle2.metrics.clip_score import ClipScorer, clip_score
from dalle2.metrics.fid import OrderedKID, PrecomputedFeatures, frechet_distance, kernel_distance, make_fid
from dalle2.metrics.inception import FIDInceptionV3, InceptionWeightsError, load_fid_inception

__all__ = [
    "ClipScorer", "clip_score", "OrderedKID", "PrecomputedFeatures", "frechet_distance", "kernel_distance",
    "make_fid", "FIDInceptionV3", "InceptionWeightsError", "load_fid_inception",
]  # fmt: skip
