from __future__ import annotations

from math import comb

import pytest
import torch

import signalrl.eval as ev
from signalrl.eval import evaluate, majority_vote, pass_at_k
from signalrl.rollout.sampler import Rollout
from signalrl.tasks.arithmetic import ArithmeticTask


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


def test_majority_vote_counts_extracted_answers_not_texts():
    task = ArithmeticTask(n_train=10, n_test=10)
    row = {"answer": "4"}
    outs = ["5", "The answer is 4.", "4", "Answer: 7"]
    scores = [task.verify(row, t) for t in outs]
    # raw texts: four different "answers", the first one ("5", wrong) wins the tie
    assert majority_vote(outs, scores, lambda t: t) == 0.0
    # extracted answers: "The answer is 4." and "4" are one answer with two votes
    assert majority_vote(outs, scores, task.extract) == 1.0
    assert majority_vote(["x", "y"], [0.0, 0.0], task.extract) == 0.0  # no answer: no vote
    assert majority_vote(["7", "4", "x"], [0.0, 1.0, 0.0], task.extract) == 0.0  # tie: first


def _fake_generate(texts_of_prompt: dict[str, list[str]]):
    """A stand-in for `generate` that returns fixed texts (greedy: the first one)."""

    def fake(model, tokenizer, prompts, params, **kw) -> Rollout:
        texts = [t for p in prompts for t in texts_of_prompt[p][: params.n]]
        n = len(texts)
        return Rollout(
            prompt_ids=[[1]] * n,
            completion_ids=torch.ones((n, 1), dtype=torch.long),
            completion_mask=torch.ones((n, 1)),
            logps=torch.zeros((n, 1)),
            entropy=torch.zeros((n, 1)),
            truncated=torch.zeros(n, dtype=torch.bool),
            texts=texts,
            group_size=params.n,
        )

    return fake


def test_evaluate_maj_at_k_votes_over_the_tasks_extracted_answers(monkeypatch):
    task = ArithmeticTask(n_train=10, n_test=10)
    rows = [{"prompt": "2+2=", "answer": "4"}, {"prompt": "3+4=", "answer": "7"}]
    samples = {
        # two texts, one answer (4): maj@4 is right although every text differs
        "2+2=": ["5", "The answer is 4.", "4", "Answer: 6"],
        # the wrong answer 8 has two votes
        "3+4=": ["7", "8", "so 8", "6"],
    }
    monkeypatch.setattr(ev, "generate", _fake_generate(samples))
    model = torch.nn.Linear(1, 1)
    kw = {"max_new_tokens": 4, "k": 4, "samples": 4}
    r = evaluate(model, None, rows, task.verify, extract=task.extract, **kw)
    assert r.maj_at_k == {4: 0.5} and r.metrics()["eval/maj@4"] == 0.5
    assert r.pass_at_k == {4: 1.0} and r.sample_accuracy == pytest.approx((2 / 4 + 1 / 4) / 2)
    raw = evaluate(model, None, rows, task.verify, extract=lambda t: t, **kw)
    assert raw.maj_at_k == {4: 0.5}  # row 1: "5" wins the four-way tie; row 2: "7" wins
    assert "eval/maj@4" not in evaluate(model, None, rows, task.verify, **kw).metrics()


def test_maj_at_k_changes_no_other_number(tiny):
    model, tok = tiny
    task = ArithmeticTask(n_train=10, n_test=10)
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(5)]

    def has_digit(row, completion):
        return float(any(ch.isdigit() for ch in completion))

    kw = {"max_new_tokens": 4, "k": 2, "samples": 4, "seed": 2}
    plain = evaluate(model, tok, rows, has_digit, **kw)
    voted = evaluate(model, tok, rows, has_digit, extract=task.extract, **kw)
    assert 2 in voted.maj_at_k and not plain.maj_at_k
    assert voted.accuracy == plain.accuracy and voted.pass_at_k == plain.pass_at_k
    assert voted.sample_accuracy == plain.sample_accuracy
    assert voted.completions == plain.completions


def test_metrics_name_mean_at_k_beside_pass_and_maj():
    from signalrl.eval import EvalResult

    r = EvalResult(n=4, accuracy=0.5, pass_at_k={8: 0.75}, maj_at_k={8: 0.5}, sample_accuracy=0.4)
    m = r.metrics(prefix="")
    assert (m["mean@8"], m["pass@8"], m["maj@8"], m["accuracy"]) == (0.4, 0.75, 0.5, 0.5)
