"""Re-ranking retrieved candidates: LPIPS (``lpips_match.py``) or NCC after rigid alignment (``ncc.py``),
plus the support-set augmentation the bank applies (``augment.py``).

Import the module you need; this package imports nothing heavy on its own.
"""
