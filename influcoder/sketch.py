"""Random sketches that compress per-example LoRA gradients to ``dim`` dimensions.

Per-example gradients arrive per LoRA module as ``g: (n, P_m)``. Each module gets its
own independent random linear map ``S_m: R^{P_m} -> R^{dim}``, and the sketch of an
example is ``sum_m S_m g_m``, which is exactly a sketch of the concatenation
``[g_1 | g_2 | ...]`` with independent randomness per module block.

``S_m`` is a pure function of ``(kind, module name, P_m, dim, seed, SKETCH_VERSION)``
(plus ``sjlt_s`` for ``"sjlt"``): its randomness comes from a CPU ``torch.Generator``
seeded with the first 8 bytes of a SHA-256 of those values, so separate processes,
machines and later queries build the same map without shipping matrices. Everything
that affects the map (draw order, generation block size, bit layout) is pinned by
``SKETCH_VERSION``; bump it when any of that changes.

Kinds:

* ``countsketch`` (Charikar et al.): coordinate ``j`` goes to bucket ``h(j)`` with a
  random sign. ``O(n P)`` per call; buckets/signs are cached per module (5 bytes/coord).
* ``sjlt`` (sparse JL, Kane-Nelson block construction): ``dim`` is split into ``s``
  contiguous blocks and coordinate ``j`` goes to one bucket in each block (so its ``s``
  buckets are distinct), each with a random sign, scaled by ``1/sqrt(s)``.
* ``rademacher`` (TRAK/LESS-style dense projection): entries ``±1/sqrt(dim)``. The
  matrix is never stored: rows are generated in blocks of ``RADEMACHER_BLOCK_ROWS``
  (each block seeded from (module seed, block index)) as packed random bits, and
  expanded to floats a few rows at a time while applying. ``O(n P dim)`` per call.
* ``none``: identity. The engine concatenates modules instead of summing
  (``Sketcher.exact``); output dim is the total P.

Determinism: on CPU, ``project`` is bitwise reproducible for a given input. On CUDA,
the maps are the same (generated on CPU), but ``index_add_`` accumulates with atomics,
so results agree only up to float rounding unless deterministic algorithms are enabled.
The maps depend on ``torch``'s CPU Mersenne-Twister ``randint``/``random_`` streams,
which are stable across platforms for a given torch release.
"""

from __future__ import annotations

import hashlib
import math

import torch

SKETCH_VERSION: int = 1
KINDS = ("countsketch", "sjlt", "rademacher", "none")

# Rows of the (P, dim) Rademacher matrix generated per seeded block. Part of the map's
# definition (changing it changes the matrix): keep in sync with SKETCH_VERSION.
RADEMACHER_BLOCK_ROWS: int = 4096
# Rows expanded from packed bits to float32 at a time on CPU (cache-sized; apply-time
# only, does not change the map). On CUDA a whole generation block is expanded at once.
RADEMACHER_CPU_SUBROWS: int = 32
# Target elements per column chunk for countsketch/sjlt (bounds temporaries to ~2 MiB).
_APPLY_ELEMS: int = 1 << 19

_BYTE_SHIFTS = tuple(range(0, 64, 8))


