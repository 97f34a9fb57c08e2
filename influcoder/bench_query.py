"""`influcoder bench query`: attribution query cost, in one process on the same pool and queries.

(a) the engine (student encoder + FAISS), (b) the HTTP API under concurrent loopback clients,
(c) the exact-gradient path LESS-style tools take (the query's gradient through the decoder, then
a cosine scan of every stored pool gradient; the store is preloaded in memory, which favours (c)).
Also: storage bytes per example, recall@k of (a) against (c), and FAISS search latency at 10⁵–10⁶
synthetic rows.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .config import Config
from .data import Record, load_split


def _pcts(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2), "n": len(a)}


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@contextmanager
def _server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)


def _http(url: str, inputs: list[dict], k: int, clients: int, max_requests: int, max_seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(max_requests))

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/attribute", json={"inputs": [inputs[i % len(inputs)]], "k": k})
                r.raise_for_status()
                with lock:
                    lat.append(1000 * (time.perf_counter() - t0))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**_pcts(lat), "clients": clients, "queries_per_s": round(len(lat) / (time.perf_counter() - t0), 2)}


def _scaling(dim: int, sizes: list[int], n_queries: int = 50) -> list[dict]:
    import faiss

    from .index import make_index

    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        X = rng.standard_normal((n, dim), dtype=np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        Q = X[rng.choice(n, n_queries)] + 0.1 * rng.standard_normal((n_queries, dim), dtype=np.float32)
        for factory in ("Flat", f"IVF{int(4 * np.sqrt(n))},SQ8"):
            idx = make_index(factory, dim, X[rng.choice(n, min(n, 50_000), replace=False)])
            idx.add_with_ids(X, np.arange(n, dtype=np.int64))
            if hasattr(faiss, "extract_index_ivf") and "IVF" in factory:
                faiss.extract_index_ivf(idx).nprobe = 16
            lat = []
            for q in Q:
                t0 = time.perf_counter()
                idx.search(q[None], 10)
                lat.append(1000 * (time.perf_counter() - t0))
            out.append({"rows": n, "factory": factory, **_pcts(lat)})
        del X
    return out


def query_bench(cfg: Config, n_queries: int = 40, k: int = 10, clients: int = 4, max_seconds: float = 20.0,
                scale: list[int] | None = None) -> dict:
    from .engine import Engine
    from .index import index_dir
    from .service import create_app
    from .teacher_score import raw_rows
    from .tokenization import tokenize_records

    idx = index_dir(cfg)
    engine = Engine.load(idx)
    split = "queries" if cfg.data.queries else "pool"
    recs: list[Record] = load_split(cfg.data, split)[0][:n_queries]
    inputs = [{"prompt": r.prompt, "response": r.response} if r.is_pair else {"text": r.text} for r in recs]

    engine.attribute(inputs[:2], k=k)  # warm-up
    lat_a, top_a = [], []
    for x in inputs:
        t0 = time.perf_counter()
        (ans,) = engine.attribute([x], k=k)
        lat_a.append(1000 * (time.perf_counter() - t0))
        top_a.append([h["id"] for h in ans["results"]])
    t0 = time.perf_counter()
    engine.attribute(inputs, k=k)
    batched = 1000 * (time.perf_counter() - t0) / len(inputs)

    with _server(create_app(engine)) as url:
        http = _http(url, inputs, k, clients, max_requests=20 * len(inputs), max_seconds=max_seconds)

    teacher = engine.teacher()  # the decoder(s) + LoRA at the run's settings, one per teacher checkpoint
    # every store preloaded and corrected: favours the exact path
    parts = [(w / teacher.weight, worker, tf, tf.pool(raw_rows(store))) for w, worker, store, tf in teacher.parts]
    store = teacher.parts[0][2]
    ids = np.asarray(teacher.ids)
    lat_c, top_c = [], []
    for r in recs:
        t0 = time.perf_counter()
        s = 0.0
        ex, _ = tokenize_records([r], parts[0][1].decoder.tokenizer, cfg.data.max_length, cfg.data.chat_template)
        for w, worker, tf, G in parts:
            s = s + w * (G @ tf.query(worker.vectors(ex)[0])[0])  # (n_pool,)
        top = ids[np.argsort(-s)[:k]]
        lat_c.append(1000 * (time.perf_counter() - t0))
        top_c.append(list(top))
    recall = float(np.mean([len(set(a) & set(c)) / k for a, c in zip(top_a, top_c)]))
    a, c = _pcts(lat_a), _pcts(lat_c)
    n_index, n_store = engine.count, store.n
    return {
        "index": str(idx), "pool": n_index, "queries": len(inputs), "k": k, "factory": engine.manifest["factory"],
        "engine": {**a, "batched_ms_per_query": round(batched, 2)},
        "http": http,
        "exact_gradient": {**c, "decoder": cfg.model.name},
        "speedup_exact_over_engine_p50": round(c["p50_ms"] / a["p50_ms"], 1),
        f"recall@{k}_engine_vs_exact": round(recall, 3),
        "bytes_per_example": {"index": round(sum((idx / f).stat().st_size for f in ("faiss.index", "records.parquet")) / max(n_index, 1)),
                              "gradient_store": round(sum(_bytes(st.path) for _, _, st, _ in teacher.parts) / max(n_store, 1)),
                              "encoder_once_mb": round(_bytes(idx / "encoder") / 2**20, 1) if (idx / "encoder").exists() else None},
        "scaling": _scaling(engine.manifest["dim"], scale or [100_000, 1_000_000]),
    }
