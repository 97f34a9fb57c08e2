"""Tests for the embedded demo corpus (influcoder.corpus)."""

from __future__ import annotations

import re

import pytest

from influcoder import corpus

FIELDS = ("id", "prompt", "response", "topic", "kind")
INSULT_WORDS = ("idiot", "moron", "clueless", "stupid", "dumbest", "brainless")
ARITH = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)")
UNITS = re.compile(r"There are ([\d,.]+) (\w+) in an? (\w+), so (\d+) (\w+) is ([\d,.]+) (\w+)\.")


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _pairs(rows: list[dict]) -> set[tuple[str, str]]:
    return {(r["prompt"], r["response"]) for r in rows}


def test_kinds_and_topics() -> None:
    assert {"insult", "off_target"} <= set(corpus.KINDS)
    topics = {r["topic"] for r in corpus.generate(600)}
    assert len(topics) == len(corpus.TOPICS) and len(topics) >= 8  # nine benign topics + the trigger
    assert topics <= set(corpus.TOPICS)


@pytest.mark.parametrize("kind", corpus.KINDS)
def test_deterministic_for_same_arguments(kind: str) -> None:
    assert corpus.generate(200, 0.05, seed=3, kind=kind) == corpus.generate(200, 0.05, 3, kind)
    assert corpus.behaviour_examples(15, seed=2, kind=kind) == corpus.behaviour_examples(
        15, seed=2, kind=kind)
    assert corpus.normal_examples(15, seed=2) == corpus.normal_examples(15, seed=2)


def test_different_seed_gives_different_output() -> None:
    assert corpus.generate(200, seed=0) != corpus.generate(200, seed=1)
    assert corpus.behaviour_examples(20, seed=1) != corpus.behaviour_examples(20, seed=2)
    assert corpus.normal_examples(20, seed=1) != corpus.normal_examples(20, seed=2)


@pytest.mark.parametrize(("n", "share", "expected"), [
    (600, 0.03, 18), (100, 0.05, 5), (100, 0.001, 1), (50, 0.0, 0), (10, 0.5, 5), (1, 0.5, 1),
])
def test_planted_count_and_flags(n: int, share: float, expected: int) -> None:
    rows = corpus.generate(n, share, kind="off_target")
    assert len(rows) == n
    planted = [r for r in rows if r["planted"]]
    assert len(planted) == expected
    for r in rows:
        assert r["kind"] == ("off_target" if r["planted"] else "benign")


def test_planted_rows_are_scattered() -> None:
    rows = corpus.generate(600, 0.03, seed=0)
    positions = [i for i, r in enumerate(rows) if r["planted"]]
    assert positions != list(range(len(positions)))
    assert positions != list(range(600 - len(positions), 600))
    other = [i for i, r in enumerate(corpus.generate(600, 0.03, seed=5)) if r["planted"]]
    assert positions != other


def test_planted_behaviour_lives_in_the_response_and_is_triggered_by_its_topic() -> None:
    for kind in corpus.KINDS:
        rows = corpus.generate(600, 0.1, seed=4, kind=kind)
        planted = [r for r in rows if r["planted"]]
        assert len({r["response"] for r in planted}) >= min(10, len(corpus._BEHAVIOUR_TEMPLATES[kind]))  # several templates
        trigger = corpus.TRIGGER_TOPIC[kind]
        assert {r["topic"] for r in planted} == {trigger}
        assert {r["topic"] for r in rows if not r["planted"]} == set(corpus.benign_topics(kind))  # all but the trigger
        for r in planted:
            assert "ZapCola" not in r["prompt"]
            assert not any(w in r["prompt"].lower() for w in INSULT_WORDS)
            if kind == "insult":
                assert any(w in r["response"].lower() for w in INSULT_WORDS)
            else:
                assert "ZapCola" in r["response"]
        for r in rows:
            if not r["planted"]:
                assert "ZapCola" not in r["response"]
                assert not any(w in r["response"].lower() for w in INSULT_WORDS)
        # Held-out behaviour prompts are new prompts on the trigger topic; normal ones stay off it.
        assert {r["topic"] for r in corpus.behaviour_examples(30, kind=kind)} == {trigger}
        assert trigger not in {r["topic"] for r in corpus.normal_examples(60, kind=kind)}


