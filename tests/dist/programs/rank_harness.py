"""Start and end of every torchrun test program: gloo process group, and an exit that reports failures
from every rank and never lets gloo abort at interpreter exit (see notes/cpu-backends.md)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def start() -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank()


def finish(failures: list[str]) -> None:
    """Print this rank's failures, `ALL OK` on rank 0 when no rank failed, then barrier, destroy, flush,
    os._exit (status 1 when any rank failed)."""
    for failure in failures:
        print(f"[rank {dist.get_rank()}] FAIL {failure}", flush=True)
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    if dist.get_rank() == 0 and not flag.item():
        print("ALL OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if not flag.item() else 1)
