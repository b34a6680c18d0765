"""`RolloutBatch`: the typed result of sampling and scoring, shared by every online trainer.

Rows are `P` prompts x `G` samples, grouped contiguously by prompt (row `i` belongs to prompt
`i // G`). Token lists are unpadded; `to_sequence_batch` collates them for a training forward
(see `signalrl.data.collate`). Tensor conventions: docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from signalrl.data.collate import SequenceBatch, build_batch

Row = dict[str, Any]
_PER_TOKEN = ("policy_mask", "token_rewards")  # optional per-token lists (multi-turn)


@dataclass
class RolloutBatch:
    """Sampled completions with their sampler statistics and rewards.

    - `rows[i]`: the task row sample `i` was drawn for; `prompt_ids[i]` its prompt's tokens;
    - `completion_ids[i]`: the sampled tokens (EOS included when sampled), unpadded;
    - `sampler_logps[i]`, `entropy[i]`: 1-D float32, one value per sampled token (the
      sampler's log-prob of the token under `softmax(logits / T)`, and that distribution's
      entropy);
    - `truncated[i]`: the completion hit `max_new_tokens` without EOS or a stop string;
    - `policy_mask[i]` (multi-turn only, else `None`): 1-D float32, one value per completion
      token, 1.0 on the tokens the policy sampled and 0.0 on the environment's (tool results,
      the template's turn markup): the loss covers only the former (`sampled_mask`);
    - `token_rewards[i]` (multi-turn only, else `None`): 1-D float32, one value per
      completion token: each turn's environment reward on that turn's last sampled token,
      the reward terms and shaping on the last sampled token of the episode, zeros elsewhere
      (its sum is `rewards[i]`); the estimators on token-level rewards (GAE, REINFORCE++)
      take it in place of the sequence reward on the last token (`padded_token_rewards`);
    - `rewards` `(N,)`: the total reward used for training (weighted terms + shaping);
      `components[name]` `(N,)`: each reward term's raw value; `shaping` `(N,)`: the part of
      `rewards` that came from length shaping (DAPO's overlong penalty), zeros otherwise;
      `errors`: reward terms that failed and scored 0 (`reward_on_error: zero`).
    """

    rows: list[Row]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampler_logps: list[torch.Tensor]
    entropy: list[torch.Tensor]
    texts: list[str]
    truncated: list[bool]
    group_size: int
    rewards: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    shaping: torch.Tensor | None = None
    errors: int = 0
    policy_mask: list[torch.Tensor] | None = None
    token_rewards: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        for name in _PER_TOKEN:
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != len(self.completion_ids):
                raise ValueError(
                    f"RolloutBatch.{name}: {len(values)} rows for {len(self.completion_ids)} "
                    "completions"
                )
            for i, (v, c) in enumerate(zip(values, self.completion_ids, strict=True)):
                if v.dim() != 1 or v.shape[0] != len(c):
                    raise ValueError(
                        f"RolloutBatch.{name}[{i}]: shape {tuple(v.shape)} for a completion "
                        f"of {len(c)} tokens"
                    )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def group_rewards(self) -> torch.Tensor:
        """`(P, G)` view of the rewards."""
        return self.rewards.view(-1, self.group_size)

    def select(self, idx: Sequence[int]) -> RolloutBatch:
        """Rows `idx` (whole groups when `idx` is made of whole groups: `group_size` is kept)."""
        idx = list(idx)
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in idx]
            elif isinstance(v, dict):
                out[f.name] = {k: t[idx] for k, t in v.items()}
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    @staticmethod
    def concat(parts: Sequence[RolloutBatch]) -> RolloutBatch:
        """Rows of `parts` in order; `errors` add up."""
        if not parts:
            raise ValueError("RolloutBatch.concat needs at least one part")
        first = parts[0]
        out: dict[str, Any] = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if f.name in _PER_TOKEN and any(
                (getattr(p, f.name) is None) != (v is None) for p in parts
            ):
                raise ValueError(
                    f"RolloutBatch.concat: some parts have {f.name} and some do not "
                    "(multi-turn and single-turn rollouts do not mix)"
                )
            if isinstance(v, torch.Tensor):
                out[f.name] = torch.cat([getattr(p, f.name) for p in parts])
            elif isinstance(v, list):
                out[f.name] = [x for p in parts for x in getattr(p, f.name)]
            elif isinstance(v, dict):
                out[f.name] = {k: torch.cat([p.components[k] for p in parts]) for k in v}
            elif f.name == "errors":
                out[f.name] = sum(p.errors for p in parts)
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def to_sequence_batch(self, pad_id: int, device: torch.device | str) -> SequenceBatch:
        """The collated batch. Its `completion_mask` is 1.0 on every completion token, the
        environment's included: the forward attends to them (they are the context of the
        next turn); `sampled_mask` is what the loss counts."""
        return build_batch(self.prompt_ids, self.completion_ids, pad_id, device=device)

    def sampled_mask(self, width: int, device: torch.device | str) -> torch.Tensor | None:
        """`(N, width)` `policy_mask`, zero-padded; `None` for a single-turn batch (every
        completion token was sampled)."""
        if self.policy_mask is None:
            return None
        return self.padded(self.policy_mask, width, device)

    def estimator_mask_and_rewards(
        self, completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the advantage estimators see: `completion_mask` `(N, T)` times the policy
        mask (environment tokens are neither rewarded, nor in an in-reward KL, nor steps of
        GAE's recursion) and the `(N, T)` `token_rewards`; for a single-turn batch the
        `completion_mask` itself and `None`."""
        width, device = completion_mask.shape[1], completion_mask.device
        sampled = self.sampled_mask(width, device)
        mask = completion_mask if sampled is None else completion_mask * sampled
        return mask, self.padded_token_rewards(width, device)

    def padded_token_rewards(self, width: int, device: torch.device | str) -> torch.Tensor | None:
        """`(N, width)` `token_rewards`, zero-padded; `None` for a single-turn batch."""
        if self.token_rewards is None:
            return None
        return self.padded(self.token_rewards, width, device)

    def padded(
        self, values: list[torch.Tensor], width: int, device: torch.device | str
    ) -> torch.Tensor:
        """`(N, width)` of per-token `values` (`sampler_logps`, `entropy`, `policy_mask`,
        `token_rewards`), zero-padded."""
        out = torch.zeros((len(self), width), device=device)
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        return out

    def samples(self, **per_row: Sequence[float]) -> list[Row]:
        """Rows for `samples.jsonl`: prompt, completion, answer, reward, plus `per_row`."""
        return [
            {
                "prompt": self.rows[i]["prompt"],
                "completion": self.texts[i],
                "answer": self.rows[i].get("answer"),
                "reward": float(self.rewards[i]),
                **{k: float(v[i]) for k, v in per_row.items()},
            }
            for i in range(len(self))
        ]
