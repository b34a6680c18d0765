"""Token-in-token-out multi-turn rollouts (signalrl.rollout.multiturn): the trajectory is the
prompt, the sampled ids as sampled and the template's observation deltas; the loss mask is 1
exactly on sampled tokens; the limits flag truncation; the online trainer runs GRPO with an
environment end to end."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

from signalrl.config import recipe_from_dict
from signalrl.config.sections import EnvConfig
from signalrl.data.chat import render_row
from signalrl.data.collate import tokenize_sft
from signalrl.envs.base import EnvStep
from signalrl.logging import read_metrics
from signalrl.models import load_model
from signalrl.rollout.multiturn import EnvRollouts, Limits, Renderer, run_episodes
from signalrl.rollout.sampler import SamplingParams
from signalrl.tasks import make_task
from signalrl.trainers.online_rl import OnlineRLTrainer
from signalrl.trainers.sft import SFTTrainer


@pytest.fixture(scope="module")
def policy():
    """The untrained tiny model with its end-of-turn logit raised, so that turns end by
    themselves (with `<|im_end|>`, as a chat model's do) after a few random tokens."""
    model, tok = load_model("tiny", tokenizer="bpe", seed=3, attn_implementation="eager")
    eot = tok.convert_tokens_to_ids("<|im_end|>")

    def raise_eot(module, args, out):
        out = out.clone()
        out[..., eot] += 7.5
        return out

    model.get_output_embeddings().register_forward_hook(raise_eot)
    return model, tok


class RecordingEnv:
    """A tool observation after each of `turns` turns; records what the policy sampled."""

    def __init__(self, turns: int = 3) -> None:
        self.turns = turns
        self.sampled: list[list[int]] = []
        self.texts: list[str] = []
        self.observations: list[list[dict]] = []

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep:
        self.sampled.append(list(assistant_token_ids))
        self.texts.append(assistant_text)
        if len(self.sampled) >= self.turns:
            return EnvStep(None, 0.5, True, {})
        obs = [{"role": "tool", "content": f"result {len(self.sampled)} of 12345*678"}]
        self.observations.append(obs)
        return EnvStep(obs, 0.5, False, {"tool_calls": {"probe": 1}, "tool_attempts": 1})


ROWS = [{"prompt": "What is 12+30?", "answer": "42"}, {"prompt": "Say hi", "answer": "hi"}]
PARAMS = SamplingParams(max_new_tokens=24, n=2)
# a stop string ends a turn without the end-of-turn token: the template's is appended
STOP = SamplingParams(max_new_tokens=10, n=2, stop_strings=("e",))


def _run(policy, rows=ROWS, keys=None, env_turns=3, limits=None, params=PARAMS):
    model, tok = policy
    envs: list[RecordingEnv] = []

    def make():
        envs.append(RecordingEnv(env_turns))
        return envs[-1]

    renderer = Renderer(tok, [])
    limits = limits or Limits(max_turns=4, max_total_tokens=400, max_positions=512)
    keys = torch.arange(len(rows)) * 7919 + 11 if keys is None else keys
    trajs, _ = run_episodes(model, tok, rows, params, make, renderer, limits, keys=keys)
    return trajs, envs, renderer


def test_trajectory_is_prompt_plus_sampled_plus_template_deltas(policy):
    model, tok = policy
    trajs, envs, renderer = _run(policy)
    drift = n_closed = 0
    for traj, env in zip(trajs, envs, strict=True):
        expected, mask = [], []
        for t, sampled in enumerate(env.sampled):
            expected += sampled
            mask += [1] * len(sampled)
            if t < len(env.observations):
                closed = sampled[-1:] == [renderer.eot_id]
                n_closed += closed
                delta = renderer.delta(env.observations[t], closed)
                expected += delta
                mask += [0] * len(delta)
            drift += tok(tok.decode(sampled), add_special_tokens=False)["input_ids"] != sampled
        assert traj.ids == expected
        assert traj.mask == mask
        assert traj.turns == len(env.sampled) == 3 and not traj.truncated
        assert traj.env_reward == pytest.approx(1.5)
        assert env.texts == [tok.decode(s, skip_special_tokens=True) for s in env.sampled]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": traj.row["prompt"]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        assert traj.prompt_ids == tok(prompt, add_special_tokens=False)["input_ids"]
        # the environment tokens hold the turn end, the tool turn and the next turn's opening
        text = tok.decode(traj.ids)
        assert "<|im_end|>\n<|im_start|>tool\nresult 1 of 12345*678<|im_end|>\n" in text
    # the untrained policy's samples do not survive decode -> encode: a re-tokenising
    # rollout would have changed them; the trajectories above hold them exactly
    assert drift > 0
    assert n_closed == sum(len(e.observations) for e in envs)  # every turn ended itself


def test_a_turn_ended_by_a_stop_string_gets_the_turn_end(policy):
    _, tok = policy
    trajs, envs, renderer = _run(policy, params=STOP)
    ends = 0
    for traj, env in zip(trajs, envs, strict=True):
        at = 0
        for t, sampled in enumerate(env.sampled[:-1]):
            at += len(sampled)
            if sampled[-1] != renderer.eot_id:  # stopped at "e": the env writes <|im_end|>
                assert traj.ids[at] == renderer.eot_id and traj.mask[at] == 0
                ends += 1
            at += len(renderer.delta(env.observations[t], sampled[-1] == renderer.eot_id))
        assert at + len(env.sampled[-1]) == len(traj.ids)
    assert ends > 0


def test_sampler_logps_match_a_forward_on_the_trajectory(policy):
    model, _ = policy
    trajs, _, _ = _run(policy)
    for traj in trajs[:2]:
        ids = torch.tensor([traj.prompt_ids + traj.ids])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        lp = lp[len(traj.prompt_ids) - 1 :]
        m = torch.tensor(traj.mask, dtype=torch.bool)
        assert torch.allclose(lp[m], torch.tensor(traj.logps)[m], atol=2e-4)
        assert torch.all(torch.tensor(traj.logps)[~m] == 0)


def test_max_turns_and_max_total_tokens_truncate(policy):
    trajs, envs, _ = _run(policy, env_turns=10, limits=Limits(2, 400, 512))
    assert all(t.truncated and t.turns == 2 for t in trajs)
    assert all(len(e.sampled) == 2 for e in envs)
    trajs, _, _ = _run(policy, env_turns=10, limits=Limits(10, 25, 512))
    assert all(t.truncated and len(t.ids) <= 25 for t in trajs)
    trajs, _, _ = _run(policy, env_turns=2, limits=Limits(3, 400, 512))
    assert not any(t.truncated for t in trajs) and all(t.turns == 2 for t in trajs)


def test_counter_based_noise_does_not_depend_on_the_batch(policy):
    keys = torch.tensor([101, 202])
    both, _, _ = _run(policy, ROWS, keys)
    alone, _, _ = _run(policy, ROWS[1:], keys[1:])
    assert [t.ids for t in both[2:]] == [t.ids for t in alone]
    assert both[0].ids != both[1].ids  # two samples of one prompt differ


def test_sft_demonstration_is_what_a_perfect_rollout_samples(policy):
    _, tok = policy
    task = make_task("arithmetic_tools", n_train=3, n_test=3)
    row = render_row(tok, task.train()[0])
    (p_ids,), (c_ids,) = tokenize_sft(
        tok, [row["prompt"]], [row["completion"]], messages=[row["messages"]]
    )
    renderer = Renderer(tok, [])
    assert renderer.prompt(row["messages"], row) == p_ids
    eot = renderer.eot_id
    call = row["completion"].split("<|im_end|>")[0]
    turn1 = tok(call, add_special_tokens=False)["input_ids"] + [eot]
    delta = renderer.delta([{"role": "tool", "content": row["answer"]}], closed=True)
    turn2 = tok(row["answer"], add_special_tokens=False)["input_ids"] + [eot]
    rollout = turn1 + delta + turn2
    assert c_ids[: len(rollout)] == rollout
    assert tok.decode(c_ids[len(rollout) :]) == "\n<|endoftext|>"

    # trainer: sft on the task trains its `sft_messages`: the same ids, and the loss mask is
    # the rollout's (the policy's two turns trained, the tool's turn masked) but for the
    # newline the template writes after a turn's end (an assistant message's, in SFT)
    data = SFTTrainer._conversations(SimpleNamespace(tokenizer=tok), [row], "task")
    assert data.prompt_ids[0] == p_ids and data.completion_ids[0] == c_ids
    mask = data.completion_masks[0]
    assert tok.decode(delta[:1]) == "\n"
    tool_turn = [1.0] + [0.0] * (len(delta) - 1)
    assert mask[: len(rollout)] == [1.0] * len(turn1) + tool_turn + [1.0] * len(turn2)
    assert tok.decode([t for t, m in zip(c_ids, mask, strict=True) if not m]).startswith(
        "<|im_start|>tool\n" + row["answer"]
    )


def _grpo(tmp_path, env, **over):
    data = {
        "name": "grpo-env",
        "output_dir": str(tmp_path),
        "trainer": "online_rl",
        "model": {"name_or_path": "tiny", "tokenizer": "bpe", "attn_implementation": "eager"},
        "task": {"name": "arithmetic_tools", "n_train": 16, "n_test": 4},
        "env": env,
        "train": {"steps": 2, "lr": 1e-3, "batch_size": 2},
        "rl": {"algorithm": "grpo", "group_size": 2},
        "sampling": {"max_new_tokens": 8, "stop_strings": ["e"]},
        "eval": {"batch_size": 4},
        "logging": {"progress": False, "samples_every": 1},
        "checkpoint": {"every": 0},
    }
    data.update(over)
    return recipe_from_dict(data, "test")


def test_grpo_with_an_environment_runs_end_to_end(tmp_path):
    env = {"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
           "max_turns": 3, "max_total_tokens": 64}  # fmt: skip
    trainer = OnlineRLTrainer(_grpo(tmp_path, env))
    roll = trainer.rollout(trainer.rows[:2])
    b = trainer.prepare(roll)
    width = b.seq.completion_ids.shape[1]
    sampled = roll.sampled_mask(width, "cpu")
    assert sampled is not None and "policy_mask" not in roll.rows[0]  # a field, not a row key
    assert 0 < sampled.sum() < b.seq.completion_mask.sum()  # environment tokens exist...
    expect = b.seq.completion_mask * sampled
    if trainer.recipe.rl.mask_truncated:
        expect = expect * (~b.truncated).float()[:, None]
    assert torch.equal(b.loss_mask, expect)  # ...and are never in the loss
    assert torch.equal(b.behaviour * (1 - sampled), torch.zeros_like(b.behaviour))
    out = trainer.train()
    rows = read_metrics(tmp_path / "grpo-env")
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("env/turns", "env/truncated_frac", "tools/calls_per_traj", "tools/error_frac"):
        assert key in rows[0], key
    assert rows[0]["env/reward"] > 0  # CountingEnv pays 1 per turn
    assert "eval/accuracy" in rows[-1] and "eval/env/turns" in rows[-1]
    assert 0.0 <= out["accuracy"] <= 1.0


def test_tools_env_rollout_batch_on_the_tool_task(tmp_path):
    model, tok = load_model("tiny", tokenizer="bpe", attn_implementation="eager")
    er = EnvRollouts(EnvConfig(tools=["calculator"], max_turns=2, max_total_tokens=40), tok, model)
    task = make_task("arithmetic_tools", n_train=4, n_test=2)
    rows = [render_row(tok, r) for r in task.train()[:2]]
    res = er.evaluate(model, tok, rows, task.verify, max_new_tokens=8)
    assert res.n == 2 and 0.0 <= res.accuracy <= 1.0
    assert "eval/tools/calls_per_traj" in res.metrics()
    # the task's system message describes the tool: no second tool listing in the prompt
    assert (
        er.renderer.prompt(rows[0]["messages"], rows[0])
        == tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize(
    "algorithm", ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"]
)
def test_every_algorithm_takes_a_step_with_an_environment(tmp_path, algorithm):
    env = {"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
           "max_turns": 2, "max_total_tokens": 48}  # fmt: skip
    recipe = _grpo(tmp_path, env, rl={"algorithm": algorithm, "group_size": 2})
    trainer = OnlineRLTrainer(recipe)
    metrics, _ = trainer.train_step()
    assert metrics["env/turns"] > 0 and metrics["env/reward"] > 0
    assert all(v == v for k, v in metrics.items() if k.startswith(("loss", "grad_norm"))), metrics
    if algorithm == "dapo":  # the overlong penalty is per turn, not per trajectory
        assert metrics.get("reward/overlong", 0.0) <= 0.0


@pytest.mark.parametrize("algorithm", ["reinforce_pp", "ppo"])
def test_per_turn_rewards_reach_the_token_level_estimators(tmp_path, algorithm):
    """CountingEnv pays 1 per turn: `token_rewards` holds each turn's 1 on that turn's last
    sampled token (the rows sum to the rewards), and REINFORCE++/GAE see only the sampled
    tokens: the environment's tokens get advantage 0 (they were steps of the recursion, with
    a nonzero return, when the estimators got the whole completion mask)."""
    from signalrl.losses.advantages import reinforce_pp_advantages

    env = {"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
           "max_turns": 3, "max_total_tokens": 64}  # fmt: skip
    rl = {"algorithm": algorithm, "group_size": 2, "kl_coef": 0.0}
    trainer = OnlineRLTrainer(_grpo(tmp_path, env, rl=rl))
    roll = trainer.rollout(trainer.rows[:2])
    assert roll.token_rewards is not None and roll.policy_mask is not None
    for i, (tr, pm) in enumerate(zip(roll.token_rewards, roll.policy_mask, strict=True)):
        assert torch.isclose(tr.sum(), roll.rewards[i]), i
        ends = [t for t in range(len(pm)) if pm[t] == 1 and (t + 1 == len(pm) or pm[t + 1] == 0)]
        turns = roll.rows[i]["env"]["turns"]
        assert len(ends) == turns  # one run of sampled tokens per turn
        assert torch.count_nonzero(tr) <= turns and set(tr.nonzero()[:, 0].tolist()) <= set(ends)
        if turns == 2:  # the first turn's 1 sits at the end of the first turn
            assert tr[ends[0]] == 1.0
    b = trainer.prepare(roll)
    width = b.seq.completion_ids.shape[1]
    sampled = roll.sampled_mask(width, "cpu")
    env_tokens = b.seq.completion_mask * (1 - sampled)
    assert env_tokens.sum() > 0
    assert torch.equal(b.adv * env_tokens, torch.zeros_like(b.adv))
    if algorithm == "reinforce_pp":
        mask = b.seq.completion_mask * sampled
        want = reinforce_pp_advantages(roll.padded_token_rewards(width, "cpu"), mask)
        assert torch.allclose(b.adv, want)


def test_summed_turn_rewards_leave_no_token_rewards(tmp_path):
    env = {"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
           "max_turns": 3, "max_total_tokens": 64, "turn_rewards": "sum"}  # fmt: skip
    rl = {"algorithm": "reinforce_pp", "group_size": 2, "kl_coef": 0.0}
    trainer = OnlineRLTrainer(_grpo(tmp_path, env, rl=rl))
    roll = trainer.rollout(trainer.rows[:2])
    assert roll.token_rewards is None and roll.policy_mask is not None
    b = trainer.prepare(roll)
    # the whole reward on the last sampled token of each episode
    sampled = roll.sampled_mask(b.seq.completion_ids.shape[1], "cpu")
    assert torch.equal(b.adv * (1 - sampled), torch.zeros_like(b.adv))


def test_rollout_batch_checks_its_per_token_fields():
    from signalrl.rollout.batch import RolloutBatch

    def batch(**kw):
        return RolloutBatch(
            rows=[{}], prompt_ids=[[1]], completion_ids=[[2, 3]], texts=["x"],
            sampler_logps=[torch.zeros(2)], entropy=[torch.zeros(2)],
            truncated=[False], group_size=1, rewards=torch.zeros(1), **kw,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"policy_mask\[0\]: shape \(3,\) for a completion of 2"):
        batch(policy_mask=[torch.ones(3)])
    with pytest.raises(ValueError, match="token_rewards: 2 rows for 1 completions"):
        batch(token_rewards=[torch.ones(2), torch.ones(2)])
    one, two = batch(policy_mask=[torch.ones(2)]), batch()
    with pytest.raises(ValueError, match="multi-turn and single-turn rollouts do not mix"):
        RolloutBatch.concat([one, two])


def test_agentic_distillation_scores_the_students_trajectories(tmp_path):
    """On-policy distillation with an environment: the teacher scores the student's whole
    multi-turn trajectories (environment tokens as context), and the reverse-KL advantage and
    the loss cover only the tokens the student sampled."""
    from signalrl.trainers.distill import DistillTrainer

    env = {"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
           "max_turns": 3, "max_total_tokens": 64}  # fmt: skip
    teacher, tok = load_model("tiny", tokenizer="bpe", seed=7)  # another model, same vocab
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    recipe = _grpo(
        tmp_path, env, name="distill-env", trainer="distill",
        distill={"teacher": str(tmp_path / "teacher")}, rl={"group_size": 2},
    )  # fmt: skip
    trainer = DistillTrainer(recipe)
    roll = trainer.rollout(trainer.rows[:2])
    b = trainer.prepare(roll)
    width = b.seq.completion_ids.shape[1]
    sampled = roll.sampled_mask(width, "cpu")
    assert sampled is not None
    env_tokens = b.seq.completion_mask * (1 - sampled)
    assert env_tokens.sum() > 0
    assert torch.equal(b.adv * env_tokens, torch.zeros_like(b.adv))  # context only
    assert torch.count_nonzero(b.adv * sampled) > 0  # the student's tokens are scored
    assert torch.equal(b.loss_mask * env_tokens, torch.zeros_like(b.loss_mask))
    trainer.train()
    rows = read_metrics(tmp_path / "distill-env")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["distill/reverse_kl"] > 0 and rows[-1]["env/turns"] >= 1
