"""A gradient job: config → tokenised split → shards → gradient store.

`GradientWorker` holds one loaded model and turns a shard of examples into store rows; the local
run below drives one worker in-process, and the Ray job drives several with the same class.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .config import Config, ModelConfig
from .data import load_split
from .gradients import GradientEngine
from .models import ModelError, load_decoder
from .precondition import AdamDirection, PreconditionerError, SecondMoment, file_sha256
from .sketch import Sketcher
from .store import SCHEMA_VERSION, GradStore
from .tokenization import Example, tokenize_records


def default_store_path(cfg: Config, split: str) -> Path:
    name = "grads" if split == "pool" else f"grads-{split}"
    if cfg.model.checkpoint is not None and cfg.model.target == "finetuned" and not cfg.model.adapter:
        name += f"-ckpt{cfg.model.checkpoint}"
    return cfg.run_dir / f"{name}.zarr"


def saved_checkpoints(cfg: Config) -> list[dict]:
    """The fine-tune's saved checkpoints ({path, step, lr}), earliest first; [] when none were saved."""
    from .finetune import finetune_dir

    f = finetune_dir(cfg) / "finetune.json"
    return (json.loads(f.read_text()).get("checkpoints") or []) if f.is_file() else []


def checkpoint_configs(cfg: Config) -> list[tuple[Config, float]]:
    """(config, weight) per gradient store the teacher uses: one per `teacher.checkpoints` entry,
    weighted by its learning rate, or just (cfg, 1.0)."""
    m = cfg.model
    if not cfg.teacher.checkpoints or m.checkpoint is not None or m.target == "weights" or m.adapter:
        return [(cfg, 1.0)]  # one point: asked for, or not this run's own fine-tune
    saved = saved_checkpoints(cfg)
    picked: list[int] = []
    for i in cfg.teacher.checkpoints:
        if not -len(saved) <= i < len(saved):
            raise ModelError(f"teacher.checkpoints={cfg.teacher.checkpoints}: the fine-tune in {cfg.run_dir} saved {len(saved)} "
                             "checkpoints (set finetune.checkpoints ≥ 2 and run `influcoder finetune CONFIG` again, or set "
                             "teacher.checkpoints=[] for the final adapter alone)")
        if i % len(saved) not in picked:
            picked.append(i % len(saved))
    return [(cfg.model_copy(update={"model": m.model_copy(update={"checkpoint": i})}), float(saved[i]["lr"])) for i in picked]


def preconditioner_path(cfg: Config) -> Path:
    return cfg.run_dir / "preconditioner.safetensors"


def attribution_model(cfg: Config) -> ModelConfig:
    """The decoder config gradients are taken at (`model.target`), with the adapter resolved."""
    from .finetune import adapter_path

    m = cfg.model
    if m.target == "weights":
        return m.model_copy(update={"adapter": None})
    if m.adapter:
        return m
    path = adapter_path(cfg)
    if m.checkpoint is not None and (path / "adapter_config.json").is_file():
        from .finetune import finetune_dir

        saved = saved_checkpoints(cfg)
        if not -len(saved) <= m.checkpoint < len(saved):
            raise ModelError(f"model.checkpoint={m.checkpoint}: the fine-tune saved {len(saved)} checkpoints "
                             f"(set finetune.checkpoints ≥ 2 and run `influcoder finetune CONFIG` again)")
        path = finetune_dir(cfg) / "checkpoints" / Path(saved[m.checkpoint]["path"]).name  # wherever the run dir now is
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"model.target=finetuned: no adapter given and {path} does not exist. Run `influcoder finetune CONFIG` "
                         "first, set model.adapter to the LoRA the model was trained with, or set model.target=weights "
                         "for a fresh projection LoRA on the weights as loaded.")
    return m.model_copy(update={"adapter": str(path)})


def prepare_examples(cfg: Config, split: str, tokenizer) -> tuple[list[Example], dict]:
    records, report = load_split(cfg.data, split)
    examples, stats = tokenize_records(records, tokenizer, cfg.data.max_length, cfg.data.chat_template)
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.input_ids, e.labels]).encode())
    dataset = {"split": split, "source": cfg.data.path if split == "pool" else list(cfg.data.queries),
               "n": len(examples), "fingerprint": h.hexdigest(), "bad_rows": report.n_bad, **stats.as_dict()}
    return examples, dataset


