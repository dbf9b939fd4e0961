"""The training loss, shared by every backend: token-weighted cross entropy over the global batch.

    loss = sum_{tokens t of the global batch} w_t * ce_t  /  sum_{tokens t of the global batch} w_t
           + router_aux_loss_coef * mean over forward passes of the MoE load-balancing loss

`w` is PackedBatch.loss_weights, already per-token (1), per-sample (1/N_s) or square-root (1/sqrt(N_s))
weighted by data/; with the denominator global, the three readings of the recipe are one formula and the
value does not depend on how the global batch is cut into ranks and micro-batches.

How a backend uses it, per optimizer step:
1. `global_weight_sum(...)`: ONE all_reduce of a scalar over the data x context parallel group, before any
   forward pass (so every micro-batch's loss is already normalised by the final denominator).
2. per micro-batch, `micro_batch_loss(...)`: objective = grad_scale * (sum(w * ce) / W + coef * aux / n_aux).
   Summed over all micro-batches of all ranks this is exactly the loss above. Backends average gradients
   over data-parallel ranks and micro-batches (DeepSpeed divides by dp_size and by gradient accumulation
   steps); `grad_scale` = that divisor undoes it, so the gradient is the gradient of the global loss.
3. `reduce_step_metrics(...)`: the logged loss, aux loss and per-source losses (one or two small
   all_reduces of detached values; no effect on gradients).

The cross entropy is computed from the final hidden states and the lm_head weight in token chunks, so a
262K-token sequence never holds [L, V] logits: each chunk holds at most `logits_budget` fp32 logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from data.batch import IGNORE_INDEX
from train.device import comm_tensor, comm_zeros, on_group_device

# fp32 logits held at once (per chunk): 2^26 elements = 256 MiB, e.g. 441 tokens x 151936 vocabulary.
DEFAULT_LOGITS_BUDGET = 1 << 26


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_t w_t * CE(hidden_t @ weight.T, label_t) without materialising the full logits.

    The gradients are computed during the forward pass, chunk by chunk (d ce / d logits = softmax - onehot
    is available right there), and stored: grad wrt hidden [L, H] and wrt weight [V, H], the sizes of the
    inputs. The backward pass only multiplies them by the incoming scalar gradient. Returns
    (weighted sum: scalar fp32, per-token ce: [L] fp32, not differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weights, chunk):  # type: ignore[override]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        safe_labels = labels.clamp_min(0)
        weights = torch.where(valid, loss_weights.float(), torch.zeros((), device=hidden.device))
        token_ce = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        for start in range(0, n, chunk):
            rows = slice(start, min(n, start + chunk))
            h = hidden[rows]
            logits = (h @ weight.t()).float()  # [c, V]: the only vocabulary-sized buffer
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[rows, None]).squeeze(1)
            ce = torch.where(valid[rows], lse - target, torch.zeros((), device=hidden.device))
            token_ce[rows] = ce
            total += (weights[rows] * ce).sum()
            if want_grad:
                grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place: no second [c, V] buffer
                grad_logits[torch.arange(grad_logits.shape[0], device=h.device), safe_labels[rows]] -= 1.0
                grad_logits.mul_(weights[rows, None])
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad_logits.t(), h.float())
        ctx.mark_non_differentiable(token_ce)
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total, token_ce

    @staticmethod
    def backward(ctx, grad_total, _grad_token_ce):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale_h = grad_total.to(grad_hidden.dtype)
        scale_w = grad_total.to(grad_weight.dtype)
        return grad_hidden * scale_h, grad_weight * scale_w, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_t w_t * ce_t as a differentiable fp32 scalar, per-token ce [L] detached). Tokens whose label
    is IGNORE_INDEX contribute nothing whatever their weight. hidden [L, H], lm_head_weight [V, H]."""
    if hidden.shape[0] != labels.shape[0] or labels.shape != loss_weights.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)} and loss_weights "
                         f"{tuple(loss_weights.shape)} disagree on the number of tokens")
    chunk = max(1, logits_budget // lm_head_weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, lm_head_weight, labels, loss_weights, chunk)


def supervised_weights(labels: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """loss_weights where a label exists, 0 elsewhere (the same masking the cross entropy applies)."""
    return torch.where(labels != IGNORE_INDEX, loss_weights.double(), torch.zeros((), dtype=torch.float64))


def global_weight_sum(
    shares: Iterable[tuple[torch.Tensor, torch.Tensor]],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """sum(w) over the whole global batch: `shares` are (labels, loss_weights) of the tokens THIS rank's loss
    covers (all its micro-batches; under context parallelism only its part of each sequence), summed in
    fp64, then one all_reduce over `group` (data x context parallel ranks). Returns an fp32 scalar."""
    local = comm_zeros((), dtype=torch.float64, group=group)
    for labels, weights in shares:
        local += supervised_weights(labels, weights).sum().to(local.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(local, group=group)
    return local.float()


@dataclass
class MicroBatchLoss:
    objective: torch.Tensor  # differentiable: call backward on it (already normalised and scaled)
    weighted_ce: torch.Tensor  # detached local sum(w * ce) of this micro-batch
    token_ce: torch.Tensor  # detached [L] per-token cross entropy (0 where no label)
    aux_loss: torch.Tensor  # detached unscaled load-balancing loss of this forward pass


def micro_batch_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor,
    *,
    global_weight: torch.Tensor,
    aux_loss: torch.Tensor | None = None,
    aux_coef: float = 0.0,
    aux_count: int = 1,
    grad_scale: float = 1.0,
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> MicroBatchLoss:
    """This micro-batch's share of the global objective (see the module doc). `aux_count` is the number of
    forward passes in the global step that each add an aux loss (micro-batches x data x context ranks), so
    the aux term is their mean; `grad_scale` undoes the backend's own gradient averaging."""
    weighted, token_ce = chunked_cross_entropy(hidden, lm_head_weight, labels, loss_weights, logits_budget)
    denominator = torch.where(global_weight > 0, global_weight, torch.ones_like(global_weight))
    objective = weighted / denominator.to(weighted.device)
    aux = torch.zeros((), device=hidden.device) if aux_loss is None else aux_loss.float()
    if aux_loss is not None and aux_coef:
        objective = objective + aux_coef * aux / aux_count
    return MicroBatchLoss(objective=objective * grad_scale, weighted_ce=weighted.detach(), token_ce=token_ce,
                          aux_loss=aux.detach())


@dataclass
class LossMetrics:
    loss: float  # global sum(w * ce) / sum(w)
    aux_loss: float  # mean unscaled load-balancing loss over forward passes
    tokens: int  # non-padding tokens covered (source id >= 0)
    loss_per_source: dict[int, float]  # source -> sum(w * ce) / sum(w) over that source's tokens


def reduce_step_metrics(
    parts: Sequence[MicroBatchLoss],
    shares: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    global_weight: torch.Tensor,
    aux_count: int,
    group: dist.ProcessGroup | None = None,
) -> LossMetrics:
    """Global metrics of one step from this rank's micro-batch losses and the matching (labels,
    loss_weights, source_ids) shares. Collective over `group`: every rank calls it."""
    distributed = dist.is_available() and dist.is_initialized()
    max_source = max((int(s.max()) for _, _, s in shares if s.numel()), default=-1)
    num_sources = comm_tensor(max_source + 1, dtype=torch.int64, group=group)
    if distributed:
        dist.all_reduce(num_sources, op=dist.ReduceOp.MAX, group=group)
    n = int(num_sources)
    # Layout: [sum w*ce, sum aux, tokens, per-source sum w*ce (n), per-source sum w (n)], fp64.
    host_totals = torch.zeros(3 + 2 * n, dtype=torch.float64)  # built on the host, reduced once on the device
    for part, (labels, weights, sources) in zip(parts, shares):
        w = supervised_weights(labels, weights).cpu()
        wce = w * part.token_ce.double().cpu()
        src = sources.cpu()
        real = src >= 0
        host_totals[0] += float(part.weighted_ce)
        host_totals[1] += float(part.aux_loss)
        host_totals[2] += int(real.sum())
        host_totals[3:3 + n].index_add_(0, src[real], wce[real])
        host_totals[3 + n:].index_add_(0, src[real], w[real])
    totals = on_group_device(host_totals, group)
    if distributed:
        dist.all_reduce(totals, group=group)
    reduced = totals.cpu()  # one device -> host copy for all the Python numbers below
    denominator = float(global_weight) if float(global_weight) > 0 else 1.0
    per_source = {s: float(reduced[3 + s] / reduced[3 + n + s]) for s in range(n) if reduced[3 + n + s] > 0}
    return LossMetrics(loss=float(reduced[0]) / denominator, aux_loss=float(reduced[1]) / max(1, aux_count),
                       tokens=int(reduced[2]), loss_per_source=per_source)
