"""Preconditioners applied to each module's per-example gradient in parameter space, before the
sketch (the sketch mixes coordinates, so after it the correction loses most of its effect).

- `second_moment` (TrackStar-style): g / sqrt(v + λ·mean(v)), v = E_pool[g²] per coordinate,
  estimated from a sample of the pool with the same engine.
- `adam` (LESS): the Adam update direction m'/(√v' + ε) with m' = β1·m + (1−β1)·g and
  v' = β2·v + (1−β2)·g², from the moments of a warm-up run's optimizer. LESS applies it to the
  training side only; queries keep their plain gradients.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .tokenization import Example


class PreconditionerError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class SecondMoment:
    kind = "second_moment"

    def __init__(self, v: dict[str, torch.Tensor], damping: float = 1e-3, n_sample: int = 0):
        self.v = v  # key -> (P_m,) float32, mean of g² over the sample
        self.damping = damping
        self.n_sample = n_sample
        self._scale = {k: torch.rsqrt(x + damping * x.mean().clamp(min=1e-30)) for k, x in v.items()}

    def apply(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """g (B, P_m) -> g / sqrt(v + λ·mean v)."""
        s = self._scale[key]
        if s.device != g.device:
            s = self._scale[key] = s.to(g.device)
        return g * s

    @classmethod
    def estimate(cls, engine, examples: list[Example], pad_id: int, batch_size: int, damping: float = 1e-3) -> "SecondMoment":
        acc: dict[str, torch.Tensor] = {}

        def consume(key: str, g: torch.Tensor) -> None:
            sq = (g * g).sum(0)
            acc[key] = acc[key] + sq if key in acc else sq

        for i in range(0, len(examples), batch_size):
            engine.backward(examples[i:i + batch_size], pad_id, consume)
        n = max(len(examples), 1)
        return cls({k: (v / n).cpu() for k, v in acc.items()}, damping, len(examples))

    def save(self, path: str | Path) -> str:
        """Write atomically; returns the file's sha256 (recorded in manifests)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".part")
        save_file({k: v.contiguous() for k, v in self.v.items()}, str(tmp),
                  metadata={"kind": self.kind, "damping": repr(self.damping), "n_sample": str(self.n_sample)})
        tmp.replace(p)
        return file_sha256(p)

    @classmethod
    def load(cls, path: str | Path) -> "SecondMoment":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != cls.kind:
            raise PreconditionerError(f"{path}: not a second-moment preconditioner (kind={meta.get('kind')!r})")
        return cls(load_file(str(path)), float(meta["damping"]), int(meta.get("n_sample", 0)))


class AdamDirection:
    kind = "adam"

    def __init__(self, m: dict[str, torch.Tensor], v: dict[str, torch.Tensor], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        if set(m) != set(v):
            raise PreconditionerError("adam state: exp_avg and exp_avg_sq name different modules")
        self.m, self.v, self.beta1, self.beta2, self.eps = m, v, beta1, beta2, eps

    def apply(self, key: str, g: torch.Tensor) -> torch.Tensor:
        """g (B, P_m) -> per-example Adam update direction (B, P_m)."""
        if key not in self.m:
            raise PreconditionerError(f"adam state has no moments for module {key}")
        m, v = self.m[key].to(g.device), self.v[key].to(g.device)
        m2 = self.beta1 * m + (1 - self.beta1) * g
        v2 = self.beta2 * v + (1 - self.beta2) * g * g
        return m2 / (v2.sqrt() + self.eps)

    @classmethod
    def from_optimizer(cls, modules, optimizer: torch.optim.Optimizer) -> "AdamDirection":
        """Moments of a torch Adam/AdamW optimizer over the LoRA weights of `modules`
        (`gradients.lora_modules`), flattened in the engine's layout."""
        group = optimizer.param_groups[0]
        b1, b2 = group["betas"]
        m, v = {}, {}
        for mod in modules:
            st = optimizer.state.get(mod.weight)
            if not st or "exp_avg" not in st:
                raise PreconditionerError(f"optimizer has no Adam state for {mod.key}; run at least one step")
            m[mod.key] = st["exp_avg"].detach().float().reshape(-1).cpu()
            v[mod.key] = st["exp_avg_sq"].detach().float().reshape(-1).cpu()
        return cls(m, v, b1, b2, group["eps"])

    def save(self, path: str | Path) -> str:
        p = Path(path)
        tmp = p.with_name(p.name + ".part")
        tensors = {f"{k}.exp_avg": t.contiguous() for k, t in self.m.items()}
        tensors.update({f"{k}.exp_avg_sq": t.contiguous() for k, t in self.v.items()})
        save_file(tensors, str(tmp), metadata={"kind": self.kind, "beta1": repr(self.beta1), "beta2": repr(self.beta2), "eps": repr(self.eps)})
        tmp.replace(p)
        return file_sha256(p)

    @classmethod
    def load(cls, path: str | Path) -> "AdamDirection":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") != cls.kind:
            raise PreconditionerError(f"{path}: not an Adam-state file (kind={meta.get('kind')!r})")
        t = load_file(str(path))
        m = {k[: -len(".exp_avg")]: x for k, x in t.items() if k.endswith(".exp_avg")}
        v = {k[: -len(".exp_avg_sq")]: x for k, x in t.items() if k.endswith(".exp_avg_sq")}
        return cls(m, v, float(meta["beta1"]), float(meta["beta2"]), float(meta["eps"]))
