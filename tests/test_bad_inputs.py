"""Bad inputs get a clear message naming the file, the row and the field (no traceback), and
inputs that used to be accepted silently are refused, bounded or warned about."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from signalrl.data.preference import PreferenceDataError, load_preference_data
from signalrl.rewards.registry import RewardComposer, RewardError, RewardSpec
from signalrl.trainers.reward_model import load_reward_pairs

GOOD = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}


def _jsonl(path, rows, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


# -- preference files: encoding, row numbers ---------------------------------------------------


def test_non_utf8_preference_file_names_the_file_and_line(tmp_path, tiny):
    _, tok = tiny
    p = tmp_path / "latin1.jsonl"
    good = json.dumps(GOOD).encode()
    bad = (
        json.dumps({**GOOD, "chosen": "4 caf\u00e9"}).encode("ascii").replace(b"\\u00e9", b"\xe9")
    )  # the latin-1 byte of an e-acute, as a Windows editor saves it
    p.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(PreferenceDataError) as e:
        load_preference_data(p, tok)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "not UTF-8" in msg and "0xe9" in msg, msg


def test_a_wrong_type_at_row_10_is_reported_at_row_10(tmp_path, tiny):
    _, tok = tiny
    rows = [dict(GOOD, prompt=f"{i}+2=") for i in range(12)]
    rows[9] = {**rows[9], "chosen": 5}
    p = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PreferenceDataError) as e:
        load_preference_data(p, tok)
    msg = str(e.value)
    assert f"{p}: row 10: field 'chosen'" in msg and "got int" in msg, msg
    # a blank line: the row is still row 10, and the line is named too
    p = _jsonl(tmp_path / "blank.jsonl", rows, blank_after=3)
    with pytest.raises(PreferenceDataError, match=r"row 10 \(line 11\): field 'chosen'"):
        load_preference_data(p, tok)


def test_parquet_rows_are_named_by_their_row(tmp_path, tiny):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, tok = tiny
    rows = [dict(GOOD, prompt=f"{i}+2=") for i in range(12)]
    rows[9] = {**rows[9], "chosen": None}
    p = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    with pytest.raises(PreferenceDataError, match=r"p.parquet: row 10: missing field 'chosen'"):
        load_preference_data(p, tok)


def test_kto_labels_all_of_one_kind_warn_naming_file_and_counts(tmp_path, tiny):
    _, tok = tiny
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": True} for i in range(5)]
    p = _jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.warns(UserWarning, match=r"kto.jsonl: every KTO label is true") as w:
        load_preference_data(p, tok, kind="kto")
    assert "5 desirable and 0 undesirable" in str(w[0].message)
    p = _jsonl(tmp_path / "kto_false.jsonl", [{**r, "label": False} for r in rows])
    with pytest.warns(UserWarning, match=r"every KTO label is false.*0 desirable and 5"):
        load_preference_data(p, tok, kind="kto")


# -- preference rows longer than data.max_length -------------------------------------------------


def test_truncate_row_rule():
    from signalrl.data.preference import truncate_row

    p, c = list(range(10)), [list(range(100, 110)), list(range(200, 205))]
    assert truncate_row(p, c, 32) == (p, c, False)
    # a huge completion: the prompt stays whole, the completions keep their first tokens
    p2, (c1, c2), cut = truncate_row(p, [list(range(1000)), [7, 8]], 32)
    assert cut and p2 == p and c1 == list(range(22)) and c2 == [7, 8]
    # a huge prompt: it keeps its last tokens, the completions stay whole
    p3, (c3,), cut = truncate_row(list(range(1000)), [[1, 2, 3]], 32)
    assert cut and p3 == list(range(971, 1000)) and c3 == [1, 2, 3]
    # both huge: half each
    p4, (c4,), _ = truncate_row(list(range(1000)), [list(range(1000))], 32)
    assert len(p4) == 16 and p4[-1] == 999 and c4 == list(range(16))


def test_long_preference_rows_are_truncated_and_counted(tmp_path, tiny):
    _, tok = tiny
    long = "1" * 100_000
    rows = [GOOD, {"prompt": "9+9=", "chosen": long, "rejected": "17"}, GOOD]
    rows.append({"prompt": "7" * 5000 + "+1=", "chosen": "8", "rejected": "9"})
    p = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.warns(UserWarning, match=r"long.jsonl: 2 of 4 rows are longer than "):
        d = load_preference_data(p, tok, max_length=64)
    assert d.truncated == 2
    assert d.rejected_ids is not None
    for i in range(4):
        for comp in (d.completion_ids[i], d.rejected_ids[i]):
            assert len(d.prompt_ids[i]) + len(comp) <= 64
    assert d.prompt_ids[1] == tok("9+9=", add_special_tokens=False)["input_ids"]
    assert tok.decode(d.completion_ids[1]) == "1" * 60  # cut from the right: no EOS
    assert tok.decode(d.prompt_ids[3]).endswith("7+1=")  # cut from the left
    assert d.completion_ids[0][-1] == tok.eos_token_id  # short rows untouched
    assert load_preference_data(p, tok).truncated == 0  # no max_length: nothing cut


def test_pairs_identical_once_truncated_are_refused(tmp_path, tiny):
    _, tok = tiny
    rows = [GOOD, {"prompt": "1+1=", "chosen": "2" * 100 + "a", "rejected": "2" * 100 + "b"}]
    p = _jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=r"same.jsonl: row 2: 'chosen' and 'rejected'"):
        load_preference_data(p, tok, max_length=32)


def test_reward_pairs_are_truncated_and_counted(tmp_path, tiny):
    _, tok = tiny
    rows = [GOOD, {"prompt": "9+9=", "chosen": "1" * 5000, "rejected": "17"}]
    p = _jsonl(tmp_path / "rm.jsonl", rows)
    with pytest.warns(UserWarning, match="1 of 2 rows"):
        pairs = load_reward_pairs(p, tok, max_length=48)
    assert pairs.truncated == 1
    assert max(len(x) for x in pairs.chosen_ids + pairs.rejected_ids) <= 48
    assert pairs.chosen_ids[0] == tok("2+2=4", add_special_tokens=False)["input_ids"]
    assert tok.decode(pairs.chosen_ids[1]) == "9+9=" + "1" * 44


# -- function rewards: numpy and torch scalars are numbers ---------------------------------------


def _composer(monkeypatch, values):
    import signalrl.rewards.registry as reg

    monkeypatch.setattr(reg, "_import_fn", lambda spec: lambda p, c, **kw: values)
    return RewardComposer([RewardSpec(type="function", fn="x:y")])


@pytest.mark.parametrize(
    "value", [np.float32(1.0), np.float64(1.0), np.int64(1), torch.tensor(1.0), np.array(1.0)]
)
def test_numpy_and_0d_tensor_rewards_are_numbers(monkeypatch, value):
    res = _composer(monkeypatch, [value, value])(["a", "b"], ["x", "y"], [{}, {}], [1, 1])
    assert res.total == [1.0, 1.0] and all(type(v) is float for v in res.total)


@pytest.mark.parametrize(
    "value", [np.bool_(True), np.float32("nan"), torch.tensor(math.nan), True, None, "1"]
)
def test_bools_and_nans_are_still_refused(monkeypatch, value):
    with pytest.raises(RewardError, match="not a finite number"):
        _composer(monkeypatch, [value, 1.0])(["a", "b"], ["x", "y"], [{}, {}], [1, 1])