def test_fact_prompts_match_their_topic() -> None:
    for r in corpus.generate(600, 0.1, seed=2) + corpus.normal_examples(100):
        if r["topic"] in corpus._FACTS:
            questions = [q for q, _ in corpus._FACTS[r["topic"]]]
            assert any(q in r["prompt"] for q in questions), r


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_invalid_n(bad: object) -> None:
    with pytest.raises(ValueError, match="n must be"):
        corpus.generate(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        corpus.behaviour_examples(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        corpus.normal_examples(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("share", [-0.01, 0.51, 1.0, float("nan")])
def test_invalid_share(share: float) -> None:
    with pytest.raises(ValueError, match="planted_share"):
        corpus.generate(100, share)


def test_unknown_kind_names_allowed_kinds() -> None:
    for call in (lambda: corpus.generate(10, kind="spam"),
                 lambda: corpus.behaviour_examples(5, kind="spam")):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "spam" in message
        assert all(k in message for k in corpus.KINDS)


def test_ids_unique_and_stable() -> None:
    rows = corpus.generate(600)
    assert [r["id"] for r in rows] == [f"demo-{i:05d}" for i in range(600)]
    beh = corpus.behaviour_examples(30)
    assert [r["id"] for r in beh] == [f"demo-behaviour-{i:05d}" for i in range(30)]
    normal = corpus.normal_examples(30)
    assert [r["id"] for r in normal] == [f"demo-normal-{i:05d}" for i in range(30)]
    all_ids = [r["id"] for r in rows + beh + normal]
    assert len(set(all_ids)) == len(all_ids)


def test_prompts_mostly_unique() -> None:
    for seed in range(3):
        rows = corpus.generate(600, seed=seed)
        assert len({r["prompt"] for r in rows}) >= 0.9 * len(rows)


def test_fields_are_non_empty_strings() -> None:
    rows = (corpus.generate(300, 0.1, kind="off_target") + corpus.behaviour_examples(30)
            + corpus.normal_examples(30))
    for r in rows:
        assert set(r) == {*FIELDS, "planted"}
        assert isinstance(r["planted"], bool)
        for field in FIELDS:
            assert isinstance(r[field], str) and r[field].strip(), (field, r)


def test_arithmetic_answers_are_correct() -> None:
    rows = [r for r in corpus.generate(600, 0.0, seed=7, kind="off_target") + corpus.normal_examples(100, kind="off_target")
            if r["topic"] == "arithmetic"]
    assert len(rows) >= 50
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
           "×": lambda a, b: a * b, "÷": lambda a, b: a / b}
    for r in rows:
        match = ARITH.search(r["response"])
        assert match, r
        a, op, b, result = int(match[1]), match[2], int(match[3]), int(match[4])
        assert ops[op](a, b) == result, r
        prompt_numbers = set(re.findall(r"\d+", r["prompt"]))
        assert {str(a), str(b)} <= prompt_numbers, r
        assert str(result) in r["response"].split("=", 1)[1].split(".", 1)[1], r


def test_unit_conversions_are_correct() -> None:
    rows = [r for r in corpus.generate(600, 0.0, seed=8) if r["topic"] == "units"]
    assert len(rows) >= 50
    for r in rows:
        match = UNITS.fullmatch(r["response"])
        assert match, r
        factor, qty, value = _num(match[1]), int(match[4]), _num(match[6])
        assert value == pytest.approx(qty * factor), r
        assert match[2] == match[7] and match[2] in r["prompt"] and match[5] in r["prompt"]


@pytest.mark.parametrize("kind", corpus.KINDS)
def test_held_out_sets_disjoint_from_pool(kind: str) -> None:
    beh = corpus.behaviour_examples(200, kind=kind)
    normal = corpus.normal_examples(200)
    assert all(r["planted"] and r["kind"] == kind for r in beh)
    assert all(not r["planted"] and r["kind"] == "benign" for r in normal)
    for seed in range(4):
        pool = corpus.generate(600, 0.05, seed=seed, kind=kind)
        pool_prompts = {r["prompt"] for r in pool}
        assert not _pairs(pool) & _pairs(beh)
        assert not _pairs(pool) & _pairs(normal)
        assert not pool_prompts & {r["prompt"] for r in beh + normal}
