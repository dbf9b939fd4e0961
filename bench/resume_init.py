"""What a resume pays before its checkpoint load: the initial values every rank fills its shard with.

A resumed stage used to build its model from the random initialisation (RandomInit), which its checkpoint
then overwrote in full; it is now built from zeros (ZeroInit, train/trainer.py). This measures, for one
rank's tensor-parallel shard of a published model, the time to produce every parameter's initial values
from each source, one thread. The shard is a TP=8 piece: dim 0 of column-parallel weights, dim 1 of
row-parallel ones (attention output, MLP down, ViT proj / fc2), norms whole. RandomInit generates whole
dim-0 row blocks (its values must not depend on the layout), so a row-parallel piece costs the full tensor.

    python bench/resume_init.py [--model qwen3vl_8b] [--tp 8]
"""
from __future__ import annotations

import argparse
import re
import time

import torch

from common import append_section, print_results
from train.config.compose import load_config
from train.models.weight_source import RandomInit, WeightSource, ZeroInit

ROW_PARALLEL = re.compile(r"(o_proj|down_proj|attn\.proj|fc2)\.weight$")


def shard_index(name: str, shape: tuple[int, ...], tp: int) -> tuple[slice, ...] | None:
    """This rank's (rank 0's) TP piece of tensor `name`; None (whole) for vectors."""
    if len(shape) < 2:
        return None
    dim = 1 if ROW_PARALLEL.search(name) else 0
    index = [slice(None)] * len(shape)
    index[dim] = slice(0, shape[dim] // tp)
    return tuple(index)


def fill_seconds(source: WeightSource, tp: int) -> tuple[float, int]:
    """Seconds to read every parameter's shard from `source`, and the elements read."""
    start, elements = time.perf_counter(), 0
    for name in sorted(source.names()):
        elements += source.read(name, shard_index(name, source.shape(name), tp)).numel()
    return time.perf_counter() - start, elements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3vl_8b")
    parser.add_argument("--tp", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config([f"model={args.model}"]).model
    random_s, elements = fill_seconds(RandomInit(cfg, seed=1234), args.tp)
    zero_s, zero_elements = fill_seconds(ZeroInit(cfg), args.tp)
    assert zero_elements == elements
    tag = f"{args.model}_tp{args.tp}"
    figures = {f"resume_init_random_s_{tag}": random_s, f"resume_init_zero_s_{tag}": zero_s,
               f"resume_init_random_over_zero_{tag}": random_s / zero_s}
    print_results(figures)
    append_section(f"Resume initial values (bench/resume_init.py --model {args.model} --tp {args.tp})", [
        *(f"- {k}: {v:.4g}" for k, v in figures.items()), "",
        f"One rank's TP={args.tp} shard ({elements / 1e9:.2f} G elements, fp32), one thread: the random "
        f"initialisation a resumed stage used to build before its checkpoint overwrote it, against the zeros "
        f"it builds from now (baseline and change in the same run)."])


if __name__ == "__main__":
    main()
