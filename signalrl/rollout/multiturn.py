"""Token-in-token-out multi-turn rollouts: a policy talks to an environment (`signalrl.envs`).

Each trajectory is one token list after its prompt: the policy's sampled tokens exactly as
sampled, then the environment's observation as the chat template renders it, then the next
sampled turn, and so on. The conversation is never re-tokenised from text: the sampler
continues from the ids so far (`signalrl.rollout.sampler.generate` on token-id prompts), and
an observation adds only its own tokens, the *delta* of the template:

    A = render([u, a])                        (a fixed probe conversation, no generation prompt)
    B = render([u, a] + observation, add_generation_prompt=True)
    delta = (what A writes after the assistant's end-of-turn token) + B[len(A):]

so after a sampled turn that ended with the end-of-turn token (`<|im_end|>`) the appended
tokens are the rest of the template's turn closing (`"\\n"` in ChatML), the observation turns
and the next generation prompt; a turn that ended on a stop string or another EOS gets the
end-of-turn token first (as an environment token). `RolloutBatch.policy_mask` is 1 exactly
on the sampled tokens; the environment's tokens are context (`sampler_logps`/`entropy` 0
there) and never in the loss.

Limits: `max_turns` assistant turns and `max_total_tokens` tokens after the prompt; a
trajectory that hits either (or a turn that hits `max_new_tokens` without ending) is
`truncated`. Per-turn environment rewards are summed into the trajectory's reward, and the
reward terms score the final assistant message; `RolloutBatch.token_rewards` places each
turn's reward on its last sampled token (and the reward terms' on the episode's last one) for
the estimators on token-level rewards (GAE, REINFORCE++). All active trajectories sample
together (one batched `generate` per turn); their environment steps run in a thread pool,
so a slow tool holds the batch at most its timeout. Noise is counter-based: turn `t` of
sample `j` of a prompt uses `mix(row_key, t)`, so a trajectory's tokens do not depend on
the rest of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from signalrl.data.chat import encode_prompt, end_of_turn_token, has_chat_template
from signalrl.envs.base import EnvFactory, Message
from signalrl.eval import EvalResult
from signalrl.rollout import noise
from signalrl.rollout.batch import RolloutBatch, Row
from signalrl.rollout.sampler import SamplingParams, generate

ENV_INFO = "env"  # row key: the trajectory's counters (turns, tool calls, truncated)
_PROBE = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": "probe"}]


class Renderer:
    """Token ids of a first prompt and of an observation's delta under a tokenizer's chat
    template (with `tools` schemas rendered by it), without re-tokenising what came before."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tools: Sequence[dict[str, Any]]):
        self.tokenizer = tokenizer
        self.tools = list(tools) or None
        self.chat = has_chat_template(tokenizer)
        eot = end_of_turn_token(tokenizer) if self.chat else None
        self.eot = eot or ""
        self.eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
        self.closing = ""
        if self.chat:
            probe = self.render(_PROBE, False)
            if eot and eot in probe:
                self.closing = probe[probe.rfind(eot) + len(eot) :]

    def render(self, messages: Sequence[Message], generation: bool, with_tools: bool = True) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                list(messages),
                tools=self.tools if with_tools else None,
                tokenize=False,
                add_generation_prompt=generation,
            )
        )

    def prompt(self, first: list[Message] | str, row: Row) -> list[int]:
        """The first prompt: a plain string as is, messages through the chat template (the
        tool schemas too, unless the row's messages describe the tools themselves:
        `tools_in_messages`)."""
        if isinstance(first, str):
            return encode_prompt(self.tokenizer, [first])[0]
        if not self.chat:
            raise ValueError("env: the row has messages but the tokenizer has no chat template")
        text = self.render(first, True, with_tools=not row.get("tools_in_messages"))
        return encode_prompt(self.tokenizer, [text])[0]

    def delta(self, observation: Sequence[Message], closed: bool) -> list[int]:
        """Tokens appended after a sampled turn for `observation` (and the next generation
        prompt). `closed`: the turn ended with the template's end-of-turn token; otherwise
        (a stop string, another EOS) the end-of-turn token comes first, as the template
        writes it after an assistant message."""
        if not self.chat:
            text = "\n" + "\n".join(str(m.get("content", "")) for m in observation) + "\n"
        else:
            a = self.render(_PROBE, False)
            b = self.render(list(_PROBE) + list(observation), True)
            if not b.startswith(a):
                raise ValueError(
                    "env: the chat template does not render an observation as a continuation "
                    "of the conversation; cannot append its tokens"
                )
            text = ("" if closed else self.eot) + self.closing + b[len(a) :]
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Trajectory:
    row: Row
    env: Any
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    env_reward: float = 0.0
    turns: int = 0
    done: bool = False
    truncated: bool = False
    last_text: str = ""
    last_ids: list[int] = field(default_factory=list)
    turn_lengths: list[int] = field(default_factory=list)
    last_sampled: int = -1  # index in `ids` of the last sampled token so far
    turn_rewards: list[tuple[int, float]] = field(default_factory=list)  # (token, reward)
    tool_calls: dict[str, int] = field(default_factory=dict)
    tool_attempts: int = 0
    tool_errors: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "truncated": self.truncated,
            "tool_calls": dict(self.tool_calls),
            "tool_attempts": self.tool_attempts,
            "tool_errors": self.tool_errors,
            "env_reward": self.env_reward,
        }


