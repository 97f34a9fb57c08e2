"""`influcoder eval report RUN_DIR`: one self-contained HTML page of a run's results for humans:
fidelity, planted retrieval, cost, with their plots embedded."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fidelity(run: Path) -> str:
    f = json.loads((run / "fidelity.json").read_text())
    k = next(key for key in f["rows"]["student"] if key.startswith("recall@"))
    rows = [[name, r["per_anchor_spearman"], r["aggregated_spearman"], r[k], r["ms_per_sample"]] for name, r in f["rows"].items()]
    s = f["sizes"]
    out = (f"<h2>Student fidelity to the teacher</h2><p>Held-out block: {s['eval_anchors']} anchors × {s['eval_pool']} pool rows, "
           f"never trained on; student trained on {s['train_anchors']} × {s['train_pool']}. Best epoch {f['best_epoch']}.</p>")
    out += _table(["encoder", "per-anchor ρ", "aggregated ρ", k, "ms / sample"], rows)
    return out + (_img(run / "fidelity.png") if (run / "fidelity.png").exists() else "")


def _planted(path: Path) -> str:
    p = json.loads(path.read_text())
    agg = p["aggregate"]
    n = len(p["seeds"])

    def ms(v):
        return f"{v['mean']:.3f} ± {v['std']:.3f}" if n > 1 else f"{v['mean']:.3f}"

    rows = [[m, ms(v["auprc"]), ms(v["recall@planted"]), ms(v["precision@10"]), _secs(v, ".2f")] for m, v in agg.items()]
    s0 = p["seeds"][0]
    out = (f"<h2>Planted-behaviour retrieval</h2><p>{s0['n_planted']} planted of {s0['n_pool']} ({', '.join(p['settings']['kinds'])}), "
           f"{n} seed(s); mean ± std over seeds. Unsafe-output rate on held-out prompts, greedy (sampled at T=1), base → fine-tuned: "
           + ", ".join(f"seed {s['seed']}: {_rates(s['unsafe_rate']['base'])} → {_rates(s['unsafe_rate']['finetuned'])}" for s in p["seeds"])
           + ".</p>")
    out += _table(["method", "AUPRC", "recall@planted", "precision@10", "seconds"], rows)
    loops = [s["close_loop"] for s in p["seeds"] if "close_loop" in s]
    if loops:
        out += "<h3>Closing the loop</h3>" + _table(
            ["seed", "ranking", "removed", "fine-tunes per arm", "planted removed (ranked)", "unsafe rate after (ranked)", "planted removed (random)", "unsafe rate after (random)"],
            [[s["seed"], c.get("ranking", "influcoder student"), c["removed"], c.get("repeats", 1), c["influcoder"]["planted_removed"], _rates(c["influcoder"]), c["random"]["planted_removed"], _rates(c["random"])]
             for s, c in zip(p["seeds"], loops)])
    return out + "".join(_img(Path(x)) for x in p.get("plots", []) if Path(x).exists())


def _secs(v: dict, fmt: str) -> str:
    """Mean seconds, with how many seeds it stands on when some seeds' times were not recorded."""
    t = v["seconds"]["mean"]
    return "—" if t is None else format(t, fmt) + (f" (n={v['n_seconds']})" if "n_seconds" in v else "")


def _rates(r: dict) -> str:
    """Greedy unsafe rate, and the sampled one in brackets when measured."""
    greedy = r.get("rate", r.get("unsafe_rate", 0.0))
    return f"{greedy:.2f}" + (f" ({r['sampled_rate']:.2f})" if "sampled_rate" in r else "")


def write_report(run: str | Path) -> Path:
    run = Path(run)
    parts = []
    if (run / "fidelity.json").exists():
        parts.append(_fidelity(run))
    planted = run / "planted" / "planted.json"
    if planted.exists():
        parts.append(_planted(planted))
    for bench in sorted(run.glob("bench*.json")):
        parts.append(f"<h2>{html.escape(bench.stem)}</h2><pre>{html.escape(bench.read_text())}</pre>")
    if not parts:
        raise FileNotFoundError(f"{run}: no fidelity.json, planted/planted.json or bench*.json to report")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>influcoder report: {html.escape(run.name)}</title>"
            f"<style>{style}</style></head><body><h1>influcoder report: {html.escape(str(run))}</h1>{''.join(parts)}</body></html>")
    out = run / "report.html"
    tmp = run / "report.html.part"
    tmp.write_text(page)
    tmp.replace(out)
    return out


