"""Rebuild ``math_verify_cases.jsonl``: math-verify's own test cases, with its verdicts.

Usage::

    python tests/data/make_math_verify_cases.py /path/to/Math-Verify

It collects every ``(gold, pred)`` pair that math-verify's test suite
(https://github.com/huggingface/Math-Verify, ``tests/``) parametrizes, adds variants of
them and a few cases of our own (see ``_variants`` and ``OWN_CASES``), and records for each
``math_verify.verify(parse(gold), parse(pred))`` with the default settings, as given by the
installed math-verify. ``tests/test_rewards_math.py`` checks that ``math_reward(pred, gold)``
agrees with that verdict except for the listed, justified differences.

Row fields: ``id`` (``module::test[index]`` for math-verify's cases, ``tag:<id>`` for the
``<answer>`` variants, ``own::<name>`` for ours), ``gold``, ``pred``, ``mv_pred`` (what
math-verify was given as the prediction, when that is not ``pred``) and ``math_verify``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from math_verify import parse, verify

OUT = Path(__file__).with_name("math_verify_cases.jsonl")
MODULES = [
    "test_all",
    "test_boxed",
    "test_numina_cases",
    "test_open_thoughts",
    "test_strict",
    "test_yujianll",
]
_LONG = " I checked every step of this computation twice and the reasoning holds up fine."
# (name, gold, pred): multiple boxes, thousands separators, answer blocks, phrases.
OWN_CASES = [
    ("boxes_partial", r"\(\boxed{1}\) and \(\boxed{-2}\).", r"\boxed{-2}"),
    ("boxes_full", r"\(\boxed{1}\) and \(\boxed{-2}\).", r"\boxed{-2, 1}"),
    ("boxes_full_two_boxes", r"\(\boxed{1}\) and \(\boxed{-2}\).", r"$\boxed{1}$, $\boxed{-2}$"),
    ("boxes_tuple_order", r"$\boxed{(1, 2)}$", r"\boxed{(2, 1)}"),
    ("boxes_missing_one", r"$\boxed{1}, \boxed{2}, \boxed{3}$", r"\boxed{1} and \boxed{3}"),
    ("comma_leading_zero", "0,111", r"\boxed{111}"),
    ("comma_leading_zero_decimal", "0,111", r"\boxed{0.111}"),
    ("comma_thousands", "1,234", r"\boxed{1234}"),
    ("comma_millions", "1,234,567", r"\boxed{1234567}"),
    ("comma_list", "12,34", r"\boxed{1234}"),
    ("comma_list_boxed", r"\boxed{1,22}", r"\boxed{1, 22}"),
    ("gsm8k_thousands", "1,000", r"so \boxed{1000}"),
    ("hedged_boxes", "4", r"First \boxed{3}, then correcting myself, \boxed{4}"),
    ("boxes_in_two_envs", "4", r"$\boxed{3}$ or maybe $\boxed{4}$"),
    ("boxes_far_apart", "4", r"\boxed{3} is wrong." + _LONG + r" So \boxed{4}"),
    ("boxes_repeated", "4", r"So \boxed{4}." + _LONG + r" Final: \boxed{4}"),
    ("boxes_one_env", r"$\{3, 4\}$", r"$$\boxed{3} \text{" + _LONG + r"} \boxed{4}$$"),
    ("final_answer_after_box", "6", r"\boxed{5}. Hmm, no: the final answer is $6$"),
    ("box_after_final_answer", "5", r"The final answer is $6$. Hmm, no: \boxed{5}"),
    ("minerva_beats_box", "7", r"\boxed{5} The final answer is $7$. I hope it is correct."),
    ("box_percent", r"$28\%$", r"$\boxed{28}$ percent"),
    ("box_currency", "18", r"The total is $\boxed{\$18.00}$."),
    ("box_text_units", "125", r"The distance is $\boxed{125\textnormal{ miles}}$."),
    ("tag_number", "42", "<think>Maybe 41.</think> <answer>42</answer>"),
    ("tag_box_inside_think", "42", r"<think>\boxed{41}</think> <answer>42</answer>"),
    ("tag_fraction", "0.5", r"<think>half</think><answer>\frac{1}{2}</answer>"),
    ("tag_equation", "5", "<answer>$x = 5$</answer>"),
    ("tag_phrase_wrong", "42", "<answer>The answer is 41</answer>"),
    ("tag_boxes", r"$\{2, 3\}$", r"<answer>\boxed{2}, \boxed{3}</answer>"),
    ("tag_words", "42", "<answer>42 apples</answer>"),
    ("tag_set", r"$\{1, 2\}$", r"<answer>\{2, 1\}</answer>"),
    ("tag_interval", r"$(1, 2]$", "<answer>(1,2]</answer>"),
    # deliberate differences (see tests/test_rewards_math.py)
    ("percent_is_not_a_fraction", "0.5", r"\boxed{50\%}"),
    ("truncated_box", "42", r"The answer is \boxed{42"),
    ("bare_latex_reference", r"\{1,2,3\}", r"\boxed{\{3,1,2\}}"),
    ("boxed_with_space", "4", r"so \boxed {4} after 5"),
    ("fbox", "4", r"so \fbox{4} after 5"),
]
_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _math_verify(gold: str, pred: str) -> bool:
    try:
        return bool(verify(parse(gold), parse(pred)))
    except Exception:  # noqa: BLE001 - a crash is a mismatch, as in math_reward
        return False


def _collect(repo: Path) -> list[dict[str, Any]]:
    sys.path.insert(0, str(repo))
    rows = []
    for module_name in MODULES:
        module = importlib.import_module(f"tests.{module_name}")
        for name, fn in vars(module).items():
            if not name.startswith("test_") or not callable(fn):
                continue
            for mark in getattr(fn, "pytestmark", []):
                argnames = mark.args[0] if mark.name == "parametrize" else ""
                if isinstance(argnames, str):
                    argnames = [a.strip() for a in argnames.split(",")]
                if "gold" not in argnames:
                    continue
                for index, values in enumerate(mark.args[1]):
                    case = dict(zip(argnames, values, strict=True))
                    case_id = f"{module_name}::{name}[{index}]"
                    rows.append({"id": case_id, "gold": case["gold"], "pred": case["pred"]})
    return rows


def _variants(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same answers given in an ``<answer>`` block after some reasoning: for every case
    whose prediction is boxed or short (one line, under 80 characters)."""
    out = []
    for row in rows:
        pred = row["pred"]
        if "\\boxed" in pred or ("\n" not in pred and len(pred) < 80):
            tagged = f"<think>First try: 12345.</think>\n<answer>{pred}</answer>"
            out.append({"id": f"tag:{row['id']}", "gold": row["gold"], "pred": tagged})
    return out


def main(repo: str) -> None:
    rows = _collect(Path(repo))
    rows += _variants(rows)
    rows += [{"id": f"own::{n}", "gold": g, "pred": p} for n, g, p in OWN_CASES]
    with open(OUT, "w", encoding="utf-8") as fh:
        for row in rows:
            tagged = _TAG_RE.findall(row["pred"])
            mv_pred = tagged[-1].strip() if tagged else row["pred"]
            if mv_pred != row["pred"]:
                row["mv_pred"] = mv_pred  # math-verify knows no <answer> tags: its content
            row["math_verify"] = _math_verify(row["gold"], mv_pred)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} cases to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
