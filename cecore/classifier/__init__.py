"""scikit-learn's estimator API on top of cecore's fused loss-and-gradient kernels."""

from ._estimator import SoftmaxClassifier

__all__ = ["SoftmaxClassifier"]
