"""Slice -> vector for retrieval: DINOv2 (``dinov2.py``) or the weights-free descriptor (``descriptor.py``).

Import the module you need; this package imports nothing heavy on its own.
"""