def _seed64(*parts: object) -> int:
    """Stable 64-bit seed from ``"|".join(parts)`` (never Python's ``hash()``)."""
    key = "|".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def _normalize_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class Sketcher:
    """Per-module random sketch ``(n, P_m) -> (n, dim)``; see the module docstring."""

    def __init__(
        self,
        kind: str = "countsketch",
        dim: int = 8192,
        seed: int = 0,
        sjlt_s: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown sketch kind {kind!r}; expected one of {KINDS}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        bad_s = isinstance(sjlt_s, bool) or not isinstance(sjlt_s, int) or sjlt_s < 1
        if bad_s or (kind == "sjlt" and sjlt_s > dim):  # s > dim only matters for sjlt
            raise ValueError(f"sjlt_s must be an int in [1, dim={dim}], got {sjlt_s!r}")
        self.kind = kind
        self.dim = dim
        self.seed = seed
        self.sjlt_s = sjlt_s
        self.device = _normalize_device(device)
        # (name, P) -> (buckets: (s, P) int32, signs: (s, P) int8), on self.device.
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lut: torch.Tensor | None = None  # (256, 8) float32 byte -> ±1 signs

    # ------------------------------------------------------------------ public API

    @property
    def exact(self) -> bool:
        """True for ``"none"``: modules are concatenated instead of summed."""
        return self.kind == "none"

    def describe(self) -> dict:
        """Manifest entry; ``sjlt_s`` is None unless kind is ``"sjlt"``."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "version": SKETCH_VERSION,
            "sjlt_s": self.sjlt_s if self.kind == "sjlt" else None,
        }

    @classmethod
    def from_description(cls, desc: dict, device: torch.device | str = "cpu") -> Sketcher:
        """Rebuild the sketcher recorded by :meth:`describe` (refuses other versions)."""
        if desc.get("version") != SKETCH_VERSION:
            raise ValueError(
                f"sketch version {desc.get('version')!r} does not match this code's "
                f"SKETCH_VERSION={SKETCH_VERSION}; the random maps would differ"
            )
        s = desc.get("sjlt_s")
        return cls(desc["kind"], desc["dim"], desc["seed"], 4 if s is None else s, device)

    def project(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """Sketch one module's per-example gradients.

        g: (n, P) float32/float16/bfloat16 on ``self.device``.
        returns: (n, dim) float32; for ``"none"`` returns ``g`` itself (as float32).
        """
        if not isinstance(g, torch.Tensor) or g.dim() != 2:
            raise ValueError(f"expected a 2-D (n, P) tensor, got {getattr(g, 'shape', type(g))}")
        if not g.is_floating_point():
            raise TypeError(f"expected a floating-point gradient tensor, got {g.dtype}")
        if g.device != self.device:
            raise ValueError(f"g is on {g.device} but this Sketcher is on {self.device}")
        if self.kind == "none":
            return g if g.dtype == torch.float32 else g.float()
        if self.kind == "rademacher":
            return self._project_rademacher(name, g)
        return self._project_hashed(name, g)

    def __repr__(self) -> str:
        extra = f", sjlt_s={self.sjlt_s}" if self.kind == "sjlt" else ""
        return (
            f"Sketcher(kind={self.kind!r}, dim={self.dim}, seed={self.seed}{extra}, "
            f"device={self.device})"
        )

    # ------------------------------------------------- countsketch / sparse JL

    def _module_seed(self, name: str, P: int) -> int:
        kind = f"sjlt{self.sjlt_s}" if self.kind == "sjlt" else self.kind
        return _seed64(kind, name, P, self.dim, self.seed, SKETCH_VERSION)

    def _hashes(self, name: str, P: int) -> tuple[torch.Tensor, torch.Tensor]:
        """buckets: (s, P) int32 in [0, dim); signs: (s, P) int8 ±1; s=1 for countsketch."""
        key = (name, P)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        gen = _generator(self._module_seed(name, P))
        s = self.sjlt_s if self.kind == "sjlt" else 1
        # Block i of the output owns buckets [lo_i, hi_i); each coordinate draws one bucket
        # per block, so its s buckets are distinct. For s=1 this is plain CountSketch.
        buckets = torch.empty((s, P), dtype=torch.int32)
        for i in range(s):
            lo, hi = (i * self.dim) // s, ((i + 1) * self.dim) // s
            draw = torch.randint(lo, hi, (P,), generator=gen, dtype=torch.int64)
            buckets[i] = draw.to(torch.int32)
        signs = torch.randint(0, 2, (s, P), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
        hit = (buckets.to(self.device), signs.to(self.device))
        self._cache[key] = hit
        return hit

    def _project_hashed(self, name: str, g: torch.Tensor) -> torch.Tensor:
        n, P = g.shape
        buckets, signs = self._hashes(name, P)  # (s, P), (s, P)
        out = torch.zeros((n, self.dim), dtype=torch.float32, device=g.device)  # (n, dim)
        chunk = max(4096, _APPLY_ELEMS // max(n, 1))
        # Outer loop over the s hash functions keeps the per-bucket summation order
        # independent of the chunk size (and hence of n) on CPU.
        for i in range(buckets.shape[0]):
            for a in range(0, P, chunk):
                b = min(a + chunk, P)
                x = g[:, a:b].float() * signs[i, a:b]  # (n, b-a) float32
                out.index_add_(1, buckets[i, a:b].long(), x)
        if buckets.shape[0] > 1:
            out.mul_(1.0 / math.sqrt(buckets.shape[0]))
        return out

    # ------------------------------------------------------------- rademacher

    def _rademacher_words(self, name: str, P: int, block: int) -> torch.Tensor:
        """Packed random bits of rows [block*B, min((block+1)*B, P)): (rows, ceil(dim/64)) int64.

        Entry (r, c) of the matrix is -1 if bit (c % 64) of word [r, c // 64] is set, else +1
        (times 1/sqrt(dim)).
        """
        start = block * RADEMACHER_BLOCK_ROWS
        rows = min(RADEMACHER_BLOCK_ROWS, P - start)
        base = (self.kind, name, P, self.dim, self.seed, SKETCH_VERSION)
        gen = _generator(_seed64(*base, f"block{block}"))
        words = torch.empty((rows, (self.dim + 63) // 64), dtype=torch.int64)
        return words.random_(-(2**63), None, generator=gen)  # full 64-bit range

    def _expand(self, words: torch.Tensor) -> torch.Tensor:
        """(r, W) int64 packed bits -> (r, dim) float32 ±1."""
        if self._lut is None:
            v = torch.arange(256).unsqueeze(1)
            bits = ((v >> torch.arange(8)) & 1).float()  # (256, 8): bit k of byte v
            self._lut = (1.0 - 2.0 * bits).to(self.device)
        shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=words.device)
        byts = (words.unsqueeze(-1) >> shifts) & 255  # (r, W, 8) little-endian bytes
        signs = torch.nn.functional.embedding(byts, self._lut)  # (r, W, 8, 8)
        return signs.reshape(words.shape[0], -1)[:, : self.dim]

    def _project_rademacher(self, name: str, g: torch.Tensor) -> torch.Tensor:
        n, P = g.shape
        out = torch.zeros((n, self.dim), dtype=torch.float32, device=g.device)  # (n, dim)
        sub = RADEMACHER_CPU_SUBROWS if g.device.type == "cpu" else RADEMACHER_BLOCK_ROWS
        for block in range((P + RADEMACHER_BLOCK_ROWS - 1) // RADEMACHER_BLOCK_ROWS):
            start = block * RADEMACHER_BLOCK_ROWS
            words = self._rademacher_words(name, P, block).to(g.device)  # (rows, W)
            for a in range(0, words.shape[0], sub):
                b = min(a + sub, words.shape[0])
                r_blk = self._expand(words[a:b])  # (b-a, dim), never more than a block
                out.addmm_(g[:, start + a : start + b].float(), r_blk)
        return out.mul_(1.0 / math.sqrt(self.dim))