@dataclass
class Limits:
    max_turns: int
    max_total_tokens: int
    max_positions: int | None = None

    def room(self, t: Trajectory) -> int:
        """Tokens `t` may still sample: within `max_total_tokens` and the model's positions."""
        room = self.max_total_tokens - len(t.ids)
        if self.max_positions is not None:
            room = min(room, self.max_positions - len(t.prompt_ids) - len(t.ids))
        return room


def _sample_turn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    trajs: list[Trajectory],
    active: list[int],
    params: SamplingParams,
    limits: Limits,
    keys: torch.Tensor | None,
    turn: int,
    autocast_dtype: torch.dtype | None,
) -> tuple[Any, int]:
    """One batched `generate` over the active trajectories' contexts; returns the rollout
    and its forward tokens (each context encoded once plus the sampled tokens)."""
    room = max(limits.room(trajs[i]) for i in active)
    p = dataclasses.replace(params, n=1, max_new_tokens=max(1, min(params.max_new_tokens, room)))
    contexts = [trajs[i].prompt_ids + trajs[i].ids for i in active]
    k = None
    if keys is not None and not params.greedy:
        k = noise.mix(keys[active], turn)
    r = generate(model, tokenizer, contexts, p, autocast_dtype=autocast_dtype, keys=k)
    return r, sum(len(c) for c in contexts) + int(r.lengths.sum())


def _record(traj: Trajectory, r: Any, j: int, room: int, eos_hit: bool) -> tuple[list[int], bool]:
    """Append row `j` of rollout `r` (cut to `room` tokens) to `traj`; returns the kept ids
    and whether the turn ended with a stop token inside the budget."""
    n = int(r.lengths[j])
    ids = r.completion_ids[j, :n].tolist()
    cut = n > room
    if cut:
        n, ids = room, ids[:room]
    traj.ids += ids
    traj.mask += [1] * n
    traj.logps += r.logps[j, :n].tolist()
    traj.entropy += r.entropy[j, :n].tolist()
    traj.turns += 1
    traj.turn_lengths.append(n)
    if n:
        traj.last_sampled = len(traj.ids) - 1
    ended = eos_hit and not cut
    if not ended:
        traj.truncated, traj.done = True, True
    return ids, ended


