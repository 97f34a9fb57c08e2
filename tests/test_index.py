import json
import shutil
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from influcoder.config import IndexConfig
from influcoder.data import Record
from influcoder.index import FILES, IndexStoreError, _without, auto_factory, dir_sha256, make_index, open_index, read_manifest, search, stored_ids
from influcoder.index_build import add_records, build_index, remove_ids


@pytest.fixture(scope="module")
def cfg(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def built(cfg):
    return build_index(cfg)


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built index, for tests that change it."""
    d = tmp_path / "idx"
    shutil.copytree(built, d)
    return d


def test_build_writes_a_complete_index(cfg, built):
    from influcoder.data import load_records
    from influcoder.distill import encoder_path

    assert built == Path(cfg.index.root) / "tiny"
    assert {p.name for p in built.iterdir()} == set(FILES) | {"encoder"}
    m = read_manifest(built)
    pool = load_records(cfg.data)[0]
    assert m["count"] == len(pool) == 192 and m["factory"] == "Flat" and m["factory_requested"] == "auto"
    assert m["encoder"]["sha256"] == dir_sha256(encoder_path(cfg)) == dir_sha256(built / "encoder")
    assert m["encoder"]["prompts"] == {"query": cfg.student.query_prompt, "document": cfg.student.document_prompt}
    assert m["run"]["gradients"]["sketch"]["dim"] == cfg.gradients.dim and m["run"]["teacher"]["n_anchors"] == 88
    assert m["run"]["fidelity"]["student"]["per_anchor_spearman"] > 0
    ref = m["ood"]["reference"]
    assert len(ref) == 88 and ref == sorted(ref)
    table = pq.read_table(built / "records.parquet")
    assert table.column("id").to_pylist() == [r.id for r in pool]
    row = table.slice(0, 1).to_pylist()[0]
    assert json.loads(row["metadata"]) == pool[0].meta and row["source"] == pool[0].source
    assert row["preview"] == pool[0].as_text()[: cfg.index.preview_chars]
    v = open_index(built)
    assert v.read_mode.startswith("mmap") and v.index.ntotal == 192


def test_auto_factory_grows_with_the_pool():
    ic = IndexConfig()
    assert auto_factory(5_000, ic) == "Flat"
    assert auto_factory(500_000, ic) == "HNSW32"
    assert auto_factory(10_000_000, ic).startswith("IVF") and auto_factory(10_000_000, ic).endswith(",SQ8")


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_remove_keeps_other_rows_for_every_kind(factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 16)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ix = make_index(factory, 16, X)
    ix.add_with_ids(X, np.arange(300) + 1000)
    if factory.startswith("IVF"):
        faiss.extract_index_ivf(ix).nprobe = 4  # every list: exact
    drop = np.array([1000, 1005, 1299])
    ix = _without(ix, factory, drop)
    assert ix.ntotal == 297 and set(stored_ids(ix).tolist()) == set(range(1000, 1300)) - set(drop.tolist())
    D, I = search(ix, X[[0, 1, 5]], 1)
    assert I[1, 0] == 1001 and I[0, 0] != 1000 and I[2, 0] != 1005


def test_flat_and_hnsw_agree_on_top10(cfg, built, tmp_path):
    from influcoder.engine import Engine

    hnsw = build_index(cfg, factory="HNSW32", out=tmp_path / "hnsw")
    assert read_manifest(hnsw)["factory"] == "HNSW32"
    flat, approx = Engine.load(built), Engine.load(hnsw)
    queries = [{"text": r} for r in ["You are an idiot.", "How do I boil an egg?", "What is compound interest?", "pack a suitcase"]]
    for a, b in zip(flat.attribute(queries, k=10), approx.attribute(queries, k=10)):
        assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
        assert np.allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]], atol=1e-5)


def test_add_and_remove_change_results(copy):
    from influcoder.engine import Engine

    text = "Zebra quartz xylophone: the vault password is fjord-42."
    before = Engine.load(copy)
    old_top = before.attribute([{"text": "How do I boil an egg?"}], k=2)[0]["results"]
    m = add_records(copy, [Record("new-1", text=text, meta={"lang": "en"}, source="new.jsonl:1")])
    assert m["count"] == 193 and m["build_id"] != before.build_id and m["history"][-1]["op"] == "add"
    eng = Engine.load(copy)
    top = eng.attribute([{"text": text}], k=3)[0]["results"][0]
    assert top["id"] == "new-1" and top["metadata"] == {"lang": "en"} and top["source"] == "new.jsonl:1"
    assert eng.example("new-1")["preview"] == text
    with pytest.raises(IndexStoreError, match="already in the index"):
        add_records(copy, [Record("new-1", text="again")])

    out = remove_ids(copy, ["new-1", old_top[0]["id"]])
    assert out["removed"] == 2 and out["count"] == 191
    eng = Engine.load(copy)
    assert eng.example("new-1") is None and eng.example(old_top[0]["id"]) is None
    assert "new-1" not in [h["id"] for h in eng.attribute([{"text": text}], k=10)[0]["results"]]
    assert eng.attribute([{"text": "How do I boil an egg?"}], k=1)[0]["results"][0]["id"] == old_top[1]["id"]
    v = open_index(copy)
    assert v.index.ntotal == v.records.num_rows == 191
    assert set(stored_ids(faiss.read_index(str(copy / "faiss.index"))).tolist()) == set(v.records.column("fid").to_pylist())
    with pytest.raises(IndexStoreError, match="not in the index.*nope"):
        remove_ids(copy, ["nope"])
    assert remove_ids(copy, ["nope"], missing_ok=True)["missing"] == ["nope"]


def test_concurrent_writers_do_not_lose_changes(copy):
    threads = [threading.Thread(target=add_records, args=(copy, [Record(f"c-{i}", text=f"concurrent {i}")])) for i in range(3)]
    threads.append(threading.Thread(target=remove_ids, args=(copy, ["demo-00010"])))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = open_index(copy)
    ids = set(v.records.column("id").to_pylist())
    assert v.index.ntotal == 194 and {"c-0", "c-1", "c-2"} <= ids and "demo-00010" not in ids
    assert len(set(v.records.column("fid").to_pylist())) == 194


def test_failed_build_leaves_the_old_index_and_no_temp_folder(cfg, copy, monkeypatch):
    import influcoder.index_build as index_mod  # where build_index looks it up

    old = read_manifest(copy)["build_id"]

    def broken(tmp, index, table, manifest):
        faiss.write_index(index, str(tmp / "faiss.index"))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(index_mod, "_write_version", broken)
    with pytest.raises(OSError, match="injected"):
        build_index(cfg, out=copy)
    with pytest.raises(OSError, match="injected"):
        remove_ids(copy, ["demo-00001"])
    assert read_manifest(copy)["build_id"] == old and open_index(copy).index.ntotal == 192
    assert [p.name for p in copy.parent.iterdir() if p.name != ".idx.lock"] == ["idx"]


def test_a_polling_reader_never_sees_a_partial_index(cfg, copy):
    seen, bad, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            if copy.exists():
                try:
                    names = {p.name for p in copy.iterdir()}
                except FileNotFoundError:
                    continue  # renamed away between exists() and iterdir()
                if names and names != set(FILES) | {"encoder"}:
                    bad.append(sorted(names))
            v = open_index(copy)
            seen.add((v.manifest["build_id"], v.index.ntotal, v.records.num_rows))

    t = threading.Thread(target=reader)
    t.start()
    try:
        build_index(cfg, out=copy)
        add_records(copy, [Record(f"x-{i}", text=f"extra example {i}") for i in range(3)])
        remove_ids(copy, ["x-0", "demo-00003"])
        time.sleep(0.05)
    finally:
        stop.set()
        t.join()
    assert not bad
    assert all(n == r for _, n, r in seen) and len({b for b, _, _ in seen}) >= 2
    assert not [p for p in copy.parent.iterdir() if p.name not in ("idx", ".idx.lock")]


def _cli() -> typer.Typer:
    from influcoder.cli_index import index_app, query, serve

    app = typer.Typer()
    app.add_typer(index_app, name="index")
    app.command("query")(query)
    app.command("serve")(serve)
    return app


def test_cli_build_info_query_add_remove(root, cfg, tmp_path):
    from influcoder.engine import Engine

    app, run = _cli(), CliRunner()
    out = tmp_path / "cli-idx"
    res = run.invoke(app, ["index", "build", str(root / "configs" / "tiny.yaml"), "--set", f"out_dir={cfg.out_dir}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["count"] == 192
    res = run.invoke(app, ["index", "info", "--index", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["factory"] == "Flat"
    assert "count" in run.invoke(app, ["index", "info", "--index", str(out)]).output

    res = run.invoke(app, ["query", "--index", str(out), "--json", "-k", "4", "You are an idiot."])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["answers"][0]["results"]
    want = Engine.load(out).attribute([{"text": "You are an idiot."}], k=4)[0]["results"]
    assert [h["id"] for h in got] == [h["id"] for h in want]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"prompt": "How do I boil an egg?", "response": "Ask someone else, idiot."}) + "\n")
    res = run.invoke(app, ["query", "--index", str(out), "--file", str(qfile), "-k", "3"])
    assert res.exit_code == 0 and "rank" in res.output

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "n1", "text": "brand new example"}) + "\n" + json.dumps({"id": "n2", "prompt": "p", "response": "r"}) + "\n")
    res = run.invoke(app, ["index", "add", "--index", str(out), str(new)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["count"] == 194
    res = run.invoke(app, ["index", "remove", "--index", str(out), "--ids", "n1,n2", "--ids", "demo-00000"])
    assert res.exit_code == 0 and json.loads(res.stdout)["count"] == 191
    res = run.invoke(app, ["index", "remove", "--index", str(out), "--ids", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = run.invoke(app, ["query", "--index", str(tmp_path / "missing"), "x"])
    assert res.exit_code == 2 and "no index" in res.output


def test_build_from_an_embedding_store_equals_embedding_here(cfg, built, tmp_path):
    from influcoder.distill import encoder_path
    from influcoder.embed import embed_pool
    from influcoder.engine import Engine

    store = tmp_path / "emb.zarr"
    embed_pool(cfg, str(encoder_path(cfg)), store, cfg.student.document_prompt, shard_size=50, progress=False, num_workers=0)
    d = build_index(cfg, out=tmp_path / "from-store", embeddings=store)
    a, b = Engine.load(built), Engine.load(d)
    q = [{"text": "How do I boil an egg?"}, {"text": "You are an idiot."}]
    for x, y in zip(a.attribute(q, k=10), b.attribute(q, k=10)):
        assert [h["id"] for h in x["results"]] == [h["id"] for h in y["results"]]
    wrong = tmp_path / "wrong.zarr"
    embed_pool(cfg, str(encoder_path(cfg)), wrong, "query: ", shard_size=50, progress=False, num_workers=0)
    with pytest.raises(IndexStoreError, match="another encoder or prompt"):
        build_index(cfg, out=tmp_path / "bad", embeddings=wrong)
