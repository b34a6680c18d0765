"""Environments (signalrl.envs): the recipe section and loader, the tool environment (malformed
calls, a tool that raises, a tool past its timeout), and the built-in tasks' environments and
demonstrations."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from signalrl.config import recipe_from_dict
from signalrl.config.sections import EnvConfig
from signalrl.envs import SingleTurnEnv, Tool, ToolEnv, calculator, make_env_factory
from signalrl.envs.base import EnvStep
from signalrl.tasks import make_task
from signalrl.tasks.guess_number import GuessNumberEnv, binary_search


class CountingEnv:
    """A user environment: `turns` observations, then done (reward 1 per turn)."""

    def __init__(self, turns: int = 2) -> None:
        self.turns, self.seen = turns, 0

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep:
        self.seen += 1
        if self.seen >= self.turns:
            return EnvStep(None, 1.0, True, {})
        return EnvStep([{"role": "user", "content": "again"}], 1.0, False, {})


def _rl(env):
    return recipe_from_dict(
        {"trainer": "online_rl", "task": {"name": "arithmetic_tools"}, "env": env}, "test"
    )


def test_recipe_env_section_and_loader():
    r = _rl({"type": "tools", "tools": ["calculator"], "max_turns": 3})
    assert r.env is not None and r.env.max_turns == 3 and r.env.tools == ["calculator"]
    factory, tools = make_env_factory(r.env)
    env = factory()
    assert isinstance(env, ToolEnv) and [t.name for t in tools] == ["calculator"]
    assert factory() is not env  # a fresh environment per trajectory
    factory, tools = make_env_factory(EnvConfig(type="single_turn"))
    assert isinstance(factory(), SingleTurnEnv) and tools == []
    cfg = EnvConfig(type="function", cls="test_envs:CountingEnv", kwargs={"turns": 3})
    factory, _ = make_env_factory(cfg)
    assert factory().turns == 3
    assert recipe_from_dict({"trainer": "online_rl"}, "test").env is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"type": "tools", "bogus": 1}, "bogus"),
        ({"type": "tools", "max_turns": 0}, "max_turns"),
        ({"type": "shell"}, "type"),
    ],
)
def test_bad_env_sections_fail_early(env, message):
    with pytest.raises(ValueError, match=message):
        _rl(env)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (EnvConfig(type="tools"), "needs at least one tool"),
        (EnvConfig(type="tools", tools=["abacus"]), "unknown tool 'abacus'"),
        (EnvConfig(type="function"), "needs cls"),
        (EnvConfig(type="function", cls="test_envs:Nope"), "cannot load"),
        (EnvConfig(type="function", cls="no_colon"), "expected 'module:name'"),
    ],
)
def test_bad_env_configs_name_the_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        make_env_factory(cfg)


def _explode(x: int) -> int:
    """Raise.

    Args:
        x: anything
    """
    raise RuntimeError("kaboom")


def _nap(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "rested"


def test_tool_env_steps_counts_and_errors():
    env = ToolEnv([Tool(calculator), Tool(_explode), Tool(_nap, timeout=0.2)], error_reward=-0.5)
    env.reset({"prompt": "q"})
    obs, reward, done, info = env.step("The answer is 5.", [])
    assert (obs, reward, done) == (None, 0.0, True)
    text = (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "99999*99999"}}</tool_call>'
        '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
        '<tool_call>{"name": "_explode", "arguments": {"x": 1}}</tool_call>'
        '<tool_call>{"name": "_nap", "arguments": {"seconds": 5}}</tool_call>'
        "<tool_call>not json</tool_call>"
    )
    obs, reward, done, info = env.step(text, [])
    assert not done and [m["role"] for m in obs] == ["tool"] * 5
    contents = [m["content"] for m in obs]
    assert contents[0] == str(99999 * 99999)
    assert contents[1].startswith("error: tool calculator: unknown argument(s) expr")
    assert contents[2] == "error: tool _explode raised RuntimeError: kaboom"
    assert contents[3] == "error: tool _nap did not finish within 0.2 s"
    assert contents[4].startswith("error: tool call is not valid JSON")
    assert info == {"tool_calls": {"calculator": 1, "_explode": 1, "_nap": 1},
                    "tool_errors": 4, "tool_attempts": 5}  # fmt: skip
    assert reward == pytest.approx(-2.0)


def test_arithmetic_tools_task_rows_and_verifier():
    task = make_task("arithmetic_tools", n_train=50, n_test=20)
    train, test = task.train(), task.test()
    assert not {r["expr"] for r in train} & {r["expr"] for r in test}
    for r in train:
        a, b = r["expr"].replace("*", "+").split("+")
        assert 4 <= len(a) <= 6 and 4 <= len(b) <= 6
        assert r["messages"][0]["role"] == "system" and r["tools_in_messages"]
        assert r["completion"].startswith('<tool_call>{"name": "calculator"')
        assert task.verify(r, r["answer"]) == 1.0
        assert task.verify(r, r["completion"].split("<|im_end|>")[0]) == 0.0  # the call alone
    plain = make_task("arithmetic_tools", tools=False, n_train=5, n_test=5).train()[0]
    assert len(plain["messages"]) == 1 and plain["completion"] == plain["answer"]


def test_guess_number_env_feedback_and_demonstrations():
    task = make_task("guess_number", high=32, n_train=40, n_test=8)
    env = GuessNumberEnv(high=32)
    row = {**task.train()[0], "answer": "21"}
    assert env.reset(row) == row["messages"]
    assert env.step("16", [])[0] == [{"role": "user", "content": "higher"}]
    assert env.step("I say 30", [])[0] == [{"role": "user", "content": "lower"}]
    assert env.step("no idea", [])[0][0]["content"] == "Reply with one number."
    obs, _, done, _ = env.step("21", [])
    assert obs is None and done
    for secret in range(1, 33):
        guesses = binary_search(secret, 32)
        assert guesses[-1] == secret and len(guesses) <= 6
    r = task.train()[3]
    assert (
        r["completion"].count("<|im_start|>user\n") == len(binary_search(int(r["answer"]), 32)) - 1
    )
    assert task.verify(r, r["completion"].rsplit("\n", 1)[-1]) == 1.0


def test_guess_number_inconsistency_penalty_per_turn():
    """`inconsistency_penalty`: -c for a guess the feedback so far rules out (or no number),
    0 for one it still allows (a bonus would pay for longer games); 0 by default."""
    row = {"messages": [{"role": "user", "content": "q"}], "answer": "21"}
    env = GuessNumberEnv(high=32, inconsistency_penalty=0.1)
    env.reset(row)
    rewards = [env.step(g, [])[1] for g in ("16", "30", "10", "40", "no idea", "24", "21")]
    # 16 ok (1..32) -> 17..32; 30 ok -> 17..29; 10 ruled out; 40 ruled out; no number;
    # 24 ok -> 17..23; 21 ok and wins
    assert rewards == pytest.approx([0.0, 0.0, -0.1, -0.1, -0.1, 0.0, 0.0])
    env.reset(row)  # the interval starts over with each episode
    assert env.step("2", [])[1] == 0.0
    assert env.step("1", [])[1] == pytest.approx(-0.1)  # 2 said higher: 1 is ruled out
    plain = GuessNumberEnv(high=32)
    plain.reset(row)
    assert [plain.step(g, [])[1] for g in ("10", "40", "21")] == [0.0, 0.0, 0.0]


def test_distill_takes_an_env_section_on_policy_only():
    env = {"tools": ["calculator"]}
    for mode in ("off_policy", "gkd"):
        data = {"trainer": "distill", "distill": {"teacher": "tiny", "mode": mode}, "env": env}
        with pytest.raises(ValueError, match=f"distill.mode {mode} does not take an environment"):
            recipe_from_dict(data, "test")
    data = {"trainer": "distill", "distill": {"teacher": "tiny"}, "env": env}
    assert recipe_from_dict(data, "test").env is not None


def test_guess_number_sft_trains_the_guesses_and_masks_the_feedback():
    """`trainer: sft` on guess_number trains each guess of the binary-search demonstration and
    none of the higher/lower turns (environment tokens in RL), via the row's `sft_messages`."""
    from signalrl.data.sft import tokenize_rows
    from signalrl.models.tokenizer import build_tokenizer

    task = make_task("guess_number", high=32, n_train=4, n_test=2)
    row = next(r for r in task.train() if len(binary_search(int(r["answer"]), 32)) >= 3)
    msgs = row["sft_messages"]
    guesses = binary_search(int(row["answer"]), 32)
    assert msgs[0] == row["messages"][0]
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == [str(g) for g in guesses]
    assert [m["content"] for m in msgs[2::2]] == [
        "higher" if int(row["answer"]) > g else "lower" for g in guesses[:-1]
    ]
    tok = build_tokenizer("bpe")
    data = tokenize_rows(tok, [("row", {"messages": msgs})], "messages", source="test")
    ids, mask = data.completion_ids[0], data.completion_masks[0]
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "higher" not in trained and "lower" not in trained
    assert all(str(g) in trained for g in guesses)