def _apply_step(
    traj: Trajectory, step: Any, renderer: Renderer, closed: bool, limits: Limits
) -> None:
    obs, reward, done, info = step
    traj.env_reward += float(reward)
    traj.turn_rewards.append((traj.last_sampled, float(reward)))
    for name, c in (info or {}).get("tool_calls", {}).items():
        traj.tool_calls[name] = traj.tool_calls.get(name, 0) + int(c)
    traj.tool_errors += int((info or {}).get("tool_errors", 0))
    traj.tool_attempts += int((info or {}).get("tool_attempts", 0))
    if done or obs is None or traj.done:
        traj.done = True
        return
    delta = renderer.delta(obs, closed)
    if len(traj.ids) + len(delta) >= limits.max_total_tokens:
        traj.truncated, traj.done = True, True
        return
    traj.ids += delta
    traj.mask += [0] * len(delta)
    traj.logps += [0.0] * len(delta)
    traj.entropy += [0.0] * len(delta)


def run_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    params: SamplingParams,
    make_env: EnvFactory,
    renderer: Renderer,
    limits: Limits,
    *,
    keys: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[Trajectory], int]:
    """`params.n` trajectories per row (grouped by row), run to the end or the limits;
    returns them and the generation's forward tokens. `keys` `(len(rows),)`: counter-based
    noise (`signalrl.rollout.noise.prompt_keys`)."""
    g = params.n
    trajs: list[Trajectory] = []
    for row in rows:
        for _ in range(g):
            env = make_env()
            trajs.append(Trajectory(row, env, renderer.prompt(env.reset(row), row)))
    sample_keys = noise.row_keys(keys.long(), g) if keys is not None else None
    tokens = 0
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(trajs)))) as pool:
        for turn in range(limits.max_turns):
            active = [i for i, t in enumerate(trajs) if not t.done]
            if not active:
                break
            r, used = _sample_turn(
                model, tokenizer, trajs, active, params, limits, sample_keys, turn, autocast_dtype
            )
            tokens += used
            closed = _record_all(trajs, active, r, limits, renderer)
            ended = [i for i in active if not trajs[i].done]  # a cut turn is not stepped
            steps = pool.map(
                lambda i: trajs[i].env.step(trajs[i].last_text, trajs[i].last_ids), ended
            )
            for i, step in zip(ended, steps, strict=True):
                _apply_step(trajs[i], step, renderer, closed[i], limits)
    for t in trajs:
        if not t.done:  # still talking after max_turns
            t.truncated, t.done = True, True
    return trajs, tokens


def _record_all(
    trajs: list[Trajectory], active: list[int], r: Any, limits: Limits, renderer: Renderer
) -> dict[int, bool]:
    """Record each active trajectory's sampled turn; returns, by trajectory, whether the
    turn ended with the end-of-turn token."""
    closed: dict[int, bool] = {}
    for j, i in enumerate(active):
        t = trajs[i]
        ids, ended = _record(t, r, j, limits.room(t), not bool(r.truncated[j]))
        t.last_text = (
            r.texts[j]
            if len(ids) == int(r.lengths[j])
            else renderer.tokenizer.decode(ids, skip_special_tokens=True)
        )
        t.last_ids = ids
        closed[i] = ended and renderer.eot_id is not None and ids[-1:] == [renderer.eot_id]
    return closed


# (prompts, completions, rows, lengths) -> RewardResult-like (total, components, errors)
Scorer = Callable[[list[str], list[str], list[Row], list[int]], Any]


