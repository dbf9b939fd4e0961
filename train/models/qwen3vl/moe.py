"""Mixture-of-experts MLP of Qwen3-VL-MoE: softmax top-k router, stacked SwiGLU experts, load-balancing loss.

Parameter layout is transformers' (so HF checkpoints load by a prefix change) and keeps dim 0 = expert, which
is all expert parallelism needs to slice:
  gate.weight                [E, H]      router
  experts.gate_up_proj       [E, 2I, H]  rows [:I] are the gate projection, rows [I:] the up projection
                                          (concatenated, not interleaved: HF splits with .chunk(2, dim=-1))
  experts.down_proj          [E, H, I]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config.model import TextConfig
from train.models.qwen3vl.common import activation


class TopKRouter(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (router logits [N, E], top-k weights [N, k], top-k expert ids [N, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_p, top_idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, top_p.to(logits.dtype), top_idx


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked tensors; tokens are grouped per expert and run as one matmul each."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(cfg.num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(cfg.num_experts, hidden, inter))
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, top_idx: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        k = top_idx.shape[1]
        flat_expert = top_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // k  # token index of each sorted (token, slot) assignment
        weight_of = top_w.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start:start + count]
            gate, up = F.linear(x[tokens], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act(gate) * up, self.down_proj[expert])
            out = out.index_add(0, tokens, y * weight_of[start:start + count, None])
            start += count
        return out


class SparseMoeBlock(nn.Module):
    """Router + experts. Returns (output [N, H], router logits [N, E]) so the model can form the aux loss."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(cfg)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, top_w, top_idx = self.gate(x)
        return self.experts(x, top_idx, top_w), logits


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers, the formula of transformers'
    load_balancing_loss_func: the layers' tokens are pooled (not averaged per layer), then
    E * sum_e (top-k assignments to e / rows) * (mean router probability of e). Unscaled: the trainer
    multiplies by router_aux_loss_coef."""
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        # scatter_add instead of bincount: no device-to-host sync on CUDA.
        assigned = assigned.scatter_add(0, selected, torch.ones_like(selected, dtype=torch.float32))
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return num_experts * torch.sum((assigned / rows) * (prob_sum / rows))
