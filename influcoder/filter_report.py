"""The batch filter's audit trail: scores.parquet, report.json and a self-contained report.html
(summary, score histogram as an embedded PNG, planted-label evaluation, calibration, the top
flagged examples with the behaviours that implicated them, bad rows, settings, timings)."""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .data import LoadReport, Record
from .metrics import auprc, precision_at_k, recall_of_planted_at_k

BINS = 50
SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("score", pa.float64()), ("behaviour_score", pa.float64()),
                    ("reference_score", pa.float64()), ("bm25_score", pa.float64()), ("flagged", pa.bool_())])


class ScoresWriter:
    """scores.parquet, one row group per chunk: row (0-based among good rows), id, scores, decision.
    `score` is what the decision ranked (the fused score under filter.fusion, else behaviour − reference);
    `bm25_score` is null without fusion."""

    def __init__(self, path: Path):
        self.w = pq.ParquetWriter(str(path), SCHEMA)
        self.at = 0

    def write(self, ids: list[str], score: np.ndarray, beh: np.ndarray, ref: np.ndarray, flagged: np.ndarray,
              bm25: np.ndarray | None = None) -> None:
        n = len(ids)
        lex = pa.nulls(n, pa.float64()) if bm25 is None else pa.array(np.asarray(bm25, np.float64))
        self.w.write_table(pa.table({"row": np.arange(self.at, self.at + n, dtype=np.int64), "id": ids,
                                     "score": np.asarray(score, np.float64), "behaviour_score": np.asarray(beh, np.float64),
                                     "reference_score": np.asarray(ref, np.float64), "bm25_score": lex, "flagged": np.asarray(flagged, bool)}, SCHEMA))
        self.at += n

    def close(self) -> None:
        self.w.close()


def top_flagged_rows(scores: np.ndarray, mask: np.ndarray, n: int) -> list[int]:
    """Rows of the n highest-scoring flagged examples, best first (ties by row)."""
    rows = np.nonzero(mask)[0]
    order = np.lexsort((rows, -np.asarray(scores, np.float64)[rows]))[:n]
    return [int(r) for r in rows[order]]


