from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from signalrl.config import RecipeError, load_recipe, recipe_from_dict
from signalrl.logging import read_metrics
from signalrl.models import load_model, save_model
from signalrl.trainers import trainer_class
from signalrl.trainers.distill import DistillTrainer, check_same_vocab
from signalrl.trainers.sft import SFTTrainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainers import SevenTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SevenSFTTask(SevenTask):
    """SevenTask with SFT targets: the completion is '7' (then EOS)."""

    rows: list = field(
        default_factory=lambda: [
            {"prompt": f"{i}:", "answer": "7", "completion": "7"} for i in range(20)
        ]
    )


@pytest.fixture(scope="module")
def seven_teacher(tmp_path_factory) -> str:
    """A tiny model SFT-trained to answer '7': puts most of its mass on '7' then EOS."""
    out = tmp_path_factory.mktemp("teacher")
    r = recipe_from_dict(
        {
            "name": "teacher",
            "output_dir": str(out),
            "trainer": "sft",
            "model": {"name_or_path": "tiny", "seed": 0, "attn_implementation": "eager"},
            "train": {"steps": 30, "lr": 3e-3, "batch_size": 20},
            "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
        },
        "teacher",
    )
    t = SFTTrainer(r, task=SevenSFTTask())
    for _ in range(r.train.steps):
        t.train_step()
    path = out / "seven"
    save_model(t.model, t.tokenizer, path)
    return str(path)


def _recipe(tmp_path, teacher, **over):
    data = {
        "name": "distill",
        "output_dir": str(tmp_path),
        "trainer": "distill",
        "seed": 0,
        "model": {"name_or_path": "tiny", "seed": 1, "attn_implementation": "eager"},
        "train": {"steps": 40, "lr": 5e-3, "batch_size": 4},
        "rl": {"group_size": 4},
        "sampling": {"max_new_tokens": 4},
        "distill": {"teacher": teacher},
        "eval": {"k": 0, "n": 4},
        "logging": {"progress": False, "samples_every": 0, "tensorboard": False},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe_from_dict(data, "test")


def _mean(xs):
    return sum(xs) / len(xs)


def test_on_policy_distillation_moves_student_to_teacher(tmp_path, seven_teacher):
    # 60 steps: at 40 one seed in three (seed 0, with counter-based sampling) was still
    # halfway (reverse KL 7.8 -> 5.0); at 60 seeds 0, 1, 2 all end near 0
    r = _recipe(tmp_path, seven_teacher, train={"steps": 60})
    assert r.rl.loss_agg == "token-mean" and not r.rl.uses_reference
    assert trainer_class("distill") is DistillTrainer
    t = DistillTrainer(r, task=SevenTask())
    out = t.train()
    rows = read_metrics(tmp_path / "distill")
    tl = [x["distill/teacher_logp"] for x in rows if "distill/teacher_logp" in x]
    kl = [x["distill/reverse_kl"] for x in rows if "distill/reverse_kl" in x]
    rw = [x["reward/mean"] for x in rows if "reward/mean" in x]
    # observed (seed 0, 60 steps): teacher log-prob -12.3 -> -0.1, reverse KL 7.8 -> 0.1,
    # reward 0.01 -> 0.99
    assert _mean(tl[-5:]) > _mean(tl[:5]) + 4.0, (tl[:5], tl[-5:])
    assert _mean(kl[-5:]) < 0.5 * _mean(kl[:5]), (kl[:5], kl[-5:])
    assert _mean(rw[-5:]) > _mean(rw[:5]) + 0.3, (rw[:5], rw[-5:])
    assert rows[0]["models/held"] == 2
    assert "eval/accuracy" in rows[-1] and "accuracy" in out


def test_advantage_is_negative_reverse_kl(tmp_path):
    # teacher == student (same preset, same seed): reverse KL ~ 0 and advantages ~ 0
    r = _recipe(tmp_path, "tiny", model={"seed": 0})
    t = DistillTrainer(r, task=SevenTask())
    roll, _ = t.collect()
    from signalrl.data.collate import build_batch

    batch = build_batch(roll.prompt_ids, roll.completion_ids, t.tokenizer.pad_token_id)
    behaviour = torch.zeros(batch.completion_ids.shape)
    for i, lp in enumerate(roll.sampler_logps):
        behaviour[i, : lp.shape[0]] = lp
    slices = t.micro_slices(len(batch))
    adv, _ = t.advantages(roll.rewards, batch, behaviour, None, slices, roll.prompt_ids)
    assert adv.shape == batch.completion_ids.shape
    assert adv.abs().max() < 1e-4
    assert abs(t._distill_metrics["distill/reverse_kl"]) < 1e-4
    # with another teacher: the advantage is exactly -(student - teacher) on the tokens
    t.teacher, _ = load_model("tiny", seed=5)
    adv, _ = t.advantages(roll.rewards, batch, behaviour, None, slices, roll.prompt_ids)
    teacher = t._logps_no_grad(t.teacher, batch, roll.prompt_ids, slices)
    mask = batch.completion_mask
    torch.testing.assert_close(adv, -(behaviour - teacher) * mask)
    assert adv.abs().max() > 0.1
    # reward mixing adds reward_weight * group-normalised reward on every token
    t.recipe.distill.reward_weight = 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0] * 4)
    mixed, _ = t.advantages(rewards, batch, behaviour, None, slices, roll.prompt_ids)
    g = (rewards.view(-1, 4) - rewards.view(-1, 4).mean(-1, keepdim=True)) / (
        rewards.view(-1, 4).std(-1, keepdim=True) + 1e-6
    )
    torch.testing.assert_close(mixed - adv, 0.5 * g.flatten()[:, None] * mask)


