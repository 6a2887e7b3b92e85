"""mlexp: tracked image-classification experiments on MLflow, Accelerate and timm."""

__version__ = "0.1.0"
