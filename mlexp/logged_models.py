"""The module path of the classifier class in models logged before mlexp 0.2.

A logged model's code file is copied into the model when it is logged; the one written by
mlexp 0.1 imports `mlexp.logged_models.ImageClassifier`, so that path stays importable.
The code lives in `mlexp.training.logged_models`.
"""

from mlexp.training.logged_models import ImageClassifier

__all__ = ["ImageClassifier"]
