"""Megatron-core backend: parallel groups, CPU compatibility layer, context-parallel core attention."""
