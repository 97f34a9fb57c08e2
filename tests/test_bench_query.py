"""`bench query` runs end to end on the tiny run (the numbers themselves are for the README)."""

from influcoder.bench_query import query_bench
from influcoder.index_build import build_index


def test_query_bench_reports_every_path(tiny_pipeline):
    cfg = tiny_pipeline
    build_index(cfg)
    res = query_bench(cfg, n_queries=6, k=5, clients=2, max_seconds=5, scale=[3000])
    assert res["queries"] == 6 and res["engine"]["n"] == 6 and res["exact_gradient"]["n"] == 6
    assert res["http"]["n"] > 0 and res["http"]["queries_per_s"] > 0
    assert 0 <= res["recall@5_engine_vs_exact"] <= 1 and res["speedup_exact_over_engine_p50"] > 0
    b = res["bytes_per_example"]
    assert b["index"] > 0 and b["gradient_store"] > 0
    assert {(s["rows"], s["factory"].split(",")[0][:3]) for s in res["scaling"]} == {(3000, "Fla"), (3000, "IVF")}
