"""The registries of signalrl.registry: the source (ast) view of the built-in entries agrees
with the import view, the metadata the config reads, user `module:function` entries, and
unknown names."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import user_losses

from signalrl.losses.advantages import AdvantageInput, compute_advantages
from signalrl.losses.policy import policy_loss
from signalrl.losses.preference import DPO_LOSS_TYPES, PreferenceInput, preference_loss
from signalrl.registry import (
    ADVANTAGES,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    Registry,
    _declared,
)

REGISTRIES = [ADVANTAGES, POLICY_LOSSES, PREFERENCE_LOSSES]


@pytest.mark.parametrize("reg", REGISTRIES, ids=lambda r: r.kind)
def test_source_view_equals_import_view(reg: Registry) -> None:
    names = reg.names()
    assert len(set(names)) == len(names)
    assert sorted(names) == sorted(reg.registered())
    for name in names:
        # the metadata read from the decorators is the metadata registered at import
        assert reg.declared()[name] == reg._meta[name], name
        for key, value in reg.declared()[name].items():
            assert reg.meta(name, key) == value == reg.declared_meta(name, key)


def test_builtin_names() -> None:
    assert sorted(ADVANTAGES.names()) == [
        "gae",
        "gdpo",
        "gpg",
        "group",
        "grpo_passk",
        "maxrl",
        "opo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "remax",
        "rloo",
    ]
    assert sorted(POLICY_LOSSES.names()) == [
        "cispo",
        "clip_cov",
        "dppo_kl",
        "dppo_tv",
        "gmpo",
        "gpg",
        "gspo_token",
        "kl_cov",
        "ppo",
        "sapo",
    ]
    assert sorted(PREFERENCE_LOSSES.names()) == sorted(
        [*DPO_LOSS_TYPES, "simpo", "orpo", "rpo", "kto"]
    )
    # the DPO family is exactly the table of signalrl.losses.dpo
    dpo = _declared("register_preference_loss", ("signalrl.losses.dpo",))
    assert set(dpo) == set(DPO_LOSS_TYPES)


def test_metadata_read_by_the_config() -> None:
    assert {n for n in ADVANTAGES.names() if ADVANTAGES.declared_meta(n, "needs_values")} == {"gae"}
    assert {n for n in ADVANTAGES.names() if ADVANTAGES.declared_meta(n, "needs_groups")} == {
        "group",
        "rloo",
        "opo",
        "gpg",
        "reinforce_pp_baseline",
        "grpo_passk",
        "maxrl",
        "gdpo",
    }
    assert {n for n in POLICY_LOSSES.names() if POLICY_LOSSES.declared_meta(n, "dual_clip")} == {
        "ppo"
    }

    def having(key: str) -> set[str]:
        return {n for n in PREFERENCE_LOSSES.names() if PREFERENCE_LOSSES.declared_meta(n, key)}

    assert having("reference_free") == {"simpo", "orpo"}
    assert having("unpaired") == {"kto"}
    # the DPO types built on h = s_w - s_l (TRL's set), and RPO, whose DPO part is sigmoid
    assert having("f_divergence") == {
        "sigmoid",
        "sigmoid_norm",
        "robust",
        "ipo",
        "hinge",
        "exo_pair",
        "discopop",
        "rpo",
    }


def test_names_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from signalrl.registry import ADVANTAGES, POLICY_LOSSES, PREFERENCE_LOSSES\n"
        "for r in (ADVANTAGES, POLICY_LOSSES, PREFERENCE_LOSSES):\n"
        "    assert r.names(), r.kind\n"
        "    r.check(r.names()[0])\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- user functions


def test_user_policy_loss_is_called() -> None:
    user_losses.CALLS.clear()
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = policy_loss(
        logps, logps.detach(), adv, mask, agg="token-mean", loss_type="user_losses:reinforce"
    )
    assert user_losses.CALLS == ["reinforce"]
    # token mean of -A logp over the 3 tokens: (1 + 2 - 1) / 3
    assert loss.item() == pytest.approx(2.0 / 3)
    assert metrics == pytest.approx(
        {"user/tokens": 3.0, "ratio/mean": 1.0, "ratio/max": 1.0, "ratio/min": 1.0}
    )
    loss.backward()
    assert logps.grad is not None
    torch.testing.assert_close(logps.grad, torch.tensor([[-1 / 3, -1 / 3], [2 / 3, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip"):  # not declared by the user function
        policy_loss(logps, logps, adv, mask, dual_clip=2.0, loss_type="user_losses:reinforce")


def test_user_preference_loss_is_called() -> None:
    user_losses.CALLS.clear()
    x = PreferenceInput(torch.tensor([-1.0, -3.0]), torch.tensor([-1.5, -1.0]))
    losses, cr, rr = preference_loss(x, "user_losses:margin")
    assert user_losses.CALLS == ["margin"]
    assert losses.tolist() == pytest.approx([0.5, 3.0])
    assert cr.tolist() == [-1.0, -3.0] and rr.tolist() == [-1.5, -1.0]
    assert PREFERENCE_LOSSES.meta("user_losses:margin", "reference_free") is True
    assert PREFERENCE_LOSSES.check("user_losses:margin") == "user_losses:margin"
    with pytest.raises(ValueError, match="f-divergence"):
        preference_loss(
            PreferenceInput(
                x.policy_chosen_logps, x.policy_rejected_logps, f_divergence_type="forward_kl"
            ),
            "user_losses:margin",
        )


def test_user_advantage_estimator_is_called() -> None:
    user_losses.CALLS.clear()
    x = AdvantageInput(torch.tensor([1.0, 3.0, 5.0]), torch.ones(3, 2), group_size=3)
    out = compute_advantages(x, "user_losses:centred")
    assert user_losses.CALLS == ["centred"]
    assert out.advantages.tolist() == [-2.0, 0.0, 2.0] and out.returns is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:fn", "cannot import module"),
        ("user_losses:nope", "has no attribute"),
        ("user_losses:NOT_A_FUNCTION", "not callable"),
        ("user_losses:", "expected 'module:function'"),
    ],
)
def test_bad_user_specs(spec: str, message: str) -> None:
    for reg in REGISTRIES:
        with pytest.raises(ValueError, match=message):
            reg.get(spec)
        with pytest.raises(ValueError, match=message):
            reg.check(spec)


# --------------------------------------------------------------------------- unknown names


def _assert_lists(excinfo: pytest.ExceptionInfo[ValueError], reg: Registry, name: str) -> None:
    msg = str(excinfo.value)
    assert repr(name) in msg
    for valid in reg.names():
        assert valid in msg, valid


def test_unknown_names_raise_listing_the_valid_ones() -> None:
    logps = torch.zeros(1, 2)
    with pytest.raises(ValueError) as info:
        policy_loss(logps, logps, torch.ones(1), torch.ones(1, 2), loss_type="grpo")
    _assert_lists(info, POLICY_LOSSES, "grpo")
    with pytest.raises(ValueError) as info:
        preference_loss(PreferenceInput(torch.zeros(1), torch.zeros(1)), "dpo_plus_plus")
    _assert_lists(info, PREFERENCE_LOSSES, "dpo_plus_plus")
    with pytest.raises(ValueError) as info:
        compute_advantages(AdvantageInput(torch.zeros(2), torch.ones(2, 1), 2), "vtrace")
    _assert_lists(info, ADVANTAGES, "vtrace")
    for reg in REGISTRIES:  # the config's check, which imports nothing
        with pytest.raises(ValueError) as info:
            reg.check("bogus")
        _assert_lists(info, reg, "bogus")
