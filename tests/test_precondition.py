"""Preconditioners against hand computations on small cases."""

import numpy as np
import pytest
import torch
import zarr

from influcoder.config import load_config
from influcoder.gradient_job import preconditioner_path, run_local
from influcoder.gradients import GradientEngine, lora_modules, loop_gradients
from influcoder.models import load_decoder
from influcoder.precondition import AdamDirection, PreconditionerError, SecondMoment
from test_gradients import decoder, examples


def test_adam_direction_matches_hand_computation():
    m = {"w": torch.tensor([0.1, -0.2, 0.0])}
    v = {"w": torch.tensor([0.01, 0.04, 0.0])}
    g = torch.tensor([[1.0, 2.0, -3.0], [0.0, 0.5, 0.5]])
    got = AdamDirection(m, v, beta1=0.9, beta2=0.99, eps=1e-8).apply("w", g)
    mm = 0.9 * np.array([0.1, -0.2, 0.0]) + 0.1 * g.numpy()
    vv = 0.99 * np.array([0.01, 0.04, 0.0]) + 0.01 * g.numpy() ** 2
    assert np.allclose(got.numpy(), mm / (np.sqrt(vv) + 1e-8), rtol=1e-6)


def test_adam_state_from_a_real_optimizer_round_trips(tmp_path):
    d = decoder(trained=True)
    exs = examples(d.tokenizer, 4)
    mods = lora_modules(d.model, include_a=True)
    opt = torch.optim.AdamW([m.weight for m in mods], lr=1e-3, betas=(0.8, 0.95), eps=1e-7)
    from influcoder.tokenization import collate

    b = collate(exs, d.tokenizer.pad_token_id)
    d.model(**b).loss.backward()
    opt.step()
    adam = AdamDirection.from_optimizer(mods, opt)
    k = mods[0].key
    assert torch.equal(adam.m[k], opt.state[mods[0].weight]["exp_avg"].reshape(-1))
    assert (adam.beta1, adam.beta2, adam.eps) == (0.8, 0.95, 1e-7)
    adam.save(tmp_path / "adam.safetensors")
    again = AdamDirection.load(tmp_path / "adam.safetensors")
    g = torch.randn(2, mods[0].size)
    assert torch.equal(adam.apply(k, g), again.apply(k, g))
    with pytest.raises(PreconditionerError, match="not a second-moment"):
        SecondMoment.load(tmp_path / "adam.safetensors")


def test_second_moment_estimate_and_transform_match_hand_computation(tmp_path):
    d = decoder(trained=True)
    exs = examples(d.tokenizer, 10)
    eng = GradientEngine(d.model, fresh_adapter=False)
    sm = SecondMoment.estimate(eng, exs, d.tokenizer.pad_token_id, batch_size=4, damping=0.01)
    ref, _ = loop_gradients(d.model, exs, d.tokenizer.pad_token_id, False)  # (n, P)
    off = 0
    for m in eng.modules:
        g = ref[:, off:off + m.size]
        v = (g * g).mean(0)
        assert torch.allclose(sm.v[m.key], v, rtol=1e-4, atol=1e-12)
        want = g / torch.sqrt(v + 0.01 * v.mean())
        assert torch.allclose(sm.apply(m.key, g), want, rtol=1e-4, atol=1e-8)
        off += m.size
    sm.save(tmp_path / "p.safetensors")
    back = SecondMoment.load(tmp_path / "p.safetensors")
    assert back.damping == 0.01 and back.n_sample == 10


def test_second_moment_store_equals_manual_pipeline(root, tmp_path):
    """End to end, unsketched: store rows = normalise(precondition(autograd gradient))."""
    cfg = load_config(root / "configs" / "tiny.yaml", [f"out_dir={tmp_path}", "gradients.sketch=none",
                                                       "gradients.preconditioner=second_moment", "gradients.precondition_sample=1000"])
    store = run_local(cfg, progress=False).store
    sm = SecondMoment.load(preconditioner_path(cfg))
    assert sm.n_sample == 192  # the whole pool here
    d = load_decoder(cfg.model)
    exs = examples(d.tokenizer, 192)
    ref, _ = loop_gradients(d.model, exs, d.tokenizer.pad_token_id, True)
    parts, off = [], 0
    for m in GradientEngine(d.model, True).modules:
        parts.append(sm.apply(m.key, ref[:, off:off + m.size]))
        off += m.size
    want = torch.nn.functional.normalize(torch.cat(parts, 1), dim=1).numpy()
    got = zarr.open_group(store, mode="r")["grads"][:].astype(np.float32)
    assert np.abs(got - want).max() < 2e-3  # float16 storage
    # queries reuse the pool's estimate; without it they are refused
    run_local(cfg, "queries", progress=False)
    preconditioner_path(cfg).unlink()
    with pytest.raises(PreconditionerError, match="run `influcoder gradients CONFIG --split pool` first"):
        run_local(cfg, "queries", progress=False)
