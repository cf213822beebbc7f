"""Offline image metrics for the built-in data: a small classifier's features stand in for Inception's."""

from rayflow.evaluation.classifier import FeatureClassifier, load_or_train_classifier, train_classifier
from rayflow.evaluation.metrics import image_metrics, precision_recall

__all__ = ["FeatureClassifier", "image_metrics", "load_or_train_classifier", "precision_recall", "train_classifier"]
