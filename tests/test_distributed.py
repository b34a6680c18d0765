"""Two gloo ranks under torchrun against one process: the same result whatever the number of
ranks (issue: scale-out). Each test launches `torchrun --nproc_per_node=2 -m signalrl train`
exactly as a user does, and `python -m signalrl train` for the single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from signalrl import distributed

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
COMMON: dict[str, Any] = {
    "seed": 0,
    "logging": {"tensorboard": False, "progress": False, "samples_every": 1, "samples_n": 1000},
    "doctor": {"enabled": False},
    "eval": {"n": 8},
}
ONE_DIGIT = {"name": "arithmetic", "digits": 1, "ops": "+", "operands": 2, "n_test": 8}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return env


def train(recipe: dict[str, Any], tmp: Path, ranks: int, *args: str, check: bool = True):
    """Run `signalrl train` on `recipe` with 1 process or `ranks` torchrun ranks."""
    path = tmp / f"{recipe['name']}-{ranks}-{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    if ranks == 1:
        cmd = [sys.executable, "-m", "signalrl", "train", str(path), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={ranks}", "-m", "signalrl", "train", str(path), *args]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def one_and_two(r: dict[str, Any], tmp: Path, parallel: str = "ddp") -> tuple[Path, Path]:
    """Train `r` in one process and on 2 ranks under `train.parallel: parallel`; the run dirs."""
    train(r, tmp, 1)
    two = {**r, "output_dir": str(tmp / "runs2")}
    two["train"] = {**r["train"], "parallel": parallel}
    train(two, tmp, 2)
    return Path(r["output_dir"]) / r["name"], tmp / "runs2" / r["name"]


def recipe(name: str, out: Path, **sections: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "output_dir": str(out), **COMMON}
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def rel_diff(a_dir: Path, b_dir: Path) -> float:
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    return num / den


def rows(path: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / name).read_text().splitlines()]


def moved(run: Path, start: Path) -> float:
    """How far training moved the weights from the start (so equality is not vacuous)."""
    return rel_diff(run / "final", start)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model SFT'd on 1-digit addition (about 0.4 greedy accuracy): online methods
    get both right and wrong samples from it."""
    from signalrl.config import recipe_from_dict
    from signalrl.trainers import run_recipe

    out = tmp_path_factory.mktemp("base")
    r = recipe(
        "base",
        out,
        trainer="sft",
        model={"name_or_path": "tiny", "device": "cpu", "attn_implementation": "eager"},
        task=ONE_DIGIT,
        train={"steps": 80, "lr": 0.003, "batch_size": 32, "warmup_steps": 10},
        sampling={"max_new_tokens": 4},
    )
    run_recipe(recipe_from_dict(r))
    return out / "base" / "final"


def test_sft_two_ranks_equal_one_process(tmp_path: Path) -> None:
    r = recipe(
        "sft",
        tmp_path / "runs",
        trainer="sft",
        model={"name_or_path": "tiny", "device": "cpu"},
        train={"steps": 10, "lr": 0.002, "batch_size": 8, "micro_batch_size": 2},
    )
    train(r, tmp_path, 1)
    two = {**r, "output_dir": str(tmp_path / "runs2")}
    train(two, tmp_path, 2)
    one_dir, two_dir = tmp_path / "runs" / "sft", tmp_path / "runs2" / "sft"
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-5
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    assert [x["tokens"] for x in m1[:-1]] == [x["tokens"] for x in m2[:-1]]  # global counts
    assert m1[-2]["student/forward_tokens"] == m2[-2]["student/forward_tokens"]
    # only rank 0 wrote: one metrics row per step
    assert len(m2) == len(m1)


def test_dpo_two_ranks_equal_one_process(tmp_path: Path) -> None:
    r = recipe(
        "dpo",
        tmp_path / "runs",
        trainer="preference",
        model={"name_or_path": "tiny", "device": "cpu"},
        data={"path": str(ROOT / "tests/data/prefs_sample.jsonl"), "test_fraction": 0.0},
        preference={"loss_type": "sigmoid", "beta": 0.1},
        train={"steps": 10, "lr": 0.002, "batch_size": 4, "micro_batch_size": 1},
        eval={"train_pairs": 0},
    )
    train(r, tmp_path, 1)
    train({**r, "output_dir": str(tmp_path / "runs2")}, tmp_path, 2)
    one_dir, two_dir = tmp_path / "runs" / "dpo", tmp_path / "runs2" / "dpo"
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-5
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        assert m1[3][key] == pytest.approx(m2[3][key], rel=1e-4, abs=1e-6), key


