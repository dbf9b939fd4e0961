"""Parallelism over the packed sequence and the experts, shared by the DeepSpeed and Megatron-core backends:
context-parallel split of a PackedBatch after the vision merge (context.py), Ulysses all-to-all attention
(ulysses.py) and expert-parallel stacked experts with all-to-all token dispatch (expert.py)."""
