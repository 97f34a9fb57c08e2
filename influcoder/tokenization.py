"""Records → token ids and loss labels.

Prompt/response pairs use the tokenizer's chat template when it has one, with the loss on the
response tokens only (prompt labels are -100); plain text has the loss on every token.
Examples are truncated to `max_length` and the truncations are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .data import Record

IGNORE = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; IGNORE (-100) where there is no loss."""
    truncated: bool = False

    @property
    def n_loss_tokens(self) -> int:
        # The model shifts labels by one, so a label at position 0 never counts.
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class TokenStats:
    n: int = 0
    n_truncated: int = 0
    n_no_loss: int = 0
    """Examples with no loss token left (e.g. a response cut off entirely by truncation)."""
    n_tokens: int = 0
    n_loss_tokens: int = 0
    no_loss_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "no_loss_ids"}


def _ids(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def _pair_strings(tok, prompt: str, response: str, use_template: bool) -> tuple[str, str]:
    """(prompt part, response part) as strings whose concatenation is the full example."""
    if use_template:
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
    eos = tok.eos_token or ""
    return prompt + "\n", response + eos


def tokenize_record(rec: Record, tok, max_length: int, chat_template: str = "auto") -> Example:
    if rec.is_pair:
        use_template = chat_template == "auto" and bool(getattr(tok, "chat_template", None))
        head, tail = _pair_strings(tok, rec.prompt or "", rec.response or "", use_template)
        prefix = [tok.bos_token_id] if (not use_template and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False)) else []
        p_ids, r_ids = prefix + _ids(tok, head), _ids(tok, tail)
        ids, labels = p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids
    else:
        ids = tok(rec.text or "", add_special_tokens=True)["input_ids"]
        labels = list(ids)
    truncated = len(ids) > max_length
    return Example(rec.id, ids[:max_length], labels[:max_length], truncated)


def tokenize_records(records: list[Record], tok, max_length: int, chat_template: str = "auto") -> tuple[list[Example], TokenStats]:
    stats = TokenStats()
    out = []
    for r in records:
        ex = tokenize_record(r, tok, max_length, chat_template)
        stats.n += 1
        stats.n_truncated += ex.truncated
        stats.n_tokens += len(ex.input_ids)
        nl = ex.n_loss_tokens
        stats.n_loss_tokens += nl
        if nl == 0:
            stats.n_no_loss += 1
            stats.no_loss_ids.append(ex.id)
        out.append(ex)
    return out, stats


def collate(examples: list[Example], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch. Returns input_ids (B, T), attention_mask (B, T), labels (B, T)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = torch.tensor(e.input_ids)
        labels[i, sl] = torch.tensor(e.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