def _r(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def distribution(scores: np.ndarray, mask: np.ndarray) -> dict:
    s = np.asarray(scores, np.float64)
    lo, hi = float(s.min()), float(s.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, BINS + 1)
    qs = (1, 5, 10, 25, 50, 75, 90, 95, 99)
    return {"n": int(len(s)), "min": _r(lo), "max": _r(hi), "mean": _r(s.mean()), "std": _r(s.std()),
            "quantiles": {f"p{q}": _r(v) for q, v in zip(qs, np.percentile(s, qs))},
            "histogram": {"edges": [_r(e) for e in edges], "all": np.histogram(s, edges)[0].tolist(),
                          "flagged": np.histogram(s[mask], edges)[0].tolist()}}


def evaluation(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray, field: str,
               parts: dict[str, np.ndarray] | None = None) -> dict | None:
    """Known labels on every row (e.g. the demo's `planted`): how well the flags find them; with a
    fused score, also each part's AUPRC alone."""
    lab = np.asarray(labels)
    if not len(lab) or (lab < 0).any() or not lab.any():
        return None
    pos, n_flag = lab.astype(bool), int(mask.sum())
    ap = auprc(pos, scores)
    base = float(pos.mean())
    return {"label_field": field, "n_positive": int(pos.sum()), "base_rate": _r(base), "auprc": _r(ap),
            "auprc_over_base_rate": _r(ap / base), "flagged_precision": _r(float(pos[mask].mean()) if n_flag else 0.0),
            "flagged_recall": _r(float(pos[mask].sum() / pos.sum())),
            "precision_at_n_positive": _r(precision_at_k(pos, scores, int(pos.sum()))),
            "recall_at_n_positive": _r(recall_of_planted_at_k(pos, scores, int(pos.sum()))),
            **({"auprc_of_parts": {k: _r(auprc(pos, v)) for k, v in parts.items()}} if parts else {})}


def build(*, settings: dict, source: dict, run: Any, value: float, scores: np.ndarray, mask: np.ndarray, labels: np.ndarray,
          decision: dict, load: LoadReport, timings: dict, top: list[dict], behaviours: list[Record],
          canary_scores: np.ndarray | None, parts: dict[str, np.ndarray] | None = None) -> dict:
    n, n_flag = len(scores), int(mask.sum())
    dec = json.loads(json.dumps(decision, default=float))
    if canary_scores is not None:
        dec["calibration"]["canary_scores"] = {"min": _r(canary_scores.min()), "median": _r(np.median(canary_scores)),
                                               "max": _r(canary_scores.max())}
    return {
        "tool": "influcoder filter", "influcoder_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scoring": settings["scoring"],
        "counts": {"rows_read": n + load.n_bad, "rows": n, "flagged": n_flag, "kept": n - n_flag,
                   "flagged_share": _r(n_flag / n), "bad_rows": load.n_bad},
        "bad_rows": load.bad,
        "threshold": dec,
        "distribution": distribution(scores, mask),
        "evaluation": evaluation(labels, scores, mask, settings["label_field"], parts),
        "settings": {**settings, "mode": run.mode, "value": value, "skip_bad_rows": run.skip_bad_rows,
                     "canaries": str(run.canaries) if run.canaries else None, "source": source},
        "outputs": {"kept": "kept.jsonl", "flagged": "flagged.jsonl", "scores": "scores.parquet", "report": "report.json",
                    "html": "report.html", "added_fields": ["_influcoder_score", "_influcoder_top_behaviours"]},
        "behaviours": [{"index": i, "id": r.id, "preview": r.as_text()[:200]} for i, r in enumerate(behaviours[:500])],
        "top_flagged": top,
        "timings": timings,
    }


def histogram_png(rep: dict) -> str:
    """Base64 PNG: kept and flagged rows per score bin (log count), with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = rep["distribution"]["histogram"]
    edges = np.asarray(h["edges"], float)
    allc, flag = np.asarray(h["all"]), np.asarray(h["flagged"])
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    w = np.diff(edges)
    ax.bar(edges[:-1], allc - flag, width=w, align="edge", color="#9aa5b1", label="kept")
    ax.bar(edges[:-1], flag, width=w, align="edge", bottom=allc - flag, color="#d64545", label="flagged")
    t = rep["threshold"].get("threshold")
    if t is not None:
        ax.axvline(t, color="black", linestyle="--", linewidth=1, label=f"threshold {t:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel("score (higher = more like the behaviour)")
    ax.set_ylabel("rows (log)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _kv(d: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items()) + "</table>"


def render_html(rep: dict) -> str:
    e = html.escape
    c, t = rep["counts"], rep["threshold"]
    parts = [f"<h1>influcoder filter: {c['flagged']} of {c['rows']} rows flagged</h1>",
             f"<p>{e(rep['scoring'])}.</p>",
             _kv({"rows read": c["rows_read"], "good rows": c["rows"], "flagged": f"{c['flagged']} ({100 * c['flagged_share']:.2f}%)",
                  "kept": c["kept"], "bad rows (skipped)": c["bad_rows"], "mode": t["mode"], "threshold": t.get("threshold"),
                  "dataset": rep["settings"]["dataset"]["path"], "behaviours": rep["settings"]["behaviours"]["n"],
                  "reference": (rep["settings"]["reference"] or {}).get("n", 0), "aggregate": rep["settings"]["aggregate"],
                  "encoder": json.dumps(rep["settings"]["source"])}),
             "<h2>Scores</h2>", f'<img alt="score histogram" src="data:image/png;base64,{histogram_png(rep)}">',
             _kv(rep["distribution"]["quantiles"])]
    if rep.get("evaluation"):
        parts += ["<h2>Against the known labels</h2>", _kv(rep["evaluation"])]
    if t.get("calibration"):
        parts += ["<h2>Canary calibration</h2>", _kv(t["calibration"])]
    def closest(x: dict) -> str:
        return "<br>".join(f"{e(b['id'])} ({b['score']:.3f})" for b in x["top_behaviours"])

    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{x['score']:.4f}</td><td>{e(x['id'])}<br><small>{e(x['source'])}</small></td>"
        f"<td class='t'>{e(x['text'])}</td><td>{closest(x)}</td></tr>" for i, x in enumerate(rep["top_flagged"]))
    parts += [f"<h2>Top {len(rep['top_flagged'])} flagged examples</h2>",
              f"<table><tr><th>#</th><th>score</th><th>id</th><th>example</th><th>closest behaviours (cosine)</th></tr>{rows}</table>"]
    if rep["bad_rows"]:
        parts += ["<h2>Bad rows</h2><ul>" + "".join(f"<li>{e(b)}</li>" for b in rep["bad_rows"]) + "</ul>"]
    parts += ["<h2>Timings</h2>", _kv(rep["timings"]),
              "<h2>Settings</h2>", f"<pre>{e(json.dumps(rep['settings'], indent=2, ensure_ascii=False))}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
             "td.t{white-space:pre-wrap;max-width:600px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>influcoder filter report</title><style>{style}</style></head>"
            f"<body>{''.join(parts)}</body></html>")


def write(folder: Path, rep: dict) -> None:
    (folder / "report.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "report.html").write_text(render_html(rep), encoding="utf-8")
