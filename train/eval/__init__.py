"""Evaluations of trained checkpoints: `python -m train.eval vniah ...` (video needle in a haystack)."""
