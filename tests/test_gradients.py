"""The batched-hook engine against autograd one example at a time (the slow obvious path)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from influcoder.config import DataConfig, ModelConfig
from influcoder.data import load_records
from influcoder.gradients import GradientEngine, loop_gradients
from influcoder.models import load_decoder
from influcoder.sketch import Sketcher
from influcoder.tokenization import tokenize_records


def decoder(attn="sdpa", trained=False):
    d = load_decoder(ModelConfig(name="random:llama", attn_implementation=attn))
    if trained:  # a non-fresh adapter: B != 0, so the A-gradients are real too
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in d.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return d


def examples(tok, n=16, max_length=96):
    recs, _ = load_records(DataConfig(demo={"n": n, "planted_share": 0.1}))
    return tokenize_records(recs, tok, max_length)[0]


def hook_grads(d, exs, batch_size, side, fresh, reduction="mean"):
    eng = GradientEngine(d.model, fresh, reduction, side)
    parts: dict[str, list] = {}
    losses = []
    for i in range(0, len(exs), batch_size):
        loss, _ = eng.backward(exs[i:i + batch_size], d.tokenizer.pad_token_id, lambda k, g: parts.setdefault(k, []).append(g))
        losses.append(loss)
    return torch.cat([torch.cat(parts[m.key]) for m in eng.modules], 1), torch.cat(losses)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_hooks_equal_autograd(attn, trained, side, batch_size):
    d = decoder(attn, trained)
    exs = examples(d.tokenizer, 11)
    ref, ref_loss = loop_gradients(d.model, exs, d.tokenizer.pad_token_id, fresh_adapter=not trained)
    got, loss = hook_grads(d, exs, batch_size, side, fresh=not trained)
    assert got.shape == ref.shape and ref.abs().max() > 1e-3
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.allclose(loss, ref_loss, atol=1e-5)


def test_sum_reduction_matches_autograd():
    d = decoder(trained=True)
    exs = examples(d.tokenizer, 6)
    ref, _ = loop_gradients(d.model, exs, d.tokenizer.pad_token_id, fresh_adapter=False, loss_reduction="sum")
    got, _ = hook_grads(d, exs, 3, "right", fresh=False, reduction="sum")
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_fresh_adapter_skips_a_gradients_which_are_zero():
    d = decoder()
    exs = examples(d.tokenizer, 4)
    with_a, _ = loop_gradients(d.model, exs, d.tokenizer.pad_token_id, fresh_adapter=False)
    only_b, _ = hook_grads(d, exs, 4, "right", fresh=True)
    eng = GradientEngine(d.model, fresh_adapter=False)
    a_cols = torch.cat([torch.full((m.size,), m.key.endswith(".A")) for m in eng.modules])
    assert with_a[:, a_cols].abs().max() == 0  # B = 0 makes every ∇A zero, so skipping loses nothing
    assert torch.allclose(with_a[:, ~a_cols], only_b, atol=1e-6)


def test_gradient_does_not_depend_on_batch_mates():
    d = decoder(trained=True)
    exs = examples(d.tokenizer, 12)
    alone, _ = hook_grads(d, exs[:1], 1, "left", fresh=False)
    short_mates, _ = hook_grads(d, [exs[0]] + exs[1:4], 4, "left", fresh=False)
    long_mates, _ = hook_grads(d, [exs[0]] + sorted(exs[4:], key=lambda e: -len(e.input_ids))[:7], 8, "right", fresh=False)
    assert (alone[0] - short_mates[0]).abs().max() <= 1e-5
    assert (alone[0] - long_mates[0]).abs().max() <= 1e-5


@pytest.mark.slow
def test_sketches_preserve_cosine_ranking_on_real_text(shared_data_or_demo):
    """Exact SmolLM2 LoRA gradients of 64 real texts vs each sketch at d = 8192."""
    d = load_decoder(ModelConfig(device="cpu"))
    exs = tokenize_records(shared_data_or_demo[:64], d.tokenizer, 64)[0]
    eng = GradientEngine(d.model, fresh_adapter=True)
    parts: dict[str, list] = {}
    for i in range(0, len(exs), 8):
        eng.backward(exs[i:i + 8], d.tokenizer.pad_token_id, lambda k, g: parts.setdefault(k, []).append(g))
    per_module = {k: torch.cat(v) for k, v in parts.items()}
    exact = torch.cat(list(per_module.values()), 1)
    assert exact.shape == (64, sum(eng.sizes.values())) and exact.shape[1] > 100_000

    def pairwise(x):
        x = torch.nn.functional.normalize(x.double(), dim=1)
        c = x @ x.T
        return c[np.triu_indices(len(x), 1)].numpy()

    truth = pairwise(exact)
    for kind in ("countsketch", "sjlt", "rademacher"):
        sk = Sketcher(kind, 8192, seed=0)
        approx = sum(sk.project(k, g) for k, g in per_module.items())
        rho = spearmanr(truth, pairwise(approx)).statistic
        assert rho >= 0.9, (kind, rho)
        again = sum(Sketcher(kind, 8192, seed=0).project(k, g) for k, g in per_module.items())
        assert torch.equal(approx, again)  # same seed, same bytes