def to_rollout_batch(
    trajs: list[Trajectory],
    tokenizer: PreTrainedTokenizerBase,
    group_size: int,
    scorer: Scorer,
    shaping: Callable[[list[int]], list[float]] | None = None,
    per_turn: bool = True,
) -> RolloutBatch:
    """The trajectories as a `RolloutBatch`: the completion is everything after the prompt,
    `policy_mask` 1 on its sampled tokens; the reward is the environment's summed rewards
    plus the reward terms on the final assistant message, plus `shaping` of each
    trajectory's longest sampled turn (DAPO's overlong penalty is per response, and a turn is
    what `max_new_tokens` bounds). With `per_turn`, `token_rewards` (`turn_token_rewards`)."""
    rows = [{**t.row, ENV_INFO: t.info()} for t in trajs]
    lengths = [len(t.ids) for t in trajs]
    scored = scorer([t.row["prompt"] for t in trajs], [t.last_text for t in trajs], rows, lengths)
    final = torch.tensor(scored.total, dtype=torch.float32)
    total = final + torch.tensor([t.env_reward for t in trajs], dtype=torch.float32)
    shaped = torch.zeros_like(total)
    if shaping is not None:
        longest = [max(t.turn_lengths, default=0) for t in trajs]
        shaped = torch.tensor(shaping(longest), dtype=torch.float32)
    token_rewards = None
    if per_turn:
        token_rewards = [
            turn_token_rewards(t, float(f + s))
            for t, f, s in zip(trajs, final, shaped, strict=True)
        ]
    return RolloutBatch(
        rows=rows,
        prompt_ids=[list(t.prompt_ids) for t in trajs],
        completion_ids=[list(t.ids) for t in trajs],
        sampler_logps=[torch.tensor(t.logps, dtype=torch.float32) for t in trajs],
        entropy=[torch.tensor(t.entropy, dtype=torch.float32) for t in trajs],
        texts=tokenizer.batch_decode([t.ids for t in trajs], skip_special_tokens=False),
        truncated=[t.truncated for t in trajs],
        group_size=group_size,
        rewards=total + shaped,
        components={k: torch.tensor(v) for k, v in scored.components.items()},
        shaping=shaped,
        errors=int(scored.errors),
        policy_mask=[torch.tensor(t.mask, dtype=torch.float32) for t in trajs],
        token_rewards=token_rewards,
    )


def turn_token_rewards(traj: Trajectory, final: float) -> torch.Tensor:
    """`(len(traj.ids),)` float32: each environment step's reward on the last token the
    policy sampled before it, `final` (the reward terms on the last message, and shaping)
    on the episode's last sampled token, zeros elsewhere; all zeros when the policy sampled
    nothing (as `signalrl.losses.advantages.token_level_rewards` gives an empty row)."""
    out = torch.zeros(len(traj.ids), dtype=torch.float32)
    for at, r in [*traj.turn_rewards, (traj.last_sampled, final)]:
        if at >= 0:
            out[at] += r
    return out


def env_metrics(roll: RolloutBatch) -> dict[str, float]:
    """`env/turns`, `env/truncated_frac`, `tools/calls_per_traj`, `tools/error_frac` and
    `tools/<name>/calls` (per trajectory) of a multi-turn batch; {} for a single-turn one."""
    infos = [r[ENV_INFO] for r in roll.rows if ENV_INFO in r]
    return summarize(infos) if infos else {}


