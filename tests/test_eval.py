from __future__ import annotations

from math import comb

import pytest

from signalrl.eval import evaluate, pass_at_k


@pytest.mark.parametrize(
    "n,c,k", [(8, 0, 1), (8, 8, 8), (8, 1, 1), (8, 1, 8), (10, 3, 2), (20, 5, 4)]
)
def test_pass_at_k_closed_form(n, c, k):
    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    if c == 0:
        assert pass_at_k(n, c, k) == 0.0
    if n - c < k:
        assert pass_at_k(n, c, k) == 1.0


def test_pass_at_k_values():
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_evaluate_counts_with_a_known_verifier(tiny):
    model, tok = tiny
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(6)]

    def always(row, completion):
        return 1.0

    def never(row, completion):
        return 0.0

    r1 = evaluate(model, tok, rows, always, max_new_tokens=4, k=2, samples=4)
    assert r1.accuracy == 1.0 and r1.pass_at_k[2] == 1.0 and r1.n == 6
    r0 = evaluate(model, tok, rows, never, max_new_tokens=4, k=2, samples=4)
    assert r0.accuracy == 0.0 and r0.pass_at_k[2] == 0.0
    # a verifier that accepts exactly what greedy decoding produced for the first 3 rows
    greedy = evaluate(model, tok, rows, never, max_new_tokens=4).completions
    wanted = {rows[i]["prompt"]: greedy[i] for i in range(3)}
    r = evaluate(
        model, tok, rows, lambda row, c: float(wanted.get(row["prompt"]) == c), max_new_tokens=4
    )
    assert r.accuracy == pytest.approx(0.5)
    # fixed seed: the same pass@k twice
    a = evaluate(
        model, tok, rows, lambda row, c: float("1" in c), max_new_tokens=4, k=2, samples=4, seed=3
    )
    b = evaluate(
        model, tok, rows, lambda row, c: float("1" in c), max_new_tokens=4, k=2, samples=4, seed=3
    )
    assert a.pass_at_k == b.pass_at_k


def test_best_of_k_by_a_scorer_between_chance_and_oracle(tiny):
    model, tok = tiny
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(8)]

    def has_digit(row, completion):  # a verifier a random tiny model passes sometimes
        return float(any(ch.isdigit() for ch in completion))

    def oracle(prompts, completions):  # scores exactly the verifier
        return [has_digit(None, c) for c in completions]

    def anti(prompts, completions):  # prefers the wrong samples
        return [-has_digit(None, c) for c in completions]

    kw = {"max_new_tokens": 4, "k": 4, "samples": 4, "seed": 1}
    best = evaluate(model, tok, rows, has_digit, scorer=oracle, **kw)
    worst = evaluate(model, tok, rows, has_digit, scorer=anti, **kw)
    assert 0.0 < best.sample_accuracy < 1.0  # the samples are mixed
    assert best.best_of_k[4] == pytest.approx(best.pass_at_k[4])  # a perfect scorer = pass@k
    assert worst.best_of_k[4] < best.sample_accuracy < best.best_of_k[4]
    m = best.metrics()
    assert m["eval/best_of@4"] == best.best_of_k[4] and "eval/sample_accuracy" in m
