"""Sample-quality metrics: domain feature net, FID, k-NN precision/recall, class coverage.

Inception-v3 weights cannot be downloaded in this setting, so FID and precision/recall are
computed in the embedding of a small classifier trained on the member split
(:class:`FeatureNet`); Inception FID is optional (:func:`compute_inception_fid`).
"""

from securefed.metrics.classifier import (
    FeatureNet,
    classification_accuracy,
    load_or_train_feature_net,
    train_feature_net,
)
from securefed.metrics.evaluator import QualityReport, SampleEvaluator
from securefed.metrics.fid import compute_fid, compute_inception_fid, frechet_distance
from securefed.metrics.precision_recall import class_coverage, knn_precision_recall

__all__ = [
    "FeatureNet",
    "QualityReport",
    "SampleEvaluator",
    "class_coverage",
    "classification_accuracy",
    "compute_fid",
    "compute_inception_fid",
    "frechet_distance",
    "knn_precision_recall",
    "load_or_train_feature_net",
    "train_feature_net",
]