class GradientWorker:
    """One loaded decoder + engine + sketch (+ preconditioner): shards in, store rows out."""

    def __init__(self, cfg: Config, split: str = "pool"):
        g = cfg.gradients
        torch.set_num_threads(g.torch_threads)
        self.cfg, self.split = cfg, split
        self.model_cfg = attribution_model(cfg)
        self.decoder = load_decoder(self.model_cfg)
        self.engine = GradientEngine(self.decoder.model, self.decoder.fresh_adapter, g.loss_reduction, g.padding_side)
        self.sketcher = Sketcher(g.sketch, g.dim, g.seed, g.sjlt_s, device=self.decoder.device)
        self.dim = sum(self.engine.sizes.values()) if self.sketcher.exact else g.dim
        self.pre: SecondMoment | AdamDirection | None = None
        self.pre_info: dict = {"kind": "none"}

    @property
    def pad_id(self) -> int:
        return self.decoder.tokenizer.pad_token_id

    def setup_preconditioner(self, examples: list[Example]) -> None:
        """Load (or, for the pool, estimate and save) the configured preconditioner."""
        g, kind = self.cfg.gradients, self.cfg.gradients.preconditioner
        if kind == "second_moment":
            path = preconditioner_path(self.cfg)
            if not path.is_file():
                if self.split != "pool":
                    raise PreconditionerError(f"{path}: missing; run `influcoder gradients CONFIG --split pool` first (the second moment is estimated from the pool)")
                rng = np.random.default_rng(self.cfg.seed)
                pick = sorted(rng.choice(len(examples), size=min(g.precondition_sample, len(examples)), replace=False))
                path.parent.mkdir(parents=True, exist_ok=True)
                SecondMoment.estimate(self.engine, [examples[i] for i in pick], self.pad_id, g.batch_size, g.damping).save(path)
            self.pre = SecondMoment.load(path)
            self.pre_info = {"kind": kind, "sha256": file_sha256(path), "damping": self.pre.damping, "n_sample": self.pre.n_sample}
        elif kind == "adam":
            if not g.adam_state:
                raise PreconditionerError("gradients.preconditioner=adam needs gradients.adam_state (a file of Adam moments)")
            applied = self.split == "pool"  # LESS: the Adam direction for training examples, plain gradients for queries
            self.pre = AdamDirection.load(g.adam_state) if applied else None
            self.pre_info = {"kind": kind, "sha256": file_sha256(g.adam_state), "applied": applied}

    def manifest(self, dataset: dict) -> dict:
        c = self.cfg
        adapter = ({"fresh": True, **c.model.lora.model_dump()} if self.decoder.fresh_adapter
                   else {"fresh": False, "path": self.model_cfg.adapter, "sha256": _adapter_sha(self.model_cfg.adapter)})
        return {
            "schema": SCHEMA_VERSION,
            "model": {"name": c.model.name, "source": self.decoder.source, "revision": c.model.revision, "target": c.model.target,
                      "dtype": c.model.dtype, "adapter": adapter, "seed": c.model.seed},
            "a_gradients": "included" if self.engine.include_a else "skipped: fresh adapter (B = 0), so every A-gradient is zero",
            "loss": {"reduction": c.gradients.loss_reduction, "max_length": c.data.max_length, "chat_template": c.data.chat_template},
            "sketch": self.sketcher.describe(),
            "modules": self.engine.sizes,
            "preconditioner": self.pre_info,
            "dataset": dataset,
            "shard_size": c.gradients.shard_size,
            "influcoder_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def vectors(self, examples: list[Example], on_batch=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sketched vectors (n, dim) float32, loss (n,), loss tokens (n,)) in input order.
        `on_batch(examples, tokens)` is called after each batch (progress bars)."""
        n, bs = len(examples), self.cfg.gradients.batch_size
        order = sorted(range(n), key=lambda i: -len(examples[i].input_ids)) if self.cfg.gradients.sort_by_length else list(range(n))
        out = torch.zeros((n, self.dim), dtype=torch.float32)
        loss, ntok = np.zeros(n, np.float32), np.zeros(n, np.int32)
        offsets, off = {}, 0
        for key, size in self.engine.sizes.items():
            offsets[key], off = off, off + size
        for b in range(0, n, bs):
            idx = order[b:b + bs]
            buf = torch.zeros((len(idx), self.dim), dtype=torch.float32, device=self.decoder.device)

            def consume(key: str, g: torch.Tensor) -> None:
                if self.pre is not None:
                    g = self.pre.apply(key, g)
                if self.sketcher.exact:
                    buf[:, offsets[key]:offsets[key] + g.shape[1]] = g
                else:
                    buf.add_(self.sketcher.project(key, g))

            l, t = self.engine.backward([examples[i] for i in idx], self.pad_id, consume)
            out[idx] = buf.cpu()
            loss[idx], ntok[idx] = l.float().cpu().numpy(), t.cpu().numpy()
            if on_batch is not None:
                on_batch(len(idx), sum(len(examples[i].input_ids) for i in idx))
        return out.numpy(), loss, ntok

    def run_shard(self, store: GradStore, examples: list[Example], s: int, on_batch=None) -> int:
        rows = store.shard_rows(s)
        vec, loss, ntok = self.vectors([examples[i] for i in rows], on_batch)
        store.write_shard(s, vec, loss, ntok)
        return len(rows)


def _adapter_sha(path: str | None) -> str | None:
    if not path:
        return None
    f = Path(path) / "adapter_model.safetensors"
    return file_sha256(f) if f.is_file() else None


@dataclass
class JobSummary:
    store: str
    rows: int
    shards: int
    shards_run: int
    seconds: float
    examples_per_s: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def open_job(cfg: Config, split: str, out: str | Path | None, worker: GradientWorker) -> tuple[GradStore, list[Example]]:
    """Tokenise the split, set up the preconditioner, and create (or resume) the store."""
    examples, dataset = prepare_examples(cfg, split, worker.decoder.tokenizer)
    worker.setup_preconditioner(examples)
    # An fsspec URL (file://, s3://, memory://) stays a string: Path() would fold its `//`.
    path: str | Path = str(out) if out and "://" in str(out) else Path(out) if out else default_store_path(cfg, split)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    if worker.decoder.fresh_adapter and not (cfg.run_dir / "adapter").exists():
        # The projection this run used, so later queries can reproduce it exactly.
        worker.decoder.model.save_pretrained(cfg.run_dir / "adapter")
    store = GradStore.create_or_resume(path, [e.id for e in examples], worker.dim, cfg.gradients.shard_size, worker.manifest(dataset))
    return store, examples


def run_local(cfg: Config, split: str = "pool", out: str | Path | None = None, progress: bool = True) -> JobSummary:
    """Compute (or finish) the split's gradient store in this process."""
    from tqdm.auto import tqdm

    worker = GradientWorker(cfg, split)
    store, examples = open_job(cfg, split, out, worker)
    pending = store.pending()
    total = sum(len(store.shard_rows(s)) for s in pending)
    t0, seen = time.perf_counter(), {"rows": 0, "tokens": 0}
    with tqdm(total=total, unit="ex", desc=f"gradients [{split}]", disable=not progress) as bar:
        def on_batch(n: int, tokens: int) -> None:
            seen["rows"] += n
            seen["tokens"] += tokens
            bar.update(n)
            bar.set_postfix(tok_s=f"{seen['tokens'] / max(time.perf_counter() - t0, 1e-9):.0f}")

        for s in pending:
            worker.run_shard(store, examples, s, on_batch)
    dt = time.perf_counter() - t0
    rows, toks = seen["rows"], seen["tokens"]
    return JobSummary(store.path, store.n, store.n_shards, len(pending), round(dt, 3), round(rows / dt, 3) if rows else 0.0,
                      round(toks / dt, 1) if rows else 0.0)