def _grpo(out: Path, model: Path, **rl: Any) -> dict[str, Any]:
    return recipe(
        "grpo",
        out,
        trainer="online_rl",
        model={"name_or_path": str(model), "device": "cpu", "attn_implementation": "eager"},
        task=ONE_DIGIT,
        rl={"algorithm": "grpo", "group_size": 8, **rl},
        train={"steps": 3, "lr": 0.002, "batch_size": 4},
        sampling={"max_new_tokens": 4},
    )


@pytest.mark.parametrize(
    ("agg", "parallel"),
    [("seq-mean-token-mean", "ddp"), ("token-mean", "ddp"), ("token-mean", "fsdp2")],
)
def test_grpo_two_ranks_sample_and_train_as_one(
    tmp_path: Path, base_model: Path, agg: str, parallel: str
) -> None:
    r = _grpo(tmp_path / "runs", base_model, loss_agg=agg)
    one_dir, two_dir = one_and_two(r, tmp_path, parallel)
    s1 = [x for x in rows(one_dir, "samples.jsonl") if x["step"] == 1]
    s2 = [x for x in rows(two_dir, "samples.jsonl") if x["step"] == 1]
    assert len(s1) == 32
    assert [x["completion"] for x in s1] == [x["completion"] for x in s2]
    assert [x["reward"] for x in s1] == [x["reward"] for x in s2]
    # a learning signal from step 1 (Adam turns a zero gradient's rounding noise into a
    # full-size step, so a step without signal would not compare)
    assert rows(one_dir, "metrics.jsonl")[0]["grad_norm"] > 1e-3
    assert moved(one_dir, base_model) > 1e-4
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-4
    # final/ of a sharded run is a plain HF checkpoint
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two_dir / "final")


def test_clip_cov_picks_the_same_tokens_on_two_ranks(tmp_path: Path, base_model: Path) -> None:
    """Clip-Cov's random pick is keyed by global row ids, so a micro-batch of rows 16..31
    drops the same tokens on rank 1 as in one process: the runs agree (the covariance and
    the count are per micro-batch, as in verl, so both runs use 16-row micro-batches)."""
    r = _grpo(
        tmp_path / "runs", base_model, loss_type="clip_cov", mu=2, cov_frac=0.05,
        clip_cov_lb=-100.0, clip_cov_ub=100.0,
    )
    r["train"] = {**r["train"], "micro_batch_size": 16}
    one_dir, two_dir = one_and_two(r, tmp_path)
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    dropped = [x["clip_frac/cov"] for x in m1]
    assert min(dropped) > 0  # tokens were dropped at every step, so the pick matters
    assert dropped == pytest.approx([x["clip_frac/cov"] for x in m2], rel=1e-6)
    assert moved(one_dir, base_model) > 1e-4
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-4


def test_multi_turn_episodes_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """Environments under torchrun: each rank runs the episodes of its share of the prompts
    (noise keyed by global row ids), the ranks gather them, and REINFORCE++ on the per-turn
    rewards trains the same weights as one process."""
    r = recipe(
        "env",
        tmp_path / "runs",
        trainer="online_rl",
        model={"name_or_path": "tiny", "tokenizer": "bpe", "attn_implementation": "eager"},
        task={"name": "arithmetic_tools", "n_train": 16, "n_test": 4},
        env={"type": "function", "cls": "test_envs:CountingEnv", "kwargs": {"turns": 2},
             "max_turns": 3, "max_total_tokens": 64},  # fmt: skip
        rl={"algorithm": "reinforce_pp", "group_size": 2, "kl_coef": 0.0},
        train={"steps": 2, "lr": 0.002, "batch_size": 4},
        sampling={"max_new_tokens": 8, "stop_strings": ["e"]},
        eval={"n": 4, "every": 0},
    )
    one_dir, two_dir = one_and_two(r, tmp_path)
    s1, s2 = rows(one_dir, "samples.jsonl"), rows(two_dir, "samples.jsonl")
    assert len(s1) == 16 and [x["completion"] for x in s1] == [x["completion"] for x in s2]
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    assert m1[0]["env/turns"] > 1 and m1[0]["env/turns"] == pytest.approx(m2[0]["env/turns"])
    assert m1[0]["grad_norm"] > 1e-3
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-4


