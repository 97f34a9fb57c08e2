"""Where the batch filter draws the line: a budget, a fixed score, or a threshold calibrated on
canaries to reach a target precision. Scores are compared in float64, so `score ≥ T` is exact for
the float32 scores the filter stores and the JSON values it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODES = ("budget", "threshold", "precision")


class FilterError(ValueError):
    """Settings or inputs the filter cannot work with; the message says which and why."""


def calibrate(dataset: np.ndarray, canaries: np.ndarray, target: float, ratio: float = 1.0, seed: int = 0) -> dict:
    """The lowest threshold t whose precision on the calibration set reaches `target`.

    Calibration set: the canaries (known-bad examples, scored like dataset rows) are the positives;
    round(ratio × #canaries) dataset rows drawn at random (seeded; all rows when that is more than
    there are) are *presumed negative*. precision(t) = #canaries ≥ t / (#canaries ≥ t + #sampled
    rows ≥ t); candidate thresholds are the canary scores. Assumptions: the canaries score like the
    real bad rows, and the sample is (mostly) clean. A bad row hidden in the sample counts as a false
    positive, so the estimate is conservative for this mix; at ratio 1 (balanced) it is a property of
    the scores, not of the dataset's bad share: with few bad rows, the precision of the flagged
    dataset rows is lower. Raise `ratio` toward rows/canaries to measure at the dataset's own mix."""
    d = np.asarray(dataset, np.float64)
    k = int(round(ratio * len(canaries)))
    if 0 < k < len(d):
        d = d[np.random.default_rng(seed).choice(len(d), k, replace=False)]
    c = np.sort(np.asarray(canaries, np.float64))
    ds = np.sort(d)
    tp = len(c) - np.searchsorted(c, c, side="left")  # canaries ≥ each candidate
    fp = len(ds) - np.searchsorted(ds, c, side="left")
    prec = tp / (tp + fp)
    ok = np.nonzero(prec >= target)[0]
    info = {"n_canaries": int(len(c)), "n_presumed_negatives": int(len(ds)), "ratio": ratio, "seed": seed, "target_precision": target,
            "definition": "precision(t) = canaries ≥ t / (canaries ≥ t + presumed-negative dataset rows ≥ t); presumed negatives: "
                          "round(ratio × canaries) dataset rows drawn at random (numpy default_rng(seed).choice over rows in file order); "
                          "the lowest canary score reaching the target"}
    if not len(ok):
        best = int(np.argmax(prec))
        raise FilterError(f"no threshold reaches precision {target} on the canary calibration: the best is {prec[best]:.3f} "
                          f"at threshold {c[best]:.4f} (catching {tp[best]} of {len(c)} canaries); lower --target-precision, "
                          f"or give behaviour/reference examples that separate better")
    i = int(ok[0])
    return {**info, "threshold": float(c[i]), "precision": float(prec[i]), "canary_recall": float(tp[i] / len(c)),
            "presumed_negatives_above": int(fp[i])}


def decide(scores: np.ndarray, mode: str, value: float, canary_scores: np.ndarray | None = None,
           ratio: float = 1.0, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(flag mask, threshold info). Scores are compared in float64 so `score ≥ T` is exact."""
    s = np.asarray(scores, np.float64)
    mask = np.zeros(len(s), bool)
    if mode == "budget":
        n_flag = int(round(value * len(s)))
        order = np.argsort(-s, kind="stable")  # ties: earlier rows first
        mask[order[:n_flag]] = True
        t = float(s[order[n_flag - 1]]) if n_flag else None
        ties = int(((s == t) & ~mask).sum()) if t is not None else 0
        return mask, {"mode": mode, "budget": value, "n_target": n_flag, "threshold": t, "tied_rows_kept": ties}
    if mode == "threshold":
        mask = s >= value
        return mask, {"mode": mode, "threshold": float(value)}
    if mode == "precision":
        cal = calibrate(s, canary_scores if canary_scores is not None else np.zeros(0), value, ratio, seed)
        return s >= cal["threshold"], {"mode": mode, "threshold": cal["threshold"], "calibration": cal}
    raise FilterError(f"unknown threshold mode {mode!r}; use one of {MODES}")


def check_decision(mode: str, value: float, canaries: Path | None) -> None:
    if mode == "budget" and not 0.0 <= value <= 1.0:
        raise FilterError(f"--budget must be a share between 0 and 1, got {value}")
    if mode == "threshold" and not np.isfinite(value):
        raise FilterError(f"--threshold must be a finite number, got {value}")
    if mode == "precision":
        if not 0.0 < value <= 1.0:
            raise FilterError(f"--target-precision must be in (0, 1], got {value}")
        if canaries is None:
            raise FilterError("--target-precision needs --canaries (known-bad examples to calibrate on)")
    if mode not in MODES:
        raise FilterError(f"unknown threshold mode {mode!r}; use one of {MODES}")
