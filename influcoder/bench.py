"""Benchmarks that print ratios against a baseline measured in the same process.

`gradient_bench`: the batched-hook engine vs one-example-at-a-time autograd (the LESS-style loop),
and vs the floor (a plain forward + backward of the same batches with no per-example work), on the
same model, examples and thread count. `worker_scaling_bench`: the Ray gradient job at 1, 2, …
workers on the same pool.
"""

from __future__ import annotations

import os
import platform
import resource
import time

import numpy as np
import torch

from .config import Config
from .gradient_job import GradientWorker, prepare_examples
from .gradients import loop_gradients, per_example_loss, position_ids
from .tokenization import collate


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradient_bench(cfg: Config, n: int = 32, progress: bool = True) -> dict:
    worker = GradientWorker(cfg, "pool")
    examples, _ = prepare_examples(cfg, "pool", worker.decoder.tokenizer)
    examples = examples[:n]
    dev, model, pad = worker.decoder.device, worker.decoder.model, worker.pad_id
    tokens = sum(len(e.input_ids) for e in examples)
    results: dict[str, dict] = {}

    def timed(name, fn):
        _reset_peak(dev)
        fn(examples[: max(2, cfg.gradients.batch_size)])  # warm-up: allocator, kernels, sketch hashes
        _sync(dev)
        t0 = time.perf_counter()
        out = fn(examples)
        _sync(dev)
        dt = time.perf_counter() - t0
        results[name] = {"seconds": round(dt, 3), "examples_per_s": round(len(examples) / dt, 3),
                         "tokens_per_s": round(tokens / dt, 1), "peak_mb": round(_peak_mb(dev), 1)}
        return out

    def hooks(exs):
        return worker.vectors(exs)[0]

    def loop(exs):
        grads, _ = loop_gradients(model, exs, pad, worker.decoder.fresh_adapter, cfg.gradients.loss_reduction)
        vec = torch.zeros((len(exs), worker.dim), device=dev)
        off = 0
        for key, size in worker.engine.sizes.items():
            g = grads[:, off:off + size]
            vec += g if worker.sketcher.exact else worker.sketcher.project(key, g)
            off += size
        return vec.cpu().numpy()

    def floor(exs):
        bs = cfg.gradients.batch_size
        order = sorted(range(len(exs)), key=lambda i: -len(exs[i].input_ids))
        weights = [m.weight for m in worker.engine.modules]
        for b in range(0, len(order), bs):
            batch = {k: v.to(dev) for k, v in collate([exs[i] for i in order[b:b + bs]], pad).items()}
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=position_ids(batch["attention_mask"]), use_cache=False)
            loss, _ = per_example_loss(out.logits, batch["labels"])
            torch.autograd.grad(loss.sum(), weights, allow_unused=True)

    timed("floor_forward_backward", floor)
    a = timed("loop_autograd", loop)
    b = timed("batched_hooks", hooks)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {
        "model": cfg.model.name, "device": str(dev), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "examples": len(examples), "tokens": tokens, "batch_size": cfg.gradients.batch_size,
        "sketch": worker.sketcher.describe(), "results": results,
        "speedup_hooks_vs_loop": round(results["loop_autograd"]["seconds"] / results["batched_hooks"]["seconds"], 3),
        "hooks_vs_floor": round(results["batched_hooks"]["seconds"] / results["floor_forward_backward"]["seconds"], 3),
        "min_cosine_hooks_vs_loop": float(cos.min()),
    }


def worker_scaling_bench(cfg: Config, counts: list[int], n: int | None = None, progress: bool = True) -> dict:
    """Ray gradient-job throughput at each worker count, each on a fresh store of the same pool, in one
    Ray instance (its start-up is not what is measured); ratios are against the first count.
    `examples_per_s` counts from the moment every worker has its model loaded to the last shard."""
    import tempfile

    import ray

    from .ray_jobs import init_ray, run_ray

    if n:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"limit": n})})
    with tempfile.TemporaryDirectory(prefix="influcoder-bench-") as tmp:
        cfg = cfg.model_copy(update={"out_dir": tmp})
        started = init_ray(cfg.ray, min_cpus=int(max(counts) * cfg.ray.num_cpus_per_worker))
        runs: dict[str, dict] = {}
        try:
            for k in counts:
                s = run_ray(cfg, "pool", f"{tmp}/grads-{k}.zarr", progress, num_workers=k).as_dict()
                runs[str(k)] = {key: s[key] for key in ("workers", "rows", "shards", "seconds", "examples_per_s", "tokens_per_s", "wall_seconds")}
        finally:
            if started:
                ray.shutdown()
    base = runs[str(counts[0])]["examples_per_s"]
    return {
        "model": cfg.model.name, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads_per_worker": cfg.gradients.torch_threads, "batch_size": cfg.gradients.batch_size,
        "shard_size": cfg.gradients.shard_size, "rows": runs[str(counts[0])]["rows"], "runs": runs,
        "throughput_ratio": {f"{k}_vs_{counts[0]}": round(runs[str(k)]["examples_per_s"] / base, 3) if base else None for k in counts[1:]},
    }
