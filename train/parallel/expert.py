"""Expert parallelism for the stacked-expert MoE layout (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]).

The EP group's ranks each keep a contiguous slice of dim 0 (E / ep experts). Routing is unchanged (the router
is replicated); each rank sends every (token, expert) assignment to the rank owning the expert with one
variable-size all-to-all, runs its local experts on what it received, and sends the results back with the
inverse all-to-all. Results are combined in the same (expert-sorted) order as the single-process `Experts`,
so both agree to float rounding. Gradients flow back through the same two all-to-alls.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.device import on_group_device
from train.models.qwen3vl.moe import Experts


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    x = on_group_device(x, group)
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """Variable-size all-to-all whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send, recv, group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def expert_slice(num_experts: int, ep_size: int, ep_rank: int) -> slice:
    """The experts (dim 0 rows) owned by `ep_rank`."""
    if num_experts % ep_size:
        raise ValueError(f"model.text.num_experts={num_experts} is not divisible by parallel.ep={ep_size}")
    local = num_experts // ep_size
    return slice(ep_rank * local, (ep_rank + 1) * local)


class ExpertParallelExperts(nn.Module):
    """Drop-in for `Experts` holding only this rank's slice; forward(x, top_idx, top_w) like `Experts`."""

    def __init__(self, full: Experts, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = full.num_experts
        owned = expert_slice(full.num_experts, self.ep_size, self.ep_rank)
        self.first_expert, self.num_local = owned.start, owned.stop - owned.start
        self.gate_up_proj = nn.Parameter(full.gate_up_proj.detach()[owned].clone(),
                                         requires_grad=full.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(full.down_proj.detach()[owned].clone(),
                                      requires_grad=full.down_proj.requires_grad)
        self.act = full.act

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        k = top_idx.shape[1]
        flat_expert = top_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // k
        sorted_expert = flat_expert[order]
        send = on_group_device(torch.bincount(sorted_expert // self.num_local, minlength=self.ep_size), self.group)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        received = _Exchange.apply(x[token_of], send_sizes, recv_sizes, self.group)
        received_expert = _exchange(sorted_expert, send_sizes, recv_sizes, self.group) - self.first_expert
        outputs = self._run_local(received, received_expert)
        returned = _Exchange.apply(outputs, recv_sizes, send_sizes, self.group)
        weight_of = top_w.reshape(-1)[order]
        return torch.zeros_like(x).index_add(0, token_of, returned * weight_of[:, None])

    def _run_local(self, tokens: torch.Tensor, local_expert: torch.Tensor) -> torch.Tensor:
        """Each local expert on its received rows (rows arrive grouped by source rank, then expert)."""
        out = tokens.new_zeros(tokens.shape[0], self.down_proj.shape[1])
        for e in range(self.num_local):
            rows = (local_expert == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gate, up = F.linear(tokens[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            out = out.index_copy(0, rows, F.linear(self.act(gate) * up, self.down_proj[e]))
        return out
