"""The environment protocol, the built-in environments and the loader for `env:` recipes.

An environment is one conversation: `reset(row)` gives the first messages (or a plain prompt
string for a task without chat messages); after every assistant turn `step(text, token_ids)`
returns `(observation, reward, done, info)`: the messages to append (None when the episode
ends), this turn's reward, whether it is over, and counters (`tool_calls` by name,
`tool_errors`). A new instance serves each trajectory. Single-turn tasks are the one-step
case (`SingleTurnEnv`), so every rollout goes through the same path
(`signalrl.rollout.multiturn`).

Recipes name an environment in the `env` section:
- `env: {type: single_turn}`: one assistant turn, scored by the reward terms;
- `env: {type: tools, tools: [calculator, python]}`: the policy may call tools
  (`signalrl.envs.tools`) before answering; each call's result comes back as a `tool`
  message; the turn without a call is the answer;
- `env: {type: function, cls: "mymodule:MyEnv", kwargs: {...}}`: a class of your own, built
  as `MyEnv(**kwargs)` for each trajectory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from signalrl.envs.tools import Tool, ToolCall, ToolCallError, load_tools, parse_tool_calls

Message = dict[str, Any]
Row = dict[str, Any]


class EnvStep(NamedTuple):
    observation: list[Message] | None
    reward: float
    done: bool
    info: dict[str, Any]


@runtime_checkable
class Environment(Protocol):
    def reset(self, row: Row) -> list[Message] | str: ...

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep: ...


def load_object(spec: str, where: str) -> Any:
    """`module:attribute` imported (an error naming `where` when it cannot be)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{where}: expected 'module:name', got {spec!r}")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot load {spec!r}: {e}") from None


def first_messages(row: Row) -> list[Message] | str:
    """A row's conversation start: its `messages`, else its plain `prompt` string."""
    msgs = row.get("messages")
    if msgs:
        return [dict(m) for m in msgs]
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"env: the row has neither 'messages' nor a 'prompt' string: {row!r}")
    return prompt


class SingleTurnEnv:
    """One assistant turn, then done (reward 0: the reward terms score the answer)."""

    tools: list[Tool] = []

    def reset(self, row: Row) -> list[Message] | str:
        return first_messages(row)

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep:
        return EnvStep(None, 0.0, True, {})


@dataclass
class ToolEnv:
    """The policy calls `tools` with `<tool_call>` blocks; every call's result (or the
    reason it could not run) is a `tool` message. A turn without a call is the answer and
    ends the episode. `error_reward` is added for each malformed call (0 by default)."""

    tools: list[Tool]
    error_reward: float = 0.0
    by_name: dict[str, Tool] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tools}

    def reset(self, row: Row) -> list[Message] | str:
        return first_messages(row)

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep:
        calls = parse_tool_calls(assistant_text, self.by_name)
        if not calls:
            return EnvStep(None, 0.0, True, {})
        counts: dict[str, int] = {}
        errors = 0
        obs: list[Message] = []
        for call in calls:
            if isinstance(call, ToolCallError):
                errors += 1
                obs.append({"role": "tool", "content": f"error: {call}"})
                continue
            counts[call.name] = counts.get(call.name, 0) + 1
            content, failed = self._run(call)
            errors += failed
            obs.append({"role": "tool", "name": call.name, "content": content})
        info = {"tool_calls": counts, "tool_errors": errors, "tool_attempts": len(calls)}
        return EnvStep(obs, self.error_reward * errors, False, info)

    def _run(self, call: ToolCall) -> tuple[str, int]:
        """The tool's result, and 1 when it raised or reported an error."""
        try:
            out = self.by_name[call.name](call.arguments)
        except ToolCallError as e:
            return f"error: {e}", 1
        except Exception as e:  # noqa: BLE001 - a tool that raises is an observation
            return f"error: tool {call.name} raised {type(e).__name__}: {e}", 1
        return out, int(out.startswith("error:"))


EnvFactory = Callable[[], Any]


def make_env_factory(env: Any) -> tuple[EnvFactory, list[Tool]]:
    """A factory of fresh environments for the recipe's `env` section (an `EnvConfig`)
    and the tools whose schemas the chat template renders (`tools=`)."""
    if env.type == "single_turn":
        return SingleTurnEnv, []
    if env.type == "tools":
        if not env.tools:
            raise ValueError("env.tools: type 'tools' needs at least one tool")
        tools = load_tools(env.tools, timeout=env.tool_timeout, sandbox=env.sandbox)
        return (lambda: ToolEnv(tools, error_reward=env.error_reward)), tools
    if env.type == "function":
        if not env.cls:
            raise ValueError("env.cls: type 'function' needs cls: 'module:ClassName'")
        cls = load_object(env.cls, "env.cls")
        kwargs = dict(env.kwargs)
        probe = cls(**kwargs)
        for name in ("reset", "step"):
            if not callable(getattr(probe, name, None)):
                raise ValueError(f"env.cls: {env.cls} has no {name}() method")
        return (lambda: cls(**kwargs)), list(getattr(probe, "tools", None) or [])
    raise ValueError(f"env.type must be single_turn, tools or function, got {env.type!r}")