def test_tokenizer_mismatch_names_sizes_and_token(tmp_path):
    model, tok = load_model("tiny")
    n = len(tok.get_vocab())
    tok.add_tokens(["<extra_tok>"])
    model.resize_token_embeddings(len(tok))
    save_model(model, tok, tmp_path / "teacher")
    with pytest.raises(ValueError) as e:
        DistillTrainer(_recipe(tmp_path, str(tmp_path / "teacher")), task=SevenTask())
    msg = str(e.value)
    assert f"{n + 1} (teacher)" in msg and f"{n} (student)" in msg, msg
    assert "'<extra_tok>'" in msg, msg
    _, student = load_model("tiny")
    check_same_vocab(student, load_model("tiny")[1])  # same vocabulary: no error


def test_off_policy_lowers_nll_on_teacher_samples(tmp_path, seven_teacher):
    r = _recipe(tmp_path, seven_teacher, distill={"mode": "off_policy"}, train={"steps": 15})
    t = DistillTrainer(r, task=SevenTask())
    t.train()
    rows = read_metrics(tmp_path / "distill")
    nll = [x["distill/nll"] for x in rows if "distill/nll" in x]
    # observed: 4.6 -> 0.01
    assert _mean(nll[-3:]) < 0.5 * _mean(nll[:3]), nll
    assert rows[0]["models/held"] == 2


def test_distill_recipe_needs_a_teacher(tmp_path):
    with pytest.raises(RecipeError, match="distill.teacher"):
        recipe_from_dict({"trainer": "distill"}, "x")
    with pytest.raises(RecipeError, match="group_size"):
        recipe_from_dict(
            {
                "trainer": "distill",
                "distill": {"teacher": "tiny", "reward_weight": 1.0},
                "rl": {"group_size": 1, "advantage": "reinforce_pp"},
            },
            "x",
        )
    r = recipe_from_dict(
        {"trainer": "distill", "distill": {"teacher": "t"}, "rl": {"kl_coef": 0.1}}, "x"
    )
    assert r.rl.kl_coef == 0.1 and r.rl.loss_agg == "token-mean"
    r = load_recipe(ROOT / "recipes" / "distill-arithmetic.yaml")
    assert r.trainer == "distill" and r.distill.teacher == "runs/teacher-base-arithmetic-3/final"
    assert (r.train.batch_size, r.rl.group_size, r.train.steps) == (16, 8, 300)
    g = load_recipe(ROOT / "recipes" / "distill-gkd-arithmetic.yaml")
    assert g.distill.mode == "gkd" and g.distill.teacher == r.distill.teacher


