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


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        form: str = "pooled", num_layers: int | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, E * sum_e (top-k assignments to e / rows) * (mean router
    probability of e), unscaled (the trainer multiplies by router_aux_loss_coef). Two forms:
      "pooled"     transformers' load_balancing_loss_func: all layers' rows pooled into one loss.
      "per_layer"  megatron-core's: one loss per layer over that layer's rows only, here summed over the
                   given layers and divided by `num_layers` (the model's MoE layer count; default: the
                   given layers), so a pipeline stage's value is its share of the mean over layers and the
                   stages' shares add up to it. With balanced routing both forms equal top_k.
    """
    if form == "per_layer":
        total = sum(_switch_loss([logits], num_experts, top_k) for logits in router_logits)
        return total / (num_layers or len(router_logits))
    if form != "pooled":
        raise ValueError(f"load-balancing loss form {form!r} is not 'pooled' or 'per_layer'")
    return _switch_loss(router_logits, num_experts, top_k)


def _switch_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
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


def moe_layer_count(cfg: TextConfig) -> int:
    """MoE layers of the model (the per-layer loss's divisor)."""
    return sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


class _AddLossGradient(torch.autograd.Function):
    """Identity on `hidden`; backward also gives `loss` the gradient 1, as if `loss` were added to the
    objective. Lets a pipeline stage that never sees the objective contribute a loss term (its own MoE
    layers' load-balancing share) through the activations it sends on."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(loss)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (loss,) = ctx.saved_tensors
        return grad, torch.ones_like(loss)


def attach_loss(hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """`hidden`, with `loss` added to whatever objective its backward comes from (gradient 1)."""
    return _AddLossGradient.apply(hidden, loss)