def summarize(infos: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The metrics of trajectories' counters (`Trajectory.info`)."""
    n = max(len(infos), 1)
    calls: dict[str, int] = {}
    for info in infos:
        for name, c in info["tool_calls"].items():
            calls[name] = calls.get(name, 0) + c
    attempts = sum(i["tool_attempts"] for i in infos)
    out = {
        "env/turns": sum(i["turns"] for i in infos) / n,
        "env/truncated_frac": sum(bool(i["truncated"]) for i in infos) / n,
        "env/reward": sum(i["env_reward"] for i in infos) / n,
        "tools/calls_per_traj": attempts / n,
        "tools/error_frac": sum(i["tool_errors"] for i in infos) / max(attempts, 1),
        "tools/used_frac": sum(i["tool_attempts"] > 0 for i in infos) / n,
    }
    for name, c in sorted(calls.items()):
        out[f"tools/{name}/calls"] = c / n
    return out


class EnvRollouts:
    """The online trainers' multi-turn rollout path for a recipe's `env` section: builds the
    environments and the renderer once, and samples a global batch as
    `TrainerBase.collect_global` does (each rank its share of whole groups, counter-based
    noise keyed by seed, step, call and global prompt index)."""

    def __init__(self, env_cfg: Any, tokenizer: PreTrainedTokenizerBase, model: Any) -> None:
        from signalrl.envs.base import make_env_factory

        self.make_env, tools = make_env_factory(env_cfg)
        self.renderer = Renderer(tokenizer, [t.schema for t in tools])
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.limits = Limits(env_cfg.max_turns, env_cfg.max_total_tokens, positions)
        self.per_turn = env_cfg.turn_rewards == "per_turn"

    def collect(
        self,
        trainer: Any,
        model: Any,
        rows: list[Row],
        params: SamplingParams,
        scorer: Scorer,
        shaping: Callable[[list[int]], list[float]] | None = None,
    ) -> RolloutBatch:
        from signalrl import distributed

        own = trainer.dist.share(len(rows))
        call, trainer.sample_calls = trainer.sample_calls, trainer.sample_calls + 1
        part: RolloutBatch | None = None
        if own.stop > own.start:
            keys = noise.prompt_keys(
                trainer.recipe.seed, trainer.step, call, torch.arange(own.start, own.stop)
            ).to(trainer.device)
            with trainer.gathered(model):
                trajs, tokens = run_episodes(
                    model,
                    trainer.tokenizer,
                    rows[own],
                    params,
                    self.make_env,
                    self.renderer,
                    self.limits,
                    keys=keys,
                    autocast_dtype=trainer.sampler_autocast(),
                )
            part = to_rollout_batch(
                trajs, trainer.tokenizer, params.n, scorer, shaping, self.per_turn
            )
            if trainer.is_policy(model):
                trainer.budget.forward_tokens += tokens
        if not trainer.dist.active:
            assert part is not None
            return distributed.move(part, trainer.device)
        parts = distributed.gather_objects(distributed.to_cpu(part))
        whole = RolloutBatch.concat([p for p in parts if p is not None])
        return distributed.move(whole, trainer.device)

    def evaluate(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        rows: Sequence[Row],
        verify: Callable[[Row, str], float],
        *,
        max_new_tokens: int,
        batch_size: int = 64,
        autocast_dtype: torch.dtype | None = None,
    ) -> EnvEvalResult:
        """Greedy episodes on `rows`: the accuracy of the final assistant messages under
        `verify`, with the episodes' `env/` and `tools/` metrics (an `EnvEvalResult`)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
        trajs: list[Trajectory] = []
        for s in range(0, len(rows), batch_size):
            part, _ = run_episodes(
                model,
                tokenizer,
                rows[s : s + batch_size],
                params,
                self.make_env,
                self.renderer,
                self.limits,
                autocast_dtype=autocast_dtype,
            )
            trajs += part
        return env_eval_result(trajs, tokenizer, verify)


@dataclass
class EnvEvalResult(EvalResult):
    """An evaluation of greedy episodes: the accuracy plus the `env/` and `tools/` metrics."""

    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = super().metrics(prefix)
        out.update({prefix + k: v for k, v in self.extra.items()})
        return out


def env_eval_result(
    trajs: Sequence[Trajectory], tokenizer: PreTrainedTokenizerBase, verify: Callable[..., float]
) -> EnvEvalResult:
    scores = [float(verify(t.row, t.last_text)) for t in trajs]
    n = max(len(trajs), 1)
    return EnvEvalResult(
        n=len(trajs),
        accuracy=sum(scores) / n,
        mean_length=sum(len(t.ids) for t in trajs) / n,
        completions=tokenizer.batch_decode([t.ids for t in trajs], skip_special_tokens=False),
        extra=summarize([t.info() for t in trajs]),
    )