def test_base_teacher_shares_the_tiny_students_tokenizer():
    # three SFT stages from the base preset; the distillation recipes use the last one
    stages = [
        load_recipe(ROOT / "recipes" / f"teacher-base-arithmetic{s}.yaml") for s in ("", "-2", "-3")
    ]
    assert stages[0].trainer == "sft" and stages[0].model.name_or_path == "base"
    for prev, nxt in zip(stages, stages[1:], strict=False):
        assert nxt.model.name_or_path == f"{prev.output_dir}/{prev.name}/final"
        assert nxt.train.lr < prev.train.lr and nxt.task == prev.task
    teacher = load_recipe(ROOT / "recipes" / "distill-arithmetic.yaml").distill.teacher
    assert teacher == f"{stages[-1].output_dir}/{stages[-1].name}/final"
    _, base = load_model("base")
    _, tiny = load_model("tiny")
    check_same_vocab(tiny, base, "tiny", "base")  # same character vocabulary: no error


# -- GKD ------------------------------------------------------------------------------------


def _sources(t: DistillTrainer) -> list[str]:
    """Records which data each GKD step used: 'student', 'teacher' or 'dataset'."""
    seen: list[str] = []
    sampled, reference = t._sampled, t._reference_batch

    def spy_sampled(model):
        seen.append("student" if model is t.model else "teacher")
        return sampled(model)

    def spy_reference():
        seen.append("dataset")
        return reference()

    t._sampled = spy_sampled  # type: ignore[method-assign]
    t._reference_batch = spy_reference  # type: ignore[method-assign]
    return seen


def test_gkd_on_student_samples_lowers_jsd_and_raises_teacher_logp(tmp_path, seven_teacher):
    r = _recipe(tmp_path, seven_teacher, distill={"mode": "gkd", "lmbda": 1.0}, train={"steps": 25})
    t = DistillTrainer(r, task=SevenSFTTask())
    assert t.ref_completions == []  # lmbda=1 never reads the references
    seen = _sources(t)
    t.train()
    assert seen == ["student"] * 25
    rows = read_metrics(tmp_path / "distill")
    jsd = [x["distill/jsd"] for x in rows if "distill/jsd" in x]
    tl = [x["distill/teacher_logp"] for x in rows if "distill/teacher_logp" in x]
    assert all(x["distill/on_policy"] == 1.0 for x in rows if "distill/on_policy" in x)
    # observed (seed 0): JSD 0.67 -> 0.002, teacher log-prob of student samples -12 -> -0.1
    assert _mean(jsd[-3:]) < 0.5 * _mean(jsd[:3]), jsd
    assert _mean(tl[-3:]) > _mean(tl[:3]) + 4.0, tl
    tokens = [x["student/forward_tokens"] for x in rows]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert "distill/reverse_kl" in rows[0] and "reward/mean" in rows[0]


