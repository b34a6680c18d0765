"""`guess_number`: a multi-turn task with feedback. The user thinks of a number from 1 to
`high`; the policy guesses, and `GuessNumberEnv` answers `higher`, `lower` or ends the
episode when the guess is right. Learning is across turns: the reply depends on every
earlier feedback message.

Rows are chat rows (`messages`, for a tokenizer with a chat template: `model.tokenizer:
bpe`). The SFT completion is a binary-search demonstration written in ChatML (the format of
the `bpe` preset and of Qwen checkpoints): each guess turn and each feedback turn, ending
with the right guess. The row's `sft_messages` is that whole conversation, so `trainer: sft`
on the task trains the guesses and masks the feedback turns: environment tokens, as in RL,
where they are never in the loss. The verifier reads the last integer of the final
assistant message: 1.0 when the episode ended on the secret, 0 when it ran out of turns.

Recipe: `env: {type: function, cls: "signalrl.tasks.guess_number:GuessNumberEnv",
kwargs: {high: 32}, max_turns: 7}`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from signalrl.envs.base import EnvStep, Message, first_messages
from signalrl.tasks.arithmetic import extract_int_answer
from signalrl.tasks.base import Row

HIGHER, LOWER, INVALID = "higher", "lower", "Reply with one number."


def prompt_text(high: int) -> str:
    return f"I am thinking of a number from 1 to {high}. Guess it."


def binary_search(secret: int, high: int) -> list[int]:
    """The guesses of a binary search for `secret` in 1..`high` (midpoints, rounded down)."""
    lo, hi, guesses = 1, high, []
    while True:
        mid = (lo + hi) // 2
        guesses.append(mid)
        if mid == secret:
            return guesses
        lo, hi = (mid + 1, hi) if secret > mid else (lo, mid - 1)


@dataclass
class GuessNumberTask:
    high: int = 32
    n_train: int = 2000
    n_test: int = 64
    seed: int = 0
    name: str = field(default="guess_number", init=False)

    def __post_init__(self) -> None:
        if self.high < 2:
            raise ValueError("guess_number: high must be >= 2")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError("guess_number: n_train and n_test must be >= 1")

    def _row(self, secret: int) -> Row:
        question = prompt_text(self.high)
        messages = [{"role": "user", "content": question}]
        turns, conversation = [], list(messages)
        guesses = binary_search(secret, self.high)
        for g in guesses[:-1]:
            fb = HIGHER if secret > g else LOWER
            turns.append(
                f"{g}<|im_end|>\n<|im_start|>user\n{fb}<|im_end|>\n<|im_start|>assistant\n"
            )
            conversation += [
                {"role": "assistant", "content": str(g)},
                {"role": "user", "content": fb},
            ]
        conversation.append({"role": "assistant", "content": str(guesses[-1])})
        return {
            "prompt": question,
            "messages": messages,
            "answer": str(secret),
            "completion": "".join(turns) + str(guesses[-1]),
            "sft_messages": conversation,
        }

    def train(self) -> list[Row]:
        """Secrets drawn uniformly from 1..high (the same secrets as the test split: the
        skill is the search, not a memorised answer)."""
        rng = random.Random(self.seed * 1_000_003 + 1)
        return [self._row(rng.randint(1, self.high)) for _ in range(self.n_train)]

    def test(self) -> list[Row]:
        rng = random.Random(self.seed * 1_000_003 + 2)
        return [self._row(rng.randint(1, self.high)) for _ in range(self.n_test)]

    def extract(self, completion: str) -> str | None:
        return extract_int_answer(completion)

    def verify(self, prompt_row: Row, completion: str) -> float:
        got = self.extract(completion)
        return 1.0 if got is not None and got == prompt_row["answer"] else 0.0


class GuessNumberEnv:
    """Feedback for each guess: `higher`, `lower`, a request for one number when the turn
    holds none, or the end of the episode on the secret (reward 0: the verifier scores).

    `inconsistency_penalty` c > 0 gives each guess that the feedback so far rules out (outside
    the interval still allowed, or no number) a per-turn reward of -c; a guess that can be
    right gets 0. The win stays the verifier's 1.0; the per-turn terms are summed into the
    trajectory reward (and given per turn to GAE / REINFORCE++). A bonus for consistent
    guesses instead (+c each) was tried and is a reward hack: more consistent guesses in a
    longer game earn more, and the doctor flagged `rl.reward_hacking` at step 49 of 60 while
    the greedy win rate fell from 0.42 to 0.09."""

    def __init__(self, high: int = 32, inconsistency_penalty: float = 0.0) -> None:
        self.high = high
        self.c = float(inconsistency_penalty)
        self.secret: int | None = None
        self.lo, self.hi = 1, high

    def reset(self, row: Row) -> list[Message] | str:
        self.secret = int(row["answer"])
        self.lo, self.hi = 1, self.high
        return first_messages(row)

    def step(self, assistant_text: str, assistant_token_ids: Sequence[int]) -> EnvStep:
        if self.secret is None:
            raise RuntimeError("GuessNumberEnv.step before reset")
        got = extract_int_answer(assistant_text)
        info: dict[str, Any] = {}
        if got is None:
            return EnvStep([{"role": "user", "content": INVALID}], -self.c, False, info)
        guess = int(got)
        reward = 0.0 if self.lo <= guess <= self.hi else -self.c
        if guess == self.secret:
            return EnvStep(None, reward, True, info)
        if self.secret > guess:
            self.lo = max(self.lo, guess + 1)
        else:
            self.hi = min(self.hi, guess - 1)
        reply = HIGHER if self.secret > guess else LOWER
        return EnvStep([{"role": "user", "content": reply}], reward, False, info)
