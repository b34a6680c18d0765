"""A trained reward model as a reward: `AutoModelForSequenceClassification` with one label,
scoring `prompt + completion` (the format `signalrl.trainers.reward_model` trains on)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class RewardModelScorer:
    def __init__(
        self, path: str, device: str | torch.device | None = None, batch_size: int = 64
    ) -> None:
        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"reward model {path!r}: not a checkpoint directory")
        self.model = AutoModelForSequenceClassification.from_pretrained(p).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {path!r} has {self.model.config.num_labels} labels; "
                "a reward model has one"
            )
        if device is not None:
            self.model.to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(p)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        for q in self.model.parameters():
            q.requires_grad_(False)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        device = next(self.model.parameters()).device
        out: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
                padding_side="right",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out