def test_gkd_lambda_picks_the_data_source_deterministically(tmp_path, seven_teacher):
    # lmbda=0, dataset: the task's reference completions ('7' + EOS), no student generation
    r = _recipe(tmp_path, seven_teacher, distill={"mode": "gkd", "lmbda": 0.0})
    t = DistillTrainer(r, task=SevenSFTTask())
    seen = _sources(t)
    m, samples = t.train_step()
    assert seen == ["dataset"] and m["distill/on_policy"] == 0.0
    assert len(samples) == 4 * 4 and {s["completion"] for s in samples} == {"7"}
    assert "reward/mean" not in m and "distill/reverse_kl" not in m
    eos = t.tokenizer.eos_token_id
    assert t.ref_completions[0] == [*t.tokenizer("7", add_special_tokens=False)["input_ids"], eos]
    # only the training forward counts: each row's prompt + '7' + EOS
    assert m["student/forward_tokens"] == sum(len(s["prompt"]) + 2 for s in samples)
    # lmbda=0, teacher: the teacher's samples
    r = _recipe(
        tmp_path, seven_teacher, distill={"mode": "gkd", "lmbda": 0.0, "gkd_data": "teacher"}
    )
    t = DistillTrainer(r, task=SevenTask(), overwrite=True)
    seen = _sources(t)
    t.train_step()
    assert seen == ["teacher"]
    # lmbda=0.5: a seeded coin, the same sequence and losses under the same seed
    runs = []
    for _ in range(2):
        r = _recipe(tmp_path, seven_teacher, distill={"mode": "gkd", "lmbda": 0.5})
        t = DistillTrainer(r, task=SevenSFTTask(), overwrite=True)
        seen = _sources(t)
        losses = [t.train_step()[0]["loss"] for _ in range(10)]
        runs.append((seen, losses))
    assert runs[0] == runs[1]
    assert set(runs[0][0]) == {"student", "dataset"}, runs[0][0]
    # the coin is checkpointed: a restored trainer draws what the original would
    state = t.extra_state()
    nxt = t.gkd_rng.random()
    t.gkd_rng.random()
    t.load_extra_state(state)
    assert t.gkd_rng.random() == nxt


def test_gkd_jsd_is_zero_when_teacher_equals_student(tmp_path):
    r = _recipe(tmp_path, "tiny", model={"seed": 0}, distill={"mode": "gkd", "lmbda": 1.0})
    t = DistillTrainer(r, task=SevenTask())
    m, _ = t.train_step()
    assert abs(m["distill/jsd"]) < 1e-6 and abs(m["distill/reverse_kl"]) < 1e-4


def test_gkd_config_errors(tmp_path, seven_teacher):
    with pytest.raises(RecipeError, match="only supported with distill.mode on_policy"):
        recipe_from_dict(
            {"trainer": "distill", "distill": {"teacher": "t", "mode": "gkd", "reward_weight": 1}},
            "x",
        )
    with pytest.raises(RecipeError, match="lmbda"):
        recipe_from_dict(
            {"trainer": "distill", "distill": {"teacher": "t", "mode": "gkd", "lmbda": 1.5}}, "x"
        )
    # SevenTask rows have no reference completion: dataset data is refused, by name
    r = _recipe(tmp_path, seven_teacher, distill={"mode": "gkd"})
    with pytest.raises(ValueError, match="'completion'.*gkd_data: teacher"):
        DistillTrainer(r, task=SevenTask())


@pytest.mark.parametrize("mode", ["on_policy", "gkd", "off_policy"])
def test_bf16_teacher(tmp_path, mode):
    # teacher == student up to bf16 rounding: the distillation signals stay ~0 and finite
    r = _recipe(
        tmp_path,
        "tiny",
        model={"seed": 0},
        distill={"mode": mode, "teacher_dtype": "bfloat16", "lmbda": 1.0},
        train={"steps": 1},
    )
    t = DistillTrainer(r, task=SevenTask())
    assert next(t.teacher.parameters()).dtype == torch.bfloat16
    assert next(t.model.parameters()).dtype == torch.float32
    m, _ = t.train_step()
    assert all(v == v for v in m.values())  # no NaN
    if mode != "off_policy":
        key = "distill/jsd" if mode == "gkd" else "distill/reverse_kl"
        assert abs(m[key]) < 0.05, m[key]
