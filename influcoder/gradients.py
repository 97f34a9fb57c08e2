"""Per-example LoRA gradients from one batched backward pass.

For a LoRA pair (A: r×in, B: out×r) a forward hook on `lora_B` keeps its input z = A x (B,T,r)
and hooks the gradient δ of its output (B,T,out); then ∇B_i = Σ_t δ_it z_itᵀ is one einsum per
module for the whole batch. ∇A_i = Σ_t (Bᵀδ)_it x_itᵀ likewise from `lora_A`. With a fresh adapter
(B = 0) ∇A is exactly zero, so it is skipped. The loss is the sum over examples of each example's
own loss, so one backward gives every example's gradient, and no `.grad` of a base weight is formed.

`loop_gradients` is the slow obvious path (autograd one example at a time) the tests and the
benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .tokenization import IGNORE, Example, collate

# (module key, per-example flattened gradient (B, P_m) float32) -> None
Consumer = Callable[[str, torch.Tensor], None]


@dataclass
class LoraModule:
    key: str
    """Stable name: the peft module path plus `.B` or `.A`."""
    layer: torch.nn.Module
    """The lora_B or lora_A nn.Linear."""
    weight: torch.nn.Parameter
    shape: tuple[int, int]
    """(out, r) for B, (r, in) for A."""

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def lora_modules(model: torch.nn.Module, include_a: bool) -> list[LoraModule]:
    """The adapter's LoRA matrices in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        for adapter in mod.active_adapters:
            if adapter not in mod.lora_B:
                continue
            if getattr(mod.lora_dropout[adapter], "p", 0.0):
                raise ValueError(f"{name}: LoRA dropout must be 0 for exact gradients")
            parts = [("B", mod.lora_B[adapter])] + ([("A", mod.lora_A[adapter])] if include_a else [])
            for tag, lin in parts:
                out.append(LoraModule(f"{name}.{tag}", lin, lin.weight, tuple(lin.weight.shape)))
    if not out:
        raise ValueError("the model has no active LoRA adapter")
    return out


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, so left padding does not shift RoPE positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B,T,V), labels (B,T) -> (loss (B,), loss tokens (B,)); next-token CE."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T-1)
    keep = labels != IGNORE
    tok = tok * keep
    n = keep.sum(-1)
    total = tok.sum(-1)
    return (total / n.clamp(min=1) if reduction == "mean" else total), n


def _needs_full_logits(config) -> bool:
    """Models that transform logits after the head (soft-capping, scaling) take the plain path."""
    return bool(getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)
                or getattr(config, "logits_scaling", None))


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss (B,) and loss tokens (B,), applying the LM head only where there is a label:
    prompt and padding positions never meet the (vocabulary-sized) head, which on a CPU is most
    of the work a batched forward would otherwise add."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch["attention_mask"]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    if _needs_full_logits(base.config):
        return per_example_loss(model(**inputs).logits, batch["labels"], reduction)
    hidden = base.get_decoder()(**inputs).last_hidden_state[:, :-1]  # (B, T-1, H)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE  # (B, T-1)
    logits = base.get_output_embeddings()(hidden[keep])  # (N, V), N = loss tokens in the batch
    tok = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)
    n = keep.sum(-1)
    return (total / n.clamp(min=1) if reduction == "mean" else total), n


class GradientEngine:
    """Computes per-example LoRA gradients for batches and hands them, module by module, to a
    consumer (a sketch, a preconditioner estimate)."""

    def __init__(self, model: torch.nn.Module, fresh_adapter: bool, loss_reduction: str = "mean", padding_side: str = "right"):
        self.model = model
        self.include_a = not fresh_adapter
        self.loss_reduction = loss_reduction
        self.padding_side = padding_side
        self.modules = lora_modules(model, self.include_a)
        self.device = next(model.parameters()).device

    @property
    def sizes(self) -> dict[str, int]:
        return {m.key: m.size for m in self.modules}

    @contextmanager
    def _hooks(self, consume: Consumer):
        handles = []

        def hook(mod: LoraModule):
            def forward_hook(layer, inputs, output):
                z = inputs[0].detach()  # (B, T, in_features of this linear)

                def grad_hook(delta):  # delta: (B, T, out_features of this linear)
                    g = torch.einsum("bto,bti->boi", delta.float(), z.float())  # (B, out, in) = per-example ∇W
                    consume(mod.key, g.reshape(g.shape[0], -1))

                output.register_hook(grad_hook)

            return forward_hook

        for m in self.modules:
            handles.append(m.layer.register_forward_hook(hook(m)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def backward(self, examples: list[Example], pad_id: int, consume: Consumer) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward + backward over the batch; returns (loss (B,), loss tokens (B,))."""
        batch = {k: v.to(self.device) for k, v in collate(examples, pad_id, self.padding_side).items()}
        weights = [m.weight for m in self.modules]
        with self._hooks(consume):
            loss, n = forward_loss(self.model, batch, self.loss_reduction)
            # autograd.grad, not .backward(): nothing accumulates in any .grad.
            if loss.requires_grad and n.sum() > 0:
                torch.autograd.grad(loss.sum(), weights, allow_unused=True)
        return loss.detach(), n


def loop_gradients(model: torch.nn.Module, examples: list[Example], pad_id: int, fresh_adapter: bool,
                   loss_reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: autograd one example at a time. Returns (grads (n, P) float32 in module order,
    loss (n,))."""
    mods = lora_modules(model, not fresh_adapter)
    device = next(model.parameters()).device
    rows, losses = [], []
    for ex in examples:
        b = {k: v.to(device) for k, v in collate([ex], pad_id).items()}
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
        loss, n = per_example_loss(out.logits, b["labels"], loss_reduction)
        if n.sum() > 0:
            grads = torch.autograd.grad(loss.sum(), [m.weight for m in mods])
        else:
            grads = [torch.zeros_like(m.weight) for m in mods]
        rows.append(torch.cat([g.detach().float().reshape(-1) for g in grads]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.cat(losses)
