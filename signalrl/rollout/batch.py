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


@dataclass
class RolloutBatch:
    """Sampled completions with their sampler statistics and rewards.

    - `rows[i]`: the task row sample `i` was drawn for; `prompt_ids[i]` its prompt's tokens;
    - `completion_ids[i]`: the sampled tokens (EOS included when sampled), unpadded;
    - `sampler_logps[i]`, `entropy[i]`: 1-D float32, one value per sampled token (the
      sampler's log-prob of the token under `softmax(logits / T)`, and that distribution's
      entropy);
    - `truncated[i]`: the completion hit `max_new_tokens` without EOS or a stop string;
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
        return build_batch(self.prompt_ids, self.completion_ids, pad_id, device=device)

    def padded(
        self, values: list[torch.Tensor], width: int, device: torch.device | str
    ) -> torch.Tensor:
        """`(N, width)` of per-token `values` (`sampler_logps` or `entropy`), zero-padded."""
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