def test_online_dpo_two_ranks_equal_one_process(tmp_path: Path, base_model: Path) -> None:
    r = recipe(
        "odpo",
        tmp_path / "runs",
        trainer="preference",
        model={"name_or_path": str(base_model), "device": "cpu", "attn_implementation": "eager"},
        task=ONE_DIGIT,
        preference={"loss_type": "sigmoid", "online": True, "online_samples": 8},
        train={"steps": 3, "lr": 0.002, "batch_size": 8},
        sampling={"max_new_tokens": 4},
        eval={"train_pairs": 0},
    )
    train(r, tmp_path, 1)
    train({**r, "output_dir": str(tmp_path / "runs2")}, tmp_path, 2)
    one_dir, two_dir = tmp_path / "runs" / "odpo", tmp_path / "runs2" / "odpo"
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    assert m1[0]["online/pairs"] == m2[0]["online/pairs"] > 0
    assert m1[0]["online/sample_accuracy"] == m2[0]["online/sample_accuracy"]
    assert moved(one_dir, base_model) > 1e-4
    assert rel_diff(one_dir / "final", two_dir / "final") < 1e-4


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_under_another_world_size(
    tmp_path: Path, base_model: Path, first: int, then: int
) -> None:
    """A checkpoint written by `first` ranks resumes under `then` ranks and continues the
    same run as an uninterrupted one-process run."""
    r = _grpo(tmp_path / "runs", base_model)
    r["train"] = {**r["train"], "steps": 4}
    r["checkpoint"] = {"every": 2}
    train(r, tmp_path, 1)
    cut = {**r, "output_dir": str(tmp_path / "cut")}
    cut["train"] = {**r["train"], "steps": 3}  # checkpoint at step 2, final at 3
    train(cut, tmp_path, first)
    # delete what ran past the checkpoint: resume continues from step 2
    train({**cut, "train": r["train"]}, tmp_path, then, "--resume")
    full, resumed = tmp_path / "runs" / "grpo", tmp_path / "cut" / "grpo"
    assert rel_diff(full / "final", resumed / "final") < 1e-4
    m1, m2 = rows(full, "metrics.jsonl"), rows(resumed, "metrics.jsonl")
    assert [x["step"] for x in m2] == [x["step"] for x in m1]
    assert m1[2]["reward/mean"] == m2[2]["reward/mean"]  # step 3, sampled after the resume


def test_world_size_must_divide_the_batch(tmp_path: Path) -> None:
    r = recipe(
        "odd",
        tmp_path / "runs",
        trainer="sft",
        model={"name_or_path": "tiny", "device": "cpu"},
        train={"steps": 2, "batch_size": 3},
    )
    out = train(r, tmp_path, 2, check=False)
    assert out.returncode != 0
    assert "train.batch_size 3 is not divisible by the 2 ranks" in out.stderr
    assert not (tmp_path / "runs" / "odd").exists()  # nothing written


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    r = recipe(
        "boom",
        tmp_path / "runs",
        trainer="online_rl",
        model={"name_or_path": "tiny", "device": "cpu"},
        rl={"algorithm": "grpo", "group_size": 2},
        rewards=[{"type": "function", "fn": "rewards_plugin:fails_on_rank_1"}],
        train={"steps": 2, "batch_size": 2},
        sampling={"max_new_tokens": 2},
    )
    out = train(r, tmp_path, 2, check=False)  # the timeout (300 s) would catch a hang
    assert out.returncode != 0
    assert "reward server down on rank 1" in out.stderr


def test_fsdp2_needs_more_than_one_rank(tmp_path: Path) -> None:
    from signalrl.config import recipe_from_dict
    from signalrl.trainers import run_recipe

    r = recipe(
        "fsdp",
        tmp_path / "runs",
        trainer="sft",
        model={"name_or_path": "tiny", "device": "cpu"},
        train={"steps": 2, "batch_size": 2, "parallel": "fsdp2"},
    )
    with pytest.raises(ValueError, match="fsdp2 needs more than one rank"):
        run_recipe(recipe_from_dict(r))
    assert not (tmp_path / "runs" / "fsdp").exists()


def test_share_splits_whole_items_in_rank_order() -> None:
    shares = [distributed.Dist(rank=r, world=3).share(10) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 4), (4, 7), (7, 10)]
    assert distributed.resolve_strategy("auto", 1) == "none"
    assert distributed.resolve_strategy("auto", 4) == "ddp"
    with pytest.raises(ValueError, match="none but torchrun started 2 ranks"):
        distributed.resolve_strategy("none", 2)


def test_counter_based_sampling_follows_the_distribution() -> None:
    """Gumbel-max with counter-based noise samples softmax(logits / T): frequencies over
    many keys match the probabilities (4-sigma bounds)."""
    from signalrl.rollout import noise

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 20000
    keys = noise.prompt_keys(0, 1, 0, torch.arange(n))
    vocab = noise.hash32(torch.arange(5))
    toks = (logits + noise.gumbel(keys, 3, 5, vocab)).argmax(-1)
    freq = torch.bincount(toks, minlength=5).double() / n
    p = torch.softmax(logits[0].double(), -1)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * sigma).all(), (freq, p)
    # a pure function of the key: the same noise on a second call, other noise elsewhere
    assert torch.equal(noise.gumbel(keys[:8], 3, 5, vocab), noise.gumbel(keys[:8], 3, 5, vocab))
    assert not torch.equal(noise.gumbel(keys[:8], 3, 5, vocab), noise.gumbel(keys[:8], 4, 5, vocab))


