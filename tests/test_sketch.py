"""Tests for influcoder.sketch (CPU only, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import spearmanr

import influcoder.sketch as sk
from influcoder.sketch import KINDS, SKETCH_VERSION, Sketcher

RANDOM_KINDS = ("countsketch", "sjlt", "rademacher")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 summation-order rounding, relative to the output's scale."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * float(expected.abs().max()))


def _matrix(s: Sketcher, name: str, P: int) -> torch.Tensor:
    """Explicit (dim, P) matrix of a module's sketch, by projecting the identity (small P only)."""
    return s.project(name, torch.eye(P)).T


# ----------------------------------------------------------------- validation / API


def test_validation() -> None:
    with pytest.raises(ValueError, match="countsketch.*sjlt.*rademacher.*none"):
        Sketcher("gaussian", 16)
    for bad_dim in (0, -3, 2.5):
        with pytest.raises(ValueError, match="dim"):
            Sketcher("countsketch", bad_dim)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sjlt_s"):
        Sketcher("sjlt", 16, sjlt_s=0)
    with pytest.raises(ValueError, match="sjlt_s"):
        Sketcher("sjlt", 16, sjlt_s=17)
    Sketcher("sjlt", 16, sjlt_s=16)  # s == dim is allowed
    tiny = Sketcher("countsketch", 2)  # the default sjlt_s=4 > dim is irrelevant here
    assert Sketcher.from_description(tiny.describe()).describe() == tiny.describe()
    s = Sketcher("countsketch", 16)
    with pytest.raises(ValueError, match="2-D"):
        s.project("m", torch.zeros(5))
    with pytest.raises(TypeError, match="floating"):
        s.project("m", torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="Sketcher is on meta"):
        Sketcher("countsketch", 16, device="meta").project("m", torch.zeros(2, 5))


def test_describe_roundtrip() -> None:
    s = Sketcher("sjlt", 64, seed=7, sjlt_s=3)
    d = s.describe()
    assert d == {"kind": "sjlt", "dim": 64, "seed": 7, "version": SKETCH_VERSION, "sjlt_s": 3}
    assert Sketcher("countsketch", 64).describe()["sjlt_s"] is None
    x = torch.randn(3, 500, generator=_gen(0))
    assert torch.equal(Sketcher.from_description(d).project("m", x), s.project("m", x))
    with pytest.raises(ValueError, match="version"):
        Sketcher.from_description({**d, "version": SKETCH_VERSION + 1})


def test_none_is_identity_and_exact() -> None:
    s = Sketcher("none", 16)
    assert s.exact and not any(Sketcher(k, 16).exact for k in RANDOM_KINDS)
    g = torch.randn(4, 100, generator=_gen(0))
    assert s.project("m", g) is g
    h = g.to(torch.bfloat16)
    out = s.project("m", h)
    assert out.dtype == torch.float32 and torch.equal(out, h.float())


def test_hash_seed_is_pinned() -> None:
    # Changing any of these values changes every stored sketch: bump SKETCH_VERSION.
    assert sk._seed64("countsketch", "layers.0.q_proj", 1000, 64, 0, 1) == 12758951174949313179
    b, sg = Sketcher("countsketch", 64)._hashes("layers.0.q_proj", 1000)
    assert b.dtype == torch.int32 and sg.dtype == torch.int8
    # These also pin torch's CPU Mersenne-Twister streams; a torch upgrade that breaks them
    # would silently invalidate stored sketches.
    assert b[0, :8].tolist() == [53, 39, 44, 5, 0, 26, 47, 38]
    assert sg[0, :8].tolist() == [-1, -1, 1, 1, -1, -1, 1, 1]
    w = Sketcher("rademacher", 64)._rademacher_words("layers.0.q_proj", 1000, 0)
    assert w[0, 0].item() == -6964099792777727655


