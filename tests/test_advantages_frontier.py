"""The estimators of signalrl.losses.advantages_frontier: a hand-computed value and a plain
Python reference loop over groups for each, their validation, and their registry entries."""

from __future__ import annotations

import math

import pytest
import torch

from signalrl.config.methods import RLConfig
from signalrl.losses.advantages import AdvantageInput, compute_advantages
from signalrl.losses.advantages_frontier import (
    gdpo_advantages,
    gpg_advantages,
    grpo_passk_advantages,
    maxrl_advantages,
    opo_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
)
from signalrl.registry import ADVANTAGES

NEW = ["opo", "gpg", "reinforce_pp_baseline", "grpo_passk", "maxrl", "gdpo", "remax"]


def close(actual: torch.Tensor, expected: list | float, atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5
    )


def _mask(lengths: list[int], T: int, prompt: int = 1) -> torch.Tensor:
    """Rows with `prompt` leading zero columns, then `length` ones, then padding."""
    m = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        m[i, prompt : prompt + n] = 1.0
    return m


def _groups(xs: list[float], G: int) -> list[list[float]]:
    return [xs[i : i + G] for i in range(0, len(xs), G)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    """Unbiased sample std."""
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def _random_rewards(n_groups: int, G: int, seed: int, binary: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if binary:
        return torch.randint(0, 2, (n_groups * G,), generator=g).float()
    r = torch.randint(0, 4, (n_groups * G,), generator=g).float() / 2  # ties and constants
    r[:G] = 1.5  # one constant group
    return r


# --------------------------------------------------------------------------- OPO


def test_opo_hand_values() -> None:
    # group 1: r = [1, 0, 1], L = [2, 1, 1]: b = (2*1 + 1*0 + 1*1) / 4 = 0.75
    # group 2: r = [2, 4, 0], L = [1, 3, 0]: b = (2 + 12 + 0) / 4 = 3.5
    # group 3: r = [5, 5, 5]: constant, 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 4.0, 0.0, 5.0, 5.0, 5.0])
    mask = _mask([2, 1, 1, 1, 3, 0, 2, 1, 3], T=5)
    out = compute_advantages(AdvantageInput(rewards, mask, group_size=3), "opo")
    close(out.advantages, [0.25, -0.75, 0.25, -1.5, 0.5, -3.5, 0.0, 0.0, 0.0])
    assert out.returns is None
    # all lengths 0: the plain mean, b = 2
    close(opo_advantages(torch.tensor([1.0, 3.0]), torch.zeros(2), 2), [-1.0, 1.0])


def test_opo_subtracts_the_in_reward_kl() -> None:
    # r = [1, 1] - 0.5 * [2, 0] = [0, 1]; L = [1, 3]: b = 3 / 4
    mask = _mask([1, 3], T=4, prompt=0)
    kl = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x = AdvantageInput(torch.tensor([1.0, 1.0]), mask, group_size=2, kl=kl, kl_coef=0.5)
    close(compute_advantages(x, "opo").advantages, [-0.75, 0.25])


def _ref_opo(rewards: list[float], lengths: list[float], G: int) -> list[float]:
    out: list[float] = []
    for rs, ls in zip(_groups(rewards, G), _groups(lengths, G), strict=True):
        total = sum(ls)
        b = sum(r * n for r, n in zip(rs, ls, strict=True)) / total if total else _mean(rs)
        out += [0.0 if max(rs) == min(rs) else r - b for r in rs]
    return out


def test_opo_matches_reference_loop() -> None:
    rewards = _random_rewards(6, 4, seed=0)
    lengths = torch.randint(0, 7, (24,), generator=torch.Generator().manual_seed(1))
    mask = _mask(lengths.tolist(), T=9, prompt=2)
    out = compute_advantages(AdvantageInput(rewards, mask, 4), "opo").advantages
    close(out, _ref_opo(rewards.tolist(), lengths.float().tolist(), 4))


# --------------------------------------------------------------------------- GPG


def test_gpg_hand_values() -> None:
    # groups [1, 0], [1, 1], [0, 0], [0, 1]: M = 4 groups, 2 with non-zero variance,
    # alpha = 4 / 2 = 2; centred [0.5, -0.5], 0, 0, [-0.5, 0.5]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    out = compute_advantages(AdvantageInput(rewards, torch.ones(8, 2), 2), "gpg")
    close(out.advantages, [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0])
    # no valid group: all zero, no division by zero
    close(gpg_advantages(torch.ones(4), 2), [0.0] * 4)


def _ref_gpg(rewards: list[float], G: int) -> list[float]:
    groups = _groups(rewards, G)
    n_valid = sum(1 for rs in groups if max(rs) != min(rs))
    alpha = len(groups) / max(n_valid, 1)
    out: list[float] = []
    for rs in groups:
        out += [0.0 if max(rs) == min(rs) else alpha * (r - _mean(rs)) for r in rs]
    return out


def test_gpg_matches_reference_loop() -> None:
    rewards = _random_rewards(8, 3, seed=2)
    close(gpg_advantages(rewards, 3), _ref_gpg(rewards.tolist(), 3))


# --------------------------------------------------------------------------- REINFORCE++-baseline


def test_reinforce_pp_baseline_hand_values() -> None:
    # groups [1, 0], [3, 1]: centred [0.5, -0.5], [1, -1]; lengths [1, 1, 2, 2] give the
    # tokens 0.5, -0.5, 1, 1, -1, -1: mean 0, unbiased var (0.25*2 + 1*4) / 5 = 0.9
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    mask = _mask([1, 1, 2, 2], T=3)
    out = compute_advantages(AdvantageInput(rewards, mask, 2), "reinforce_pp_baseline")
    s = 1 / math.sqrt(0.9 + 1e-8)
    close(
        out.advantages,
        [[0.0, 0.5 * s, 0.0], [0.0, -0.5 * s, 0.0], [0.0, s, s], [0.0, -s, -s]],
    )


def _ref_reinforce_pp_baseline(rewards: list[float], lengths: list[int], G: int) -> list[float]:
    centred: list[float] = []
    for rs in _groups(rewards, G):
        centred += [r - _mean(rs) for r in rs]
    tokens = [a for a, n in zip(centred, lengths, strict=True) for _ in range(n)]
    mu = _mean(tokens)
    var = sum((t - mu) ** 2 for t in tokens) / (len(tokens) - 1)
    return [(a - mu) / math.sqrt(var + 1e-8) for a in centred]


def test_reinforce_pp_baseline_matches_reference_loop() -> None:
    rewards = _random_rewards(5, 4, seed=3)
    lengths = torch.randint(0, 6, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    mask = _mask(lengths, T=8, prompt=2)
    out = reinforce_pp_baseline_advantages(rewards, mask, 4)
    per_row = _ref_reinforce_pp_baseline(rewards.tolist(), lengths, 4)
    close(out, torch.tensor(per_row)[:, None] * mask)


# --------------------------------------------------------------------------- pass@k


def test_grpo_passk_hand_values() -> None:
    # group [0, 2, 1]: best is index 1, r_max - r_second = 2 - 1 = 1, mean 1,
    # unbiased std sqrt((1 + 1 + 0) / 2) = 1: A = 1 / (1 + 1e-6); group [3, 3, 0]: a tie, 0
    rewards = torch.tensor([0.0, 2.0, 1.0, 3.0, 3.0, 0.0])
    out = compute_advantages(AdvantageInput(rewards, torch.ones(6, 1), 3), "grpo_passk")
    close(out.advantages, [0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0, 0.0])
    x = AdvantageInput(rewards, torch.ones(6, 1), 3, adv_scale="none")
    close(compute_advantages(x, "grpo_passk").advantages, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0])


def _ref_passk(rewards: list[float], G: int, scale: str) -> list[float]:
    out: list[float] = []
    batch_std = _std(rewards)
    for rs in _groups(rewards, G):
        best = rs.index(max(rs))
        second = sorted(rs)[-2]
        gap = rs[best] - second
        if scale == "group":
            gap /= _std(rs) + 1e-6
        elif scale == "batch":
            gap /= batch_std + 1e-6
        out += [gap if j == best else 0.0 for j in range(G)]
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_passk_matches_reference_loop(scale: str) -> None:
    rewards = torch.rand(6 * 4, generator=torch.Generator().manual_seed(5))
    rewards[4:8] = 0.25  # a constant group
    close(grpo_passk_advantages(rewards, 4, scale), _ref_passk(rewards.tolist(), 4, scale))


# --------------------------------------------------------------------------- MaxRL


def test_maxrl_hand_values() -> None:
    # [1, 0, 0, 0]: pass rate 1/4, A = (r - 1/4) / (1/4) = [3, -1, -1, -1];
    # [1, 1, 0, 0]: pass rate 1/2, A = [1, 1, -1, -1]; no success or all success: 0
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    out = compute_advantages(AdvantageInput(rewards, torch.ones(16, 1), 4), "maxrl")
    close(out.advantages, [3, -1, -1, -1, 0, 0, 0, 0, 1, 1, -1, -1, 0, 0, 0, 0], atol=1e-4)


def _ref_maxrl(rewards: list[float], G: int) -> list[float]:
    out: list[float] = []
    for rs in _groups(rewards, G):
        p = _mean(rs)
        out += [0.0 if p == 0 or max(rs) == min(rs) else (r - p) / (p + 1e-6) for r in rs]
    return out


def test_maxrl_matches_reference_loop() -> None:
    rewards = _random_rewards(10, 5, seed=6, binary=True)
    close(maxrl_advantages(rewards, 5), _ref_maxrl(rewards.tolist(), 5))
    frac = _random_rewards(6, 3, seed=7)  # non-binary but non-negative rewards
    close(maxrl_advantages(frac, 3), _ref_maxrl(frac.tolist(), 3))


def test_maxrl_rejects_negative_rewards() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        maxrl_advantages(torch.tensor([1.0, -1.0]), 2)


# --------------------------------------------------------------------------- GDPO


def test_gdpo_hand_values() -> None:
    # terms correct c and format f, weights 1 and 0.5, G = 2, three groups:
    #   c = [1, 0 | 1, 1 | 0, 0], f = [1, 1 | 0, 1 | 1, 1]
    # per-term group normalisation: on [1, 0] mean 0.5, unbiased std sqrt(0.5),
    # A = +-0.5 / (sqrt(0.5) + 1e-4) =: +-a; a constant group gives 0
    #   A^c = [a, -a | 0, 0 | 0, 0], A^f = [0, 0 | -a, a | 0, 0]
    #   S = A^c + 0.5 A^f = [a, -a, -a/2, a/2, 0, 0]: mean 0,
    #   unbiased var (2 a^2 + a^2 / 2) / 5 = a^2 / 2, std a / sqrt(2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    std = a / math.sqrt(2)
    components = {
        "correct": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
        "format": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
    }
    weights = {"correct": 1.0, "format": 0.5}
    x = AdvantageInput(torch.zeros(6), torch.ones(6, 1), 2, components=components, weights=weights)
    out = compute_advantages(x, "gdpo").advantages
    s = [a, -a, -a / 2, a / 2, 0.0, 0.0]
    close(out, [v / (std + 1e-4) for v in s])
    # the total reward of GRPO would give the collapsed [1, 0.5 | 0.5, 1.5 | 0.5, 0.5]
    assert out[0] != out[3]


def _ref_gdpo(components: dict[str, list[float]], weights: dict[str, float], G: int) -> list[float]:
    n = len(next(iter(components.values())))
    total = [0.0] * n
    for name, rs in components.items():
        i = 0
        for grp in _groups(rs, G):
            m, s = _mean(grp), _std(grp)
            for r in grp:
                a = 0.0 if max(grp) == min(grp) else (r - m) / (s + 1e-4)
                total[i] += weights[name] * a
                i += 1
    mu, sd = _mean(total), _std(total)
    out = [(t - mu) / (sd + 1e-4) for t in total]
    for k in range(0, n, G):  # groups where every term is constant
        if all(max(rs[k : k + G]) == min(rs[k : k + G]) for rs in components.values()):
            out[k : k + G] = [0.0] * G
    return out


def test_gdpo_matches_reference_loop() -> None:
    comps = {
        "math": _random_rewards(7, 4, seed=8, binary=True),
        "format": _random_rewards(7, 4, seed=9),
        "len": torch.rand(28, generator=torch.Generator().manual_seed(10)),
    }
    comps["len"][8:12] = 0.3
    comps["math"][8:12] = 1.0
    comps["format"][8:12] = 0.5  # group 3: every term constant
    weights = {"math": 1.0, "format": 0.2, "len": -0.5}
    expected = _ref_gdpo({k: v.tolist() for k, v in comps.items()}, weights, 4)
    close(gdpo_advantages(comps, 4, weights), expected)
    assert (gdpo_advantages(comps, 4, weights)[8:12] == 0).all()


def test_gdpo_validation() -> None:
    x = AdvantageInput(torch.zeros(2), torch.ones(2, 1), 2)
    with pytest.raises(ValueError, match="components"):
        compute_advantages(x, "gdpo")
    with pytest.raises(ValueError, match="different shapes"):
        gdpo_advantages({"a": torch.ones(2), "b": torch.ones(4)}, 2)
    with pytest.raises(ValueError, match="no weight for reward term"):
        gdpo_advantages({"a": torch.ones(2), "b": torch.ones(2)}, 2, {"a": 1.0})
    # weights default to 1.0: one term [1, 0 | 0, 1] gives S = [a, -a, -a, a], whose
    # unbiased std is a * sqrt(4 / 3), so A ~ +-sqrt(3) / 2
    h = math.sqrt(3) / 2
    close(gdpo_advantages({"a": torch.tensor([1.0, 0.0, 0.0, 1.0])}, 2), [h, -h, -h, h], 1e-3)


# --------------------------------------------------------------------------- ReMax


def test_remax_hand_values() -> None:
    # G = 2: rows 0, 1 use the greedy reward 0.5 of prompt 0, rows 2, 3 the 1.0 of prompt 1
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    x = AdvantageInput(rewards, torch.ones(4, 1), 2, baseline_rewards=torch.tensor([0.5, 1.0]))
    close(compute_advantages(x, "remax").advantages, [0.5, -0.5, -0.5, -0.5])


def test_remax_with_kl_in_the_reward_is_per_token() -> None:
    # G = 1, r = [1, 2], b = [0.5, 1], kl_coef 0.5:
    # shaped per-token rewards row 0: [-0.05, 1 - 0.1] = [-0.05, 0.9], row 1: [2 - 0.15, pad]
    # reward-to-go minus b: row 0 [0.85 - 0.5, 0.9 - 0.5], row 1 [1.85 - 1, 0]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    x = AdvantageInput(
        torch.tensor([1.0, 2.0]),
        mask,
        1,
        kl=kl,
        kl_coef=0.5,
        baseline_rewards=torch.tensor([0.5, 1.0]),
    )
    close(compute_advantages(x, "remax").advantages, [[0.35, 0.4], [0.85, 0.0]])


def _ref_remax(rewards: list[float], baselines: list[float], G: int) -> list[float]:
    out: list[float] = []
    for p, rs in enumerate(_groups(rewards, G)):
        out += [r - baselines[p] for r in rs]
    return out


def test_remax_matches_reference_loop() -> None:
    rewards = _random_rewards(5, 3, seed=11)
    base = torch.rand(5, generator=torch.Generator().manual_seed(12))
    close(remax_advantages(rewards, base, 3), _ref_remax(rewards.tolist(), base.tolist(), 3))


def test_remax_validation() -> None:
    x = AdvantageInput(torch.zeros(4), torch.ones(4, 1), 2)
    with pytest.raises(ValueError, match="greedy rollout per prompt"):
        compute_advantages(x, "remax")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        remax_advantages(torch.zeros(4), torch.zeros(4), 2)


# --------------------------------------------------------------------------- common


@pytest.mark.parametrize("name", ["opo", "gpg", "reinforce_pp_baseline", "grpo_passk", "maxrl"])
def test_group_estimators_need_groups(name: str) -> None:
    x = AdvantageInput(torch.ones(3), torch.ones(3, 1), 1)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(x, name)


@pytest.mark.parametrize("name", NEW)
def test_outputs_are_detached_and_finite(name: str) -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], requires_grad=True)
    x = AdvantageInput(
        rewards,
        _mask([1, 2, 3, 0], T=4),
        2,
        components={"a": rewards * 2, "b": torch.tensor([0.0, 1.0, 1.0, 0.0])},
        weights={"a": 1.0, "b": 0.5},
        baseline_rewards=torch.tensor([0.5, 0.5]),
    )
    adv = compute_advantages(x, name).advantages
    assert not adv.requires_grad and torch.isfinite(adv).all()
    assert adv.shape in {(4,), (4, 4)}