def _case(name: str, out: Path, base: Path) -> dict[str, Any]:
    """The trainers the GRPO/DPO/SFT tests above do not cover, 3 steps each."""
    tiny = {"name_or_path": "tiny", "device": "cpu", "attn_implementation": "eager"}
    sft = {"name_or_path": str(base), "device": "cpu", "attn_implementation": "eager"}
    steps = {"steps": 3, "lr": 0.002}
    prefs = {"path": str(ROOT / "tests/data/prefs_sample.jsonl"), "test_fraction": 0.0}
    if name == "kto":
        return recipe(
            name,
            out,
            trainer="preference",
            model=tiny,
            data={"path": str(ROOT / "tests/data/kto_sample.jsonl"), "test_fraction": 0.0},
            preference={"loss_type": "kto"},
            train={**steps, "batch_size": 4, "micro_batch_size": 1},
            eval={"train_pairs": 0},
        )
    if name == "dpo":
        return recipe(
            name,
            out,
            trainer="preference",
            model=tiny,
            data=prefs,
            preference={"loss_type": "sigmoid", "beta": 0.1},
            train={**steps, "batch_size": 4, "micro_batch_size": 1},
            eval={"train_pairs": 0},
        )
    if name == "rm":
        return recipe(
            name, out, trainer="reward_model", model=tiny, data=prefs,
            train={**steps, "batch_size": 4, "micro_batch_size": 1},
        )  # fmt: skip
    if name == "distill":
        return recipe(
            name,
            out,
            trainer="distill",
            model=tiny,
            task=ONE_DIGIT,
            distill={"teacher": str(base), "mode": "on_policy"},
            rl={"group_size": 4},
            train={**steps, "batch_size": 4},
            sampling={"max_new_tokens": 4},
        )
    if name == "lora":
        return recipe(
            name,
            out,
            trainer="online_rl",
            model=sft,
            task=ONE_DIGIT,
            lora={"enabled": True, "r": 4, "merge": True},
            rl={"algorithm": "grpo", "group_size": 8, "kl_coef": 0.05},
            train={"steps": 3, "lr": 0.02, "batch_size": 4},
            sampling={"max_new_tokens": 4},
        )
    assert name == "ppo"
    return recipe(
        name,
        out,
        trainer="online_rl",
        model=sft,
        task=ONE_DIGIT,
        rl={"algorithm": "ppo", "group_size": 4, "critic_lr": 3e-3},
        train={**steps, "batch_size": 8},
        sampling={"max_new_tokens": 4},
    )


@pytest.mark.parametrize(
    ("name", "parallel", "bound"),
    [
        ("kto", "ddp", 1e-5),
        ("rm", "ddp", 1e-5),
        ("rm", "fsdp2", 1e-5),
        ("dpo", "fsdp2", 1e-5),
        ("distill", "fsdp2", 1e-4),
        ("ppo", "ddp", 1e-4),
        ("ppo", "fsdp2", 1e-4),
        ("lora", "fsdp2", 1e-4),
    ],
)
def test_every_trainer_two_ranks_equal_one_process(
    tmp_path: Path, base_model: Path, name: str, parallel: str, bound: float
) -> None:
    """KTO and the reward model under ddp; preference, reward model, distillation, PPO (policy
    and critic) and a LoRA policy under fsdp2: final/ after 3 steps equals one process's."""
    r = _case(name, tmp_path / "runs", base_model)
    train(r, tmp_path, 1)
    two = {**r, "output_dir": str(tmp_path / "runs2")}
    two["train"] = {**r["train"], "parallel": parallel}
    train(two, tmp_path, 2)
    one_dir, two_dir = tmp_path / "runs" / name, tmp_path / "runs2" / name
    m1, m2 = rows(one_dir, "metrics.jsonl"), rows(two_dir, "metrics.jsonl")
    assert len(m1) == len(m2)
    assert m1[0]["loss"] == pytest.approx(m2[0]["loss"], rel=1e-4, abs=1e-6)
    if name == "ppo":  # the critic too: its values after 3 steps decide step 3's advantages
        assert moved(one_dir, base_model) > 1e-4
        for key in ("value_loss", "reward/mean"):
            assert m1[-2][key] == pytest.approx(m2[-2][key], rel=1e-4, abs=1e-6), key
    if name == "lora":  # final/ is the adapter; final/merged the merged model
        one_dir, two_dir = one_dir / "final", two_dir / "final"
        assert (two_dir / "adapter_model.safetensors").is_file()
        assert rel_diff(one_dir / "merged", two_dir / "merged") < bound
        return
    assert rel_diff(one_dir / "final", two_dir / "final") < bound
