"""Few-shot medical image segmentation: retrieve labelled slices, match them, transfer their masks.

The engine has no MONAI Label imports; ``apps/fewshot`` wraps it for MONAI Label.
"""
__version__ = "0.1.0"
