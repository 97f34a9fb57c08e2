"""Teacher score variants on small cases: centring is exact, the Fisher correction (empirical Fisher
of unit gradients) matches an explicit matrix inverse, checkpoint sums match a loop, and the teacher store uses them."""

import numpy as np
import pytest
import torch

from influcoder.sketch import Sketcher
from influcoder.teacher_score import ScoreTransform, checkpoint_sum, unit


def test_centring_in_sketch_space_equals_sketching_centred_gradients():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(30, 500)).astype(np.float32) + 3.0  # a shared direction, as real gradients have
    Q = rng.normal(size=(4, 500)).astype(np.float32) + 3.0
    sk = Sketcher("countsketch", dim=64, seed=1)

    def S(x):
        return sk.project("m", torch.from_numpy(np.ascontiguousarray(x))).numpy()

    tf = ScoreTransform.fit("centred", S(G))
    fast = tf.scores(S(Q), S(G))
    mu = G.mean(0)
    slow = unit(S(Q - mu)) @ unit(S(G - mu)).T  # centre in parameter space, then sketch
    assert np.abs(fast - slow).max() < 1e-4
    plain = ScoreTransform.fit("cosine", S(G)).scores(S(Q), S(G))
    assert np.abs(fast - plain).max() > 0.1  # centring changes the scores


@pytest.mark.parametrize("n,d", [(12, 40), (50, 20)])  # rank-deficient F, and full rank
def test_fisher_matches_explicit_inverse(n, d):
    rng = np.random.default_rng(n)
    P = rng.normal(size=(n, d)) + rng.normal(size=d) * 2
    Q = rng.normal(size=(3, d))
    tf = ScoreTransform.fit("fisher", P, damping=0.3)
    U = P / np.linalg.norm(P, axis=1, keepdims=True)
    F = U.T @ U / n  # the empirical Fisher of unit gradients: uncentred
    eig = np.linalg.eigvalsh(F)
    lam = 0.3 * eig[eig > eig.max() * 1e-12].mean()
    assert tf.damping == pytest.approx(lam, rel=1e-6)
    q = (np.linalg.inv(F + lam * np.eye(d)) @ Q.T).T  # the query's scale drops out of the cosine
    want = unit(q) @ unit(U).T
    assert np.abs(tf.scores(Q, P) - want).max() < 1e-4


def test_fisher_downweights_a_direction_every_example_shares():
    rng = np.random.default_rng(3)
    shared = rng.normal(size=50)
    P = rng.normal(size=(200, 50)) * 0.3 + np.outer(rng.normal(size=200) * 5, shared)
    q = shared + rng.normal(size=50) * 0.3  # a query that mostly points along the shared direction
    c = ScoreTransform.fit("centred", P).query(q[None])[0]
    f = ScoreTransform.fit("fisher", P).query(q[None])[0]
    s = unit(shared[None])[0]
    assert abs(f @ s) < 0.5 * abs(c @ s)


def test_transform_roundtrip_and_version(tmp_path):
    P = np.random.default_rng(1).normal(size=(20, 16))
    tf = ScoreTransform.fit("fisher", P)
    tf.save(tmp_path / "t.npz")
    back = ScoreTransform.load(tmp_path / "t.npz")
    assert back.kind == "fisher" and np.allclose(back.scores(P[:3], P), tf.scores(P[:3], P))
    z = dict(np.load(tmp_path / "t.npz"))
    np.savez(tmp_path / "old.npz", **{**z, "version": 0})
    with pytest.raises(ValueError, match="version 0"):
        ScoreTransform.load(tmp_path / "old.npz")
    np.savez(tmp_path / "v1.npz", **{**z, "version": 1})  # version 2 changed fisher's maths: a v1 fisher is stale
    with pytest.raises(ValueError, match="rebuild the teacher"):
        ScoreTransform.load(tmp_path / "v1.npz")
    ScoreTransform("cosine").save(tmp_path / "c.npz")
    np.savez(tmp_path / "c1.npz", **{**dict(np.load(tmp_path / "c.npz")), "version": 1})  # cosine did not change: still read
    assert ScoreTransform.load(tmp_path / "c1.npz").kind == "cosine"
    with pytest.raises(ValueError, match="choose from"):
        ScoreTransform.fit("tfidf", P)


def test_checkpoint_sum_matches_a_loop():
    rng = np.random.default_rng(2)
    mats, lrs = [rng.normal(size=(3, 7)) for _ in range(3)], [1e-3, 5e-4, 1e-4]
    want = np.zeros((3, 7))
    for m, lr in zip(mats, lrs):
        want += lr * m
    want /= sum(lrs)
    assert np.allclose(checkpoint_sum(mats, lrs), want, atol=1e-6)
    with pytest.raises(ValueError, match="learning rates"):
        checkpoint_sum(mats, [0, 0, 0])
    with pytest.raises(ValueError, match="3 score matrices for 2"):
        checkpoint_sum(mats, lrs[:2])