# ------------------------------------------------------------------ determinism


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_deterministic_and_keyed(kind: str) -> None:
    g = torch.randn(3, 5000, generator=_gen(1))
    a = Sketcher(kind, 128, seed=5).project("layers.0.q_proj", g)
    b = Sketcher(kind, 128, seed=5).project("layers.0.q_proj", g)
    assert a.shape == (3, 128) and a.dtype == torch.float32
    assert torch.equal(a, b)  # fresh objects, bitwise identical
    assert not torch.allclose(a, Sketcher(kind, 128, seed=6).project("layers.0.q_proj", g))
    assert not torch.allclose(a, Sketcher(kind, 128, seed=5).project("layers.0.v_proj", g))
    if kind == "sjlt":
        other_s = Sketcher(kind, 128, seed=5, sjlt_s=2)
        assert not torch.allclose(a, other_s.project("layers.0.q_proj", g))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_batch_and_dtype_invariance(kind: str) -> None:
    g = torch.randn(6, 9000, generator=_gen(2))
    s = Sketcher(kind, 256)
    full = s.project("m", g)
    for i in (0, 5):
        one = s.project("m", g[i : i + 1])
        if kind == "rademacher":  # BLAS summation order may depend on n
            _close(one[0], full[i])
        else:  # per-bucket summation order is independent of the batch on CPU
            assert torch.equal(one[0], full[i])
    for dt in (torch.float16, torch.bfloat16):
        low = g.to(dt)
        assert torch.equal(s.project("m", low), s.project("m", low.float()))
    # Non-contiguous input (column slice of a larger buffer) is fine.
    wide = torch.randn(6, 9500, generator=_gen(3))
    _close(s.project("m", wide[:, 500:]), s.project("m", wide[:, 500:].contiguous()))


# ------------------------------------------------------------- matrix structure


def test_countsketch_and_sjlt_structure() -> None:
    P, d = 300, 64
    m = _matrix(Sketcher("countsketch", d, seed=3), "m", P)  # (d, P)
    assert torch.equal((m != 0).sum(0), torch.ones(P, dtype=torch.long))
    assert set(m[m != 0].tolist()) <= {1.0, -1.0}
    assert (m != 0).any(1).sum() > 0.9 * d  # buckets spread over the output

    s = 4
    m = _matrix(Sketcher("sjlt", d, seed=3, sjlt_s=s), "m", P)
    nz = m != 0
    assert torch.equal(nz.sum(0), torch.full((P,), s))  # s distinct buckets per coordinate
    for i in range(s):  # exactly one in each of the s output blocks
        lo, hi = i * d // s, (i + 1) * d // s
        assert torch.equal(nz[lo:hi].sum(0), torch.ones(P, dtype=torch.long))
    torch.testing.assert_close(m[nz].abs(), torch.full((P * s,), 1 / math.sqrt(s)))
    assert 0.4 < (m[nz] > 0).float().mean() < 0.6


def test_rademacher_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    P, d = 300, 100  # d not a multiple of 64
    m = _matrix(Sketcher("rademacher", d, seed=3), "m", P)
    torch.testing.assert_close(m.abs(), torch.full((d, P), 1 / math.sqrt(d)))
    assert abs((m > 0).float().mean().item() - 0.5) < 0.02

    # Several generation blocks (block size shrunk so the identity stays small): blocks
    # are seeded independently, so no two blocks repeat the same rows.
    monkeypatch.setattr(sk, "RADEMACHER_BLOCK_ROWS", 8)
    m = _matrix(Sketcher("rademacher", d, seed=3), "m", 42)  # 6 blocks, last one partial
    rows = m.T.sign()
    assert torch.unique(rows, dim=0).shape[0] == 42


def test_rademacher_subchunking_does_not_change_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.randn(4, 2 * sk.RADEMACHER_BLOCK_ROWS + 77, generator=_gen(4))
    s = Sketcher("rademacher", 192)
    ref = s.project("m", g)
    for sub in (1, 7, sk.RADEMACHER_BLOCK_ROWS):  # block-sized = the CUDA path
        monkeypatch.setattr(sk, "RADEMACHER_CPU_SUBROWS", sub)
        _close(s.project("m", g), ref)


def test_rademacher_never_allocates_dense_matrix() -> None:
    from torch.profiler import ProfilerActivity, profile

    P, d = 3 * sk.RADEMACHER_BLOCK_ROWS + 5, 512
    dense_bytes = P * d * 4
    g = torch.randn(2, P, generator=_gen(5))
    s = Sketcher("rademacher", d)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        s.project("m", g)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    # At most one generation block of packed bits / float rows is ever alive in one piece.
    assert 0 < biggest <= sk.RADEMACHER_BLOCK_ROWS * d * 4 < dense_bytes / 3
    # Control: the profiler does see a dense allocation when there is one.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(P, d)
    assert max(e.cpu_memory_usage for e in prof.events()) >= dense_bytes