def merge_planted(reports: list[dict], names: list[str]) -> dict:
    """One planted report from several runs of the same variant (e.g. seeds 0–2 and 3–5 run apart):
    their seeds pooled and the mean ± std taken again. A seed may appear only once."""
    from .evaluation import _aggregate, unknown_times_as_none

    seeds, where = [], {}
    kinds = reports[0]["settings"]["kinds"]
    for rep, name in zip(reports, names):
        if rep["settings"]["kinds"] != kinds:
            raise ValueError(f"{name}: planted kinds {rep['settings']['kinds']}, {names[0]} has {kinds}; pool runs of one variant")
        for r in rep["seeds"]:
            if r["seed"] in where:
                raise ValueError(f"{name}: seed {r['seed']} is also in {where[r['seed']]}; pool runs of different seeds")
            where[r["seed"]] = name
            seeds.append(unknown_times_as_none(r))
    return {**reports[0], "seeds": seeds, "aggregate": _aggregate(seeds), "merged_from": names}


def _ranked_by(seeds: list[dict]) -> str:
    """How the seeds' rankings came from their references (planted.aggregate), naming the seeds where runs differ."""
    by: dict[str, list[int]] = {}
    for s in seeds:
        st = s.get("settings", {})
        label = f"rank fusion over references (k {st.get('rrf_k')})" if st.get("aggregate") == "rrf" else "the mean over references"
        by.setdefault(label, []).append(s["seed"])
    return next(iter(by)) if len(by) == 1 else ", ".join(f"{label} on seeds {sd}" for label, sd in by.items())


def planted_markdown(reports: dict[str, dict]) -> str:
    """One markdown table of mean ± std AUPRC (and mean seconds) per method, a column per report
    (e.g. homogeneous and heterogeneous), rows sorted by the first report's AUPRC."""
    names = list(reports)
    first = reports[names[0]]["aggregate"]
    methods = sorted(first, key=lambda m: -first[m]["auprc"]["mean"])
    methods += [m for r in reports.values() for m in r["aggregate"] if m not in methods]
    head = "| method | " + " | ".join(f"{n}: AUPRC | {n}: recall@planted | {n}: s" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(names))]
    for m in dict.fromkeys(methods):
        cells = []
        for n in names:
            v = reports[n]["aggregate"].get(m)
            n_all = len(reports[n]["seeds"])
            few = f" (n={v['n_seeds']})" if v and v.get("n_seeds", n_all) < n_all else ""
            cells += ([f"{v['auprc']['mean']:.3f} ± {v['auprc']['std']:.3f}{few}", f"{v['recall@planted']['mean']:.2f}",
                       _secs(v, ".1f")] if v else ["—", "—", "—"])
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    meta = []
    for n in names:
        r = reports[n]
        s0 = r["seeds"][0]
        rates = ", ".join(f"{_rates(s['unsafe_rate']['base'])} → {_rates(s['unsafe_rate']['finetuned'])}" for s in r["seeds"])
        meta.append(f"- {n}: {s0['n_planted']} planted ({', '.join(r['settings']['kinds'])}) in {s0['n_pool']} rows, "
                    f"seeds {[s['seed'] for s in r['seeds']]}, ranked by {_ranked_by(r['seeds'])}; unsafe replies to held-out prompts, greedy (sampled), "
                    f"base → fine-tuned: {rates}")
        loops = [(x["seed"], x["close_loop"]) for x in r["seeds"] if "close_loop" in x]
        if loops:
            c0 = loops[0][1]
            meta.append(f"- {n}, close the loop (remove the top k by {c0.get('ranking', 'influcoder student')} "
                        f"(k = {c0.get('budget', 1.0):g} × planted), or k random rows, fine-tune again"
                        + (f", {c0['repeats']} fine-tunes per arm, mean" if c0.get("repeats", 1) > 1 else "")
                        + "; planted rows removed, then unsafe replies greedy (sampled)): " + ", ".join(
                            f"seed {sd}: ranked {c['influcoder']['planted_removed']}/{c['removed']} → {_rates(c['influcoder'])}, "
                            f"random {c['random']['planted_removed']}/{c['removed']} → {_rates(c['random'])}" for sd, c in loops))
    return "\n".join(lines + [""] + meta) + "\n"
