"""`signalrl plan`: parameter counts from the real architecture (meta device), the memory terms'
relations across strategies and GPU counts, bad input, the CLI, and one measured run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from signalrl.cli import app
from signalrl.plan import (
    PlanError,
    Precision,
    Workload,
    activations,
    count_shape,
    model_config,
    parse_gpus,
    parse_strategies,
    plan_recipe,
)

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "grpo-qwen7b-plan.yaml"
QWEN7B = ROOT / "recipes" / "configs" / "qwen2.5-7b"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its config directory relative to the repo


def _by(report, strategy, gpus):
    return next(p for p in report.plans if p.strategy == strategy and p.gpus == gpus)


@pytest.fixture(scope="module")
def report():
    import os

    old = os.getcwd()
    os.chdir(ROOT)
    try:
        return plan_recipe(RECIPE, gpus=[1, 8, 64], gpu_mem_gib=80)
    finally:
        os.chdir(old)


def test_qwen25_7b_parameter_count_from_its_config():
    from transformers import AutoConfig

    shape = count_shape(AutoConfig.from_pretrained(QWEN7B), str(QWEN7B))
    assert shape.params == 7_615_616_512
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.vocab) == (28, 4, 128, 152064)
    assert not shape.tied and shape.params - shape.body_params == 152064 * 3584


def test_fsdp2_shards_what_signalrl_shards(report):
    ddp, fsdp = _by(report, "ddp", 8), _by(report, "fsdp2", 8)
    for term in ("policy weights", "gradients (fp32)", "optimizer (AdamW m, v)"):
        assert fsdp.terms[term] == pytest.approx(ddp.terms[term] / 8)
    assert fsdp.terms["reference"] == ddp.terms["reference"] > 0  # replicated, fp32
    assert ddp.terms["policy weights"] == 4 * report.shape.params  # fp32 master weights
    assert ddp.terms["optimizer (AdamW m, v)"] == 8 * report.shape.params
    assert fsdp.total < ddp.total
    assert _by(report, "fsdp2", 64).terms["policy weights"] < fsdp.terms["policy weights"]


def test_lora_holds_the_frozen_base_and_no_reference(report):
    lora, ddp = _by(report, "lora", 8), _by(report, "ddp", 8)
    assert lora.terms["reference"] == 0
    assert lora.terms["policy weights"] < ddp.terms["policy weights"] / 1.9  # bf16 base
    assert lora.terms["optimizer (AdamW m, v)"] == 8 * report.shape.lora_params
    assert lora.total < ddp.total


def test_refusals_are_notes_and_never_fit(report):
    assert _by(report, "fsdp2", 1).note == "refused: fsdp2 on 1 rank"
    assert "batch_size 8 % 64" in _by(report, "ddp", 64).note
    assert not _by(report, "ddp", 64).fits(10_000)


def test_gradient_checkpointing_and_micro_batches_lower_activations(report):
    ckpt = plan_recipe(
        RECIPE, gpus=[8], strategies=["fsdp2"], overrides=["train.gradient_checkpointing=true"]
    )
    micro = plan_recipe(
        RECIPE, gpus=[8], strategies=["fsdp2"], overrides=["train.micro_batch_size=4"]
    )
    full = _by(report, "fsdp2", 8).terms["activations (micro-batch)"]
    assert ckpt.plans[0].terms["activations (micro-batch)"] < full / 5
    assert micro.plans[0].terms["activations (micro-batch)"] < full / 3
    # the KV cache of generation does not depend on the training micro-batch
    kv = "KV cache (generation)"
    assert micro.plans[0].terms[kv] == _by(report, "fsdp2", 8).terms[kv]
    # several micro-batches: the later ones run with every gradient allocated (a plain sum);
    # one micro-batch: backward frees activations as it allocates gradients (less than it)
    t = micro.plans[0].terms
    held = sum(t[k] for k in ("policy weights", "optimizer (AdamW m, v)", "reference"))
    train = ("gradients (fp32)", "activations (micro-batch)", "LM head logits")
    step = sum(t[k] for k in train) + t["fsdp2 gathered (training)"]
    assert micro.plans[0].phases["training"] == pytest.approx(held + step)
    one = _by(report, "fsdp2", 8)
    held = sum(one.terms[k] for k in ("policy weights", "optimizer (AdamW m, v)", "reference"))
    summed = held + sum(one.terms[k] for k in train) + one.terms["fsdp2 gathered (training)"]
    assert held + one.terms["activations (micro-batch)"] < one.phases["training"] < summed


def test_activation_formula_matches_what_autograd_saves():
    """The per-layer activation model against the bytes autograd saves (a saved-tensors
    hook, storages counted once, weights excluded) for a padded fp32 batch on `tiny`."""
    from signalrl.config import ModelConfig
    from signalrl.models import load_model

    config, src = model_config("tiny", ModelConfig(), "<test>")
    shape = count_shape(config, src)
    model, _ = load_model("tiny")
    b, t = 4, 48
    ids = torch.randint(0, 50, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :5] = 0
    seen: dict[int, int] = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model.model(input_ids=ids, attention_mask=mask)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for k, n in seen.items() if k not in weights)
    w = Workload("sft", b, b, 1, 0, t, None, False)
    planned = activations(shape, Precision(4, 4, 4, False, 4), w, b, ckpt=False)
    assert planned == pytest.approx(saved, rel=0.05)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(PlanError, match="--strategy 'zero3'"):
        parse_strategies("zero3")
    with pytest.raises(PlanError, match=">= 1"):
        parse_gpus("0")
    with pytest.raises(PlanError, match="expected a number"):
        parse_gpus("eight")
    empty = tmp_path / "ckpt"
    empty.mkdir()
    bad = tmp_path / "r.yaml"
    bad.write_text(RECIPE.read_text().replace("recipes/configs/qwen2.5-7b", str(empty)))
    with pytest.raises(PlanError, match="no config.json") as e:
        plan_recipe(bad, gpus=[1])
    assert str(bad) in str(e.value) and str(empty) in str(e.value)
    with pytest.raises(PlanError, match="neither a preset"):
        plan_recipe(bad, gpus=[1], overrides=["model.name_or_path=/nonexistent/model"])
    result = CliRunner().invoke(app, ["plan", str(RECIPE), "--strategy", "zero3"])
    assert result.exit_code == 2 and "zero3" in result.output


def test_cli_table_and_json():
    runner = CliRunner()
    out = runner.invoke(app, ["plan", str(RECIPE), "--gpus", "8", "--gpu-mem", "141"])
    assert out.exit_code == 0, out.output
    assert "total (peak)" in out.output and "fits in 141 GiB?" in out.output
    assert "7,615,616,512" in out.output
    out = runner.invoke(app, ["plan", str(RECIPE), "--gpus", "1,8", "--strategy", "fsdp2,lora",
                              "--json"])  # fmt: skip
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [(p["strategy"], p["gpus"]) for p in data["plans"]] == [
        ("fsdp2", 1), ("fsdp2", 8), ("lora", 1), ("lora", 8)
    ]  # fmt: skip
    assert data["model"]["params"] == 7_615_616_512
    p = data["plans"][1]
    assert p["total_bytes"] == max(p["phases_bytes"].values())
    assert p["fits"] == (p["total_gib"] <= 80 and not p["note"])


def _benchmark():
    path = ROOT / "benchmarks" / "plan_vs_measured.py"
    spec = importlib.util.spec_from_file_location("plan_vs_measured", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plan_vs_measured"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_plan_within_25_percent_of_a_measured_tiny_grpo_run(tmp_path):
    """Two real GRPO steps (rollouts, reference, AdamW) of `tiny` in a fresh process under
    torch's memory profiler; the plan's 1-GPU peak is within 25% of the measured peak."""
    bench = _benchmark()
    data = bench.recipe_dict("tiny", "grpo", "fp32", str(tmp_path))
    data["sampling"]["max_new_tokens"] = 32
    got = bench.measure(data, steps=2)
    plan = bench.planned(data, got)
    assert got["peak_bytes"] > 10 * 2**20  # the weights, the reference, the KV cache, ...
    assert abs(plan / got["peak_bytes"] - 1) <= bench.TOLERANCE, (plan, got)


def test_policy_lag_plans_the_stale_sampler_and_its_snapshots():
    """`sampling.policy_lag: k` holds a frozen copy of the policy on the device and k + 1
    weight snapshots on the CPU (`rollout.stale`): the plan counts the copy in every phase and
    reports the snapshots as host memory, the sizes StalePolicy really holds."""
    from signalrl.models import load_model
    from signalrl.rollout.stale import StalePolicy

    sets = ["model.name_or_path=tiny", "rl.kl_coef=0.0"]
    plain = plan_recipe(ROOT / "recipes" / "grpo-arithmetic.yaml", gpus=[1], overrides=sets)
    lagged = plan_recipe(ROOT / "recipes" / "grpo-arithmetic.yaml", gpus=[1],
                         overrides=[*sets, "sampling.policy_lag=2"])
    a, b = _by(plain, "ddp", 1), _by(lagged, "ddp", 1)
    copy = b.terms["stale sampler (sampling.policy_lag)"]
    assert copy == b.terms["policy weights"] == 4 * lagged.shape.params
    for phase in a.phases:
        assert b.phases[phase] == pytest.approx(a.phases[phase] + copy)
    (host,) = b.host.values()
    assert host == 3 * copy and not a.host
    model, _ = load_model("tiny", seed=0)
    stale = StalePolicy(model, lag=2)
    for step in range(4):
        stale.sampler(model, step)
    held = _unique_bytes(stale.model.state_dict().values())
    snaps = sum(_unique_bytes(s.values()) for s in stale.history)  # tied weights: one copy
    assert sum(p.numel() for p in model.parameters()) == lagged.shape.params
    assert (held, snaps) == (pytest.approx(copy, rel=0.01), pytest.approx(host, rel=0.01))
    assert "host memory per process" in str(_caption(lagged))
    assert json.loads(json.dumps(lagged.to_json()))["plans"][0]["host_bytes"]


def _caption(report) -> str:
    from signalrl.plan import render

    return str(render(report).caption)


def _unique_bytes(tensors) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())