# ------------------------------------------------------------------- statistics


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_linearity(kind: str) -> None:
    a = torch.randn(4, 20000, generator=_gen(6))
    b = torch.randn(4, 20000, generator=_gen(7))
    s = Sketcher(kind, 512)
    _close(s.project("m", a + b), s.project("m", a) + s.project("m", b))
    _close(s.project("m", 2.5 * a), 2.5 * s.project("m", a))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_inner_product_unbiased(kind: str) -> None:
    P, d, seeds = 200, 32, 400
    x = torch.randn(P, generator=_gen(8))
    y = 0.6 * x + 0.8 * torch.randn(P, generator=_gen(9))
    exact_xy, exact_xx = float(x @ y), float(x @ x)
    xy, xx = [], []
    for seed in range(seeds):
        out = Sketcher(kind, d, seed=seed).project("m", torch.stack([x, y]))
        xy.append(float(out[0] @ out[1]))
        xx.append(float(out[0] @ out[0]))
    scale = float(x.norm() * y.norm())
    # Per-seed std is ~|x||y|/sqrt(d); the mean over 400 seeds is within ~1% of |x||y|.
    assert abs(sum(xy) / seeds - exact_xy) < 0.05 * scale
    assert abs(sum(xx) / seeds - exact_xx) < 0.05 * exact_xx


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_norms_preserved(kind: str) -> None:
    x = torch.randn(4, 50_000, generator=_gen(10))
    x[1] *= 1e-3  # scale-free
    x[2, :100] += 50.0  # a few heavy coordinates
    out = Sketcher(kind, 8192, seed=1).project("m", x)
    ratio = out.norm(dim=1) / x.norm(dim=1)
    assert torch.all((ratio - 1).abs() < 0.1), ratio


@pytest.fixture(scope="module")
def correlated() -> tuple[torch.Tensor, torch.Tensor]:
    """80 vectors in 200k dims from 6 shared factors + noise, and their exact cosines."""
    n, P, k = 80, 200_000, 6
    gen = _gen(11)
    factors = torch.randn(k, P, generator=gen)
    loadings = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    x = loadings @ factors + 0.7 * torch.randn(n, P, generator=gen)
    return x, _offdiag_cosines(x)


def _offdiag_cosines(x: torch.Tensor) -> torch.Tensor:
    u = torch.nn.functional.normalize(x.double(), dim=1)
    c = u @ u.T
    i, j = torch.triu_indices(c.shape[0], c.shape[0], offset=1)
    return c[i, j]


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_ranking_preserved(kind: str, correlated: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, exact = correlated
    assert exact.std() > 0.15  # cosines genuinely spread out
    approx = _offdiag_cosines(Sketcher(kind, 8192, seed=2).project("layers.3.k_proj", x))
    rho = spearmanr(exact.numpy(), approx.numpy()).statistic
    assert rho >= 0.9, rho
    assert (approx - exact).abs().max() < 0.1


# -------------------------------------------------------------- module-sum contract


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_module_sum_is_sketch_of_concatenation(kind: str) -> None:
    P1, P2, d = 120, 90, 32
    s = Sketcher(kind, d, seed=4)
    # The per-module maps, as explicit matrices, side by side form the map of the concatenation.
    full = torch.cat([_matrix(s, "a", P1), _matrix(s, "b", P2)], dim=1)  # (d, P1 + P2)
    x1 = torch.randn(5, P1, generator=_gen(12))
    x2 = torch.randn(5, P2, generator=_gen(13))
    summed = s.project("a", x1) + s.project("b", x2)
    _close(summed, torch.cat([x1, x2], dim=1) @ full.T)
    # Independent randomness per module: same size, different name -> different map.
    assert not torch.equal(_matrix(s, "a", P1), _matrix(s, "c", P1))


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_module_sum_preserves_concatenated_inner_products(kind: str) -> None:
    # Two modules of the same size with identical content: if their maps were shared, the
    # cross terms would double-count and inflate <Sx, Sy>; independent maps keep it unbiased.
    P, d, seeds = 100, 32, 300
    x = torch.randn(2, P, generator=_gen(14))
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # cosine ~0.6: a shared map would be off by ~0.6 * scale
    exact = float(2 * (x[0] @ x[1]))
    sums = []
    for seed in range(seeds):
        s = Sketcher(kind, d, seed=seed)
        out = s.project("mlp.up", x) + s.project("mlp.gate", x)
        sums.append(float(out[0] @ out[1]))
    scale = float(2 * x[0].norm() * x[1].norm())
    assert abs(sum(sums) / seeds - exact) < 0.06 * scale


def test_kinds_constant() -> None:
    assert KINDS == ("countsketch", "sjlt", "rademacher", "none")
