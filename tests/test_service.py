import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn

from influcoder.config import ServiceConfig
from influcoder.data import Record
from influcoder.engine import Engine
from influcoder.index_build import add_records, build_index, remove_ids
from influcoder.service import create_app

LIMITS = ServiceConfig(max_body_bytes=20_000, max_batch=8, max_text_chars=500, max_k=50)


@contextmanager
def running(app):
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and t.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=10)


@pytest.fixture(scope="module")
def cfg(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def index_dir(cfg, tmp_path_factory):
    return build_index(cfg, out=tmp_path_factory.mktemp("service") / "tiny")


@pytest.fixture(scope="module")
def engine(index_dir):
    return Engine.load(index_dir)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(engine, limits=LIMITS)) as base:
        yield base


INPUTS = [{"text": "You are an idiot, look it up yourself."}, {"prompt": "How long should I boil an egg?", "response": "About ten minutes."},
          {"text": "What is compound interest?"}]


def test_server_answers_like_the_engine(url, engine):
    r = httpx.post(f"{url}/v1/attribute", json={"inputs": INPUTS, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"]["build_id"] == engine.build_id
    want = engine.attribute(INPUTS, k=7)
    for got, exp in zip(body["answers"], want):
        assert [h["id"] for h in got["results"]] == [h["id"] for h in exp["results"]]
        assert np.allclose([h["score"] for h in got["results"]], [h["score"] for h in exp["results"]], atol=1e-5)
        assert got["results"][0]["metadata"] == exp["results"][0]["metadata"] and got["ood"] == exp["ood"]
    r = httpx.post(f"{url}/v1/flag", json={"examples": INPUTS[:1], "k": 5})  # one example: its plain nearest neighbours
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [h["id"] for h in engine.attribute(INPUTS[:1], k=5)[0]["results"]]
    r = httpx.post(f"{url}/v1/attribute", json={"inputs": INPUTS[:1], "k": 5, "rerank": True, "rerank_k": 10})
    assert r.status_code == 200 and r.json()["answers"][0]["results"][0]["score_kind"] == "teacher"


def test_examples_index_probes_and_docs(url, engine):
    some = engine.records.column("id")[3].as_py()
    r = httpx.get(f"{url}/v1/examples/{some}")
    assert r.status_code == 200 and r.json() == engine.example(some)
    r = httpx.get(f"{url}/v1/examples/no-such-id")
    assert r.status_code == 404 and r.json()["error"]["field"] == "example_id"
    info = httpx.get(f"{url}/v1/index").json()
    assert info["count"] == 192 and info["factory"] == "Flat" and "reference" not in info["ood"]
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{url}/readyz").json()["build_id"] == engine.build_id
    assert httpx.get(f"{url}/docs").status_code == 200
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/v1/attribute", "/v1/flag", "/v1/examples/{example_id}", "/v1/index", "/v1/admin/reload"} <= set(paths)


BAD = [
    ({}, 422, "inputs"),                                            # missing field
    ({"inputs": []}, 422, "inputs"),                                # empty batch
    ({"inputs": [{"text": "a"}] * 9}, 422, "inputs"),               # batch over max_batch
    ({"inputs": [{"text": 5}]}, 422, "inputs.0.text"),              # wrong type
    ({"inputs": "hello"}, 422, "inputs"),                           # wrong type
    ({"inputs": [{"prompt": "only a prompt"}]}, 422, "inputs.0.response"),
    ({"inputs": [{"text": "a", "prompt": "b", "response": "c"}]}, 422, "inputs.0.text"),
    ({"inputs": [{"text": ""}]}, 422, "inputs.0.text"),             # empty text
    ({"inputs": [{"text": "x" * 501}]}, 422, "inputs.0.text"),      # text over the limit
    ({"inputs": [{"text": "a"}], "k": 0}, 422, "k"),                # k out of range
    ({"inputs": [{"text": "a"}], "k": 51}, 422, "k"),
    ({"inputs": [{"text": "a"}], "k": "ten"}, 422, "k"),
    ({"inputs": [{"text": "a"}], "rerank": "yes"}, 422, "rerank"),
    ({"inputs": [{"text": "a", "colour": "red"}]}, 422, "inputs.0.colour"),  # unknown field
    ([1, 2], 422, "body"),                                          # not an object
]


@pytest.mark.parametrize("body,status,field", BAD)
def test_bad_attribute_requests_name_the_field(url, body, status, field):
    r = httpx.post(f"{url}/v1/attribute", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["status"] == status and err["message"]


def test_flag_scores_the_index_like_the_batch_filter(url, engine, cfg, tmp_path):
    """/v1/flag = the batch filter's score (filtering.Scorer) over every pool row; HNSW agrees via exact re-scoring."""
    from influcoder.data import load_records
    from influcoder.engine import input_record
    from influcoder.filter_index import flag_index
    from influcoder.filtering import Scorer
    from influcoder.index import embed

    beh, ref = INPUTS[:2], [{"text": "Roll soft clothes to save space in a suitcase."}]
    body = {"examples": beh, "reference": ref, "k": 10, "aggregate": "topm", "top_m": 1}
    r = httpx.post(f"{url}/v1/flag", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["exact"] is True and got["n_examples"] == 2 and got["n_reference"] == 1 and got["aggregate"] == "topm"
    pool = load_records(cfg.data)[0]
    X = embed(engine.model, [x.as_text() for x in pool], engine.prompts["document"])
    B = engine.embed_queries([input_record(x, i).as_text() for i, x in enumerate(beh)])
    R = engine.embed_queries([input_record(x).as_text() for x in ref])
    want = Scorer(B, R, "topm", 1).score(X)
    by_id = {x.id: i for i, x in enumerate(pool)}
    top = np.sort(want["score"])[::-1][:10]
    assert np.allclose([h["score"] for h in got["results"]], top, atol=1e-4)
    for h in got["results"]:
        i = by_id[h["id"]]
        assert abs(h["score"] - want["score"][i]) < 1e-4 and abs(h["reference_score"] - want["reference"][i]) < 1e-4
        assert h["top_behaviours"][0]["example"] == int(want["top_idx"][i][0]) and h["rank"] >= 1
    T = float((top[3] + top[4]) / 2)
    r = httpx.post(f"{url}/v1/flag", json={**body, "threshold": T})
    assert len(r.json()["results"]) == 4 and r.json()["n_at_or_above_threshold"] == 4
    hnsw = Engine.load(build_index(cfg, factory="HNSW32", out=tmp_path / "hnsw"))
    approx = flag_index(hnsw, B, R, 10, "topm", 1)  # candidates cover the 192-row pool: the same rows
    assert approx["exact"] is False and [h["id"] for h in approx["results"]] == [h["id"] for h in got["results"]]


def test_bad_flag_requests_invalid_json_and_oversized_bodies(url):
    r = httpx.post(f"{url}/v1/flag", json={"examples": [{"text": "a"}], "aggregate": "median"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "aggregate"
    for extra, field in [({"reference": [{"text": ""}]}, "reference.0.text"), ({"top_m": 0}, "top_m"),
                         ({"threshold": "high"}, "threshold"), ({"threshold": 3}, "threshold")]:
        r = httpx.post(f"{url}/v1/flag", json={"examples": [{"text": "a"}], **extra})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (extra, r.text)
    r = httpx.post(f"{url}/v1/flag", json={"examples": []})
    assert r.status_code == 422 and r.json()["error"]["field"] == "examples"
    r = httpx.post(f"{url}/v1/attribute", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == {**r.json()["error"], "code": "invalid_json", "field": "body"}
    big = json.dumps({"inputs": [{"text": "a" * 400}] * 60}).encode()  # valid, but over max_body_bytes
    r = httpx.post(f"{url}/v1/attribute", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks():  # no Content-Length: counted while streaming
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = httpx.post(f"{url}/v1/attribute", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    ok = json.dumps({"inputs": [{"text": "a"}]}).encode()
    r = httpx.post(f"{url}/v1/attribute", content=iter([ok[:5], ok[5:]]), headers={"content-type": "application/json"})
    assert r.status_code == 200


def test_api_key_is_enforced_when_set(engine):
    with running(create_app(engine, api_key="s3cret", limits=LIMITS)) as base:
        body = {"inputs": [{"text": "hello"}], "k": 2}
        for headers in ({}, {"X-API-Key": "wrong"}):
            r = httpx.post(f"{base}/v1/attribute", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["field"] == "X-API-Key"
        assert httpx.get(f"{base}/v1/index").status_code == 401
        assert httpx.post(f"{base}/v1/admin/reload").status_code == 401
        assert httpx.post(f"{base}/v1/attribute", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200  # probes stay open


def test_reload_under_load_drops_no_request(index_dir, tmp_path):
    d = tmp_path / "live"
    shutil.copytree(index_dir, d)
    eng = Engine.load(d)
    first = eng.build_id
    text = "Zebra quartz xylophone fjord: a brand new training example."
    stop, results, errors = threading.Event(), [], []

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/attribute", json={"inputs": [{"text": text}, INPUTS[i % 3]], "k": 3})
                    results.append((r.status_code, r.json()["index"]["build_id"] if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:  # a dropped connection counts as a failure
                    errors.append(repr(e))

    app = create_app(eng, limits=LIMITS)
    with running(app) as base:
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(client, i) for i in range(6)]
            time.sleep(0.3)
            add_records(d, [Record("zebra", text=text)])
            r1 = httpx.post(f"{base}/v1/admin/reload", timeout=60)
            time.sleep(0.3)
            remove_ids(d, ["demo-00005"])
            r2 = httpx.post(f"{base}/v1/admin/reload", timeout=60)
            time.sleep(0.3)
            stop.set()
            for f in futs:
                f.result()
        assert r1.status_code == 200 and r1.json()["previous_build_id"] == first and r1.json()["count"] == 193
        assert r2.status_code == 200 and r2.json()["count"] == 192
        assert not errors and len(results) >= 30 and all(s == 200 for s, _ in results), (errors, results[:3])
        assert {b for _, b in results} >= {first, r2.json()["build_id"]}
        top = httpx.post(f"{base}/v1/attribute", json={"inputs": [{"text": text}], "k": 1}).json()
        assert top["index"]["build_id"] == r2.json()["build_id"] and top["answers"][0]["results"][0]["id"] == "zebra"
        assert httpx.get(f"{base}/v1/examples/demo-00005").status_code == 404
        print("passes", app.state.batcher.passes, "requests", len(results))
        assert app.state.batcher.passes < len(results)  # concurrent requests shared encoder passes


def test_serve_refuses_a_public_address_without_a_key(index_dir):
    import typer
    from typer.testing import CliRunner

    from influcoder.cli_index import is_loopback, serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    app = typer.Typer()
    app.command("serve")(serve)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, ["serve", "--index", str(index_dir), "--host", "0.0.0.0", "--port", "1"], env={"INFLUCODER_API_KEY": ""})
    assert res.exit_code == 2 and "refusing" in res.output


def test_failed_reload_keeps_serving_and_rerank_without_a_run_is_409(engine, index_dir, tmp_path):
    def broken():
        raise RuntimeError("index folder is gone (injected)")

    with running(create_app(engine, limits=LIMITS, loader=broken)) as base:
        r = httpx.post(f"{base}/v1/admin/reload")
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/attribute", json={"inputs": INPUTS[:1]}).status_code == 200
        r = httpx.get(f"{base}/v2/nothing")
        assert r.status_code == 404 and r.json()["error"]["field"] == "path"
    moved = Engine.load(index_dir, run_dir=tmp_path / "no-run")
    with running(create_app(moved, api_key="k", limits=LIMITS)) as base:
        r = httpx.post(f"{base}/v1/attribute", json={"inputs": INPUTS[:1], "rerank": True}, headers={"X-API-Key": "k"})
        assert r.status_code == 409 and r.json()["error"]["field"] == "rerank"
        assert "api_key" not in httpx.get(f"{base}/v1/index", headers={"X-API-Key": "k"}).json()["run"]["config"]["service"]


def test_serve_process_reloads_on_sighup(index_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    d = tmp_path / "served"
    shutil.copytree(index_dir, d)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INFLUCODER_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "influcoder.cli_index", "serve", "--index", str(d), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> dict | None:
        try:
            r = httpx.get(f"{base}/readyz", timeout=2)
            return r.json() if r.status_code == 200 else None
        except httpx.HTTPError:
            return None

    try:
        deadline = time.time() + 60
        while (first := ready()) is None:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
        add_records(d, [Record("hup-1", text="added before SIGHUP")])
        proc.send_signal(signal.SIGHUP)
        while (now := ready()) is None or now["build_id"] == first["build_id"]:
            assert time.time() < deadline
            time.sleep(0.1)
        assert now["count"] == first["count"] + 1 and httpx.get(f"{base}/v1/examples/hup-1").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
