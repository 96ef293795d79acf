"""Re-ranking retrieved candidates: LPIPS (``lpips_match.py``) or NCC after rigid alignment (``ncc.py``).
The augmented copies the matcher compares against are the bank's (``fewshot/bank_augment.py``).

Import the module you need; this package imports nothing heavy on its own.
"""