def test_registry_metadata() -> None:
    assert set(NEW) <= set(ADVANTAGES.names())
    needs_groups = {n for n in NEW if ADVANTAGES.declared_meta(n, "needs_groups")}
    assert needs_groups == set(NEW) - {"remax"}
    assert ADVANTAGES.declared_meta("remax", "needs_greedy_baseline") is True
    assert ADVANTAGES.meta("remax", "needs_greedy_baseline") is True
    assert ADVANTAGES.declared_meta("gdpo", "needs_components") is True
    assert not any(ADVANTAGES.declared_meta(n, "needs_values") for n in NEW)


@pytest.mark.parametrize("name", NEW)
def test_recipe_selects_the_estimator(name: str) -> None:
    assert RLConfig(advantage=name, group_size=4).advantage == name
    if name != "remax":
        with pytest.raises(ValueError, match="needs group_size >= 2"):
            RLConfig(advantage=name, group_size=1)
    else:
        RLConfig(advantage=name, group_size=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NEW)
def test_estimators_on_cuda_with_cpu_components(name: str) -> None:
    cpu = AdvantageInput(
        torch.tensor([1.0, 0.0, 1.0, 1.0]),
        _mask([1, 2, 3, 0], T=4),
        2,
        components={
            "a": torch.tensor([1.0, 0.0, 1.0, 1.0]),
            "b": torch.tensor([0.0, 1.0, 1.0, 0.0]),
        },
        weights={"a": 1.0, "b": 0.5},
        baseline_rewards=torch.tensor([0.5, 0.5]),
    )
    gpu = AdvantageInput(  # components stay on the CPU, as RolloutBatch.components do
        cpu.rewards.cuda(),
        cpu.mask.cuda(),
        2,
        components=cpu.components,
        weights=cpu.weights,
        baseline_rewards=torch.tensor([0.5, 0.5]).cuda(),
    )
    out = compute_advantages(gpu, name).advantages
    assert out.is_cuda
    close(out.cpu(), compute_advantages(cpu, name).advantages)
