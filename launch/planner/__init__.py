"""Cluster planner internals: parameter inventory, per-GPU memory, step FLOPs (CLI: launch/plan.py)."""
