"""Strategies: FedAvg identity and weighting, FedProx, SCAFFOLD, server rules, client sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefed.config import StrategyConfig
from securefed.secagg import PlainAggregation
from securefed.strategies import (
    FedAvg,
    FedProx,
    Scaffold,
    build_strategy,
    pack_update,
    sample_clients,
    unpack_sum,
)
from securefed.strategies.scaffold import scaffold_control_update
from tests.helpers import one_cohort

D = 50


def _round(strategy, global_params, locals_, sizes, states=None, steps=10, lr=0.1):
    """One round through client_update -> plain SUM -> aggregate (the simulation's path)."""
    bc = strategy.broadcast(global_params)
    updates = {
        i: strategy.client.client_update(i, bc, w, n, steps, lr, (states or {}).get(i, {}))
        for i, (w, n) in enumerate(zip(locals_, sizes, strict=True))
    }
    keys = sorted(updates[0].vectors)
    agg = PlainAggregation().aggregate(
        1, {i: pack_update(u.vectors, keys, u.weight) for i, u in updates.items()}
    )
    sums, total_w = unpack_sum(agg.total, keys, updates)
    return strategy.aggregate(1, global_params, one_cohort(sums, total_w, len(updates))), updates


def test_fedavg_of_identical_clients_is_identity() -> None:
    g = torch.randn(D)
    local = torch.randn(D)
    s = FedAvg(StrategyConfig(), num_clients=4, weight_scale=100.0)
    new, _ = _round(s, g, [local.clone() for _ in range(4)], [50, 120, 7, 300])
    torch.testing.assert_close(new.float(), local, atol=1e-5, rtol=0)


def test_fedavg_is_sample_weighted_mean() -> None:
    g = torch.zeros(D)
    locals_ = [torch.randn(D) for _ in range(3)]
    sizes = [10, 30, 60]
    s = FedAvg(StrategyConfig(), num_clients=3, weight_scale=33.0)
    new, _ = _round(s, g, locals_, sizes)
    expected = sum(n * w for n, w in zip(sizes, locals_, strict=True)) / sum(sizes)
    torch.testing.assert_close(new.float(), expected, atol=1e-5, rtol=0)


def test_server_lr_scales_the_step() -> None:
    g, local = torch.zeros(D), torch.ones(D)
    s = FedAvg(StrategyConfig(server_lr=0.5), num_clients=1)
    new, _ = _round(s, g, [local], [10])
    torch.testing.assert_close(new.float(), 0.5 * local)


def test_server_momentum_accumulates() -> None:
    g, local = torch.zeros(D), torch.ones(D)
    s = FedAvg(StrategyConfig(server_momentum=0.9), num_clients=1)
    g1, _ = _round(s, g, [g + 1], [10])
    g2, _ = _round(s, g1, [g1 + 1], [10])
    torch.testing.assert_close(g2.float() - g1.float(), 1.9 * local, atol=1e-5, rtol=0)


def test_ema_tracks_global_model() -> None:
    s = FedAvg(StrategyConfig(ema_decay=0.5), num_clients=1)
    g1, _ = _round(s, torch.zeros(D), [torch.ones(D)], [10])
    torch.testing.assert_close(s.eval_params(g1).float(), torch.ones(D))  # first value
    g2, _ = _round(s, g1, [torch.full((D,), 3.0)], [10])
    torch.testing.assert_close(s.eval_params(g2).float(), torch.full((D,), 2.0))
    state = s.state_dict()
    s2 = FedAvg(StrategyConfig(ema_decay=0.5), num_clients=1)
    s2.load_state_dict(state)
    torch.testing.assert_close(s2.eval_params(g2), s.eval_params(g2))


def test_fedprox_sets_proximal_weight() -> None:
    s = FedProx(StrategyConfig(name="fedprox", mu=0.3), num_clients=2)
    obj = s.client.local_objective(0, s.broadcast(torch.zeros(D)), {})
    assert obj.prox_mu == 0.3 and obj.grad_correction is None
    assert FedAvg(StrategyConfig(), 2).client.local_objective(0, {}, {}).prox_mu == 0.0


def test_scaffold_with_zero_control_variates_equals_fedavg() -> None:
    g = torch.randn(D)
    locals_ = [torch.randn(D) for _ in range(3)]
    sizes = [5, 9, 20]
    fedavg_new, _ = _round(FedAvg(StrategyConfig(), 3, 10.0), g, locals_, sizes)
    sc = Scaffold(StrategyConfig(name="scaffold", scaffold_control="option2"), 3, 10.0)
    obj = sc.client.local_objective(0, sc.broadcast(g), {})
    assert obj.grad_correction is not None and torch.count_nonzero(obj.grad_correction) == 0
    sc_new, _ = _round(sc, g, locals_, sizes)
    torch.testing.assert_close(sc_new, fedavg_new)


def test_scaffold_control_variates_follow_option_ii() -> None:
    g = torch.zeros(D)
    locals_ = [torch.full((D,), -1.0), torch.full((D,), -3.0)]
    sc = Scaffold(StrategyConfig(name="scaffold", scaffold_control="option2"), num_clients=4)
    assert not sc.client.local_objective(0, sc.broadcast(g), {}).track_mean_grad
    _, updates = _round(sc, g, locals_, [10, 10], steps=10, lr=0.1)
    # c_i+ = 0 - 0 + (x - y_i) / (K lr) = -y_i
    torch.testing.assert_close(updates[0].new_state["control"], torch.full((D,), 1.0))
    torch.testing.assert_close(updates[1].new_state["control"], torch.full((D,), 3.0))
    # c <- c + sum(dc) / N  (N = all clients, 4)
    torch.testing.assert_close(sc.control.float(), torch.full((D,), 1.0))
    # the next round's local correction for client 0 is c - c_0 = 0; for a fresh client it is c
    obj = sc.client.local_objective(0, sc.broadcast(g), updates[0].new_state)
    torch.testing.assert_close(obj.grad_correction.float(), torch.zeros(D))
    restored = Scaffold(StrategyConfig(name="scaffold"), num_clients=4)
    restored.load_state_dict(sc.state_dict())
    torch.testing.assert_close(restored.control, sc.control)


def test_scaffold_control_update_rejects_bad_schedule() -> None:
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="steps >= 1"):
        scaffold_control_update(z, z, z, z, 0, 0.1)


def test_registry_and_errors() -> None:
    assert isinstance(build_strategy(StrategyConfig(name="scaffold"), 3), Scaffold)
    with pytest.raises(ValueError, match="weight_scale"):
        FedAvg(StrategyConfig(), 3, weight_scale=0)
    with pytest.raises(ValueError, match="nothing to aggregate"):
        FedAvg(StrategyConfig(), 3).aggregate(
            1, torch.zeros(D), one_cohort({"delta": torch.zeros(D)}, 0.0, 0)
        )


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 40),
    fraction=st.floats(0.01, 1.0),
    minimum=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_clients_properties(n: int, fraction: float, minimum: int, seed: int) -> None:
    avail = list(range(n))
    a = sample_clients(avail, fraction, minimum, np.random.default_rng(seed))
    b = sample_clients(avail, fraction, minimum, np.random.default_rng(seed))
    assert a == b
    assert len(set(a)) == len(a) == min(n, max(minimum, round(fraction * n)))
    assert set(a) <= set(avail)


def _scaffold_local_run(optimizer: str, control: str, momentum: float = 0.0):
    """One real local run of a tiny UNet on digits under a SCAFFOLD correction: returns
    (strategy, broadcast, trainer result, client state, lr)."""
    from securefed.client import LocalTrainer
    from securefed.config import ClientConfig
    from securefed.data.datasets import load_dataset
    from securefed.diffusion import NoiseSchedule, UNet
    from securefed.diffusion.params import get_flat
    from tests.helpers import tiny_config

    cfg = tiny_config()
    data = load_dataset(cfg.data)
    data = data.subset(np.arange(64))
    model = UNet(cfg.model, data.images.shape[1], data.images.shape[2], None)
    ccfg = ClientConfig(local_steps=4, batch_size=16, lr=0.01, optimizer=optimizer,
                        momentum=momentum, grad_clip=None)
    trainer = LocalTrainer(model, NoiseSchedule.from_config(cfg.diffusion), ccfg,
                           torch.device("cpu"))
    g = get_flat(model)
    sc = Scaffold(StrategyConfig(name="scaffold", scaffold_control=control), num_clients=2)
    sc.broadcast(g)
    sc.control = torch.randn_like(g) * 1e-3  # a non-zero server variate: the correction matters
    state = {"control": torch.randn_like(g) * 1e-3}
    bc = sc.broadcast(g)
    obj = sc.client.local_objective(0, bc, state)
    res = trainer.train(data, g, obj, seed=11)
    return sc, bc, res, state, ccfg.lr


def test_scaffold_gradient_variate_equals_option_ii_under_plain_sgd() -> None:
    """Slow reference: under SGD without momentum the mean raw gradient IS option II."""
    sc, bc, res, state, lr = _scaffold_local_run("sgd", "gradients")
    assert res.mean_grad is not None and res.mean_grad.shape == res.params.shape
    upd = sc.client.client_update(
        0, bc, res.params, res.num_examples, res.steps, lr, state, res.mean_grad
    )
    ref = scaffold_control_update(state["control"], bc["control"], bc["params"], res.params,
                                  res.steps, lr)
    torch.testing.assert_close(upd.new_state["control"], ref, atol=2e-5, rtol=1e-3)
    assert float(res.mean_grad.abs().max()) > 0


def test_scaffold_option_ii_is_misscaled_under_adam_and_gradients_is_not() -> None:
    sc, bc, res, state, lr = _scaffold_local_run("adam", "gradients")
    grad_norm = float(res.mean_grad.norm())
    opt2 = scaffold_control_update(state["control"], bc["control"], bc["params"], res.params,
                                   res.steps, lr)
    # Adam's step is ~lr per coordinate, so (x - y)/(K lr) has norm ~sqrt(D) whatever the gradient
    assert float(opt2.norm()) > 5 * grad_norm
    upd = sc.client.client_update(
        0, bc, res.params, res.num_examples, res.steps, lr, state, res.mean_grad
    )
    torch.testing.assert_close(upd.new_state["control"], res.mean_grad)
    with pytest.raises(ValueError, match="mean_grad"):
        sc.client.client_update(0, bc, res.params, res.num_examples, res.steps, lr, state)


# ---------------------------------------------------------------- the split and the wrappers
def _hooks(cls: type) -> list[str]:
    """Every public method of an interface class, inherited ones included (not object's)."""
    import inspect

    return sorted(
        n for n, v in inspect.getmembers(cls, predicate=inspect.isfunction)
        if not n.startswith("_") and not hasattr(object, n)
    )


def test_wrappers_delegate_every_hook_of_both_roles() -> None:
    """A hook added to Strategy or ClientPolicy must be delegated by the wrappers (else
    FedDiffuse under a DP or FedDDPM wrapper would silently lose it): each wrapper defines every
    hook itself, and calling it on a wrapper reaches the base."""
    from unittest import mock

    from securefed.strategies import ClientPolicy, ClientPolicyWrapper, Strategy, StrategyWrapper

    for iface, wrapper in ((Strategy, StrategyWrapper), (ClientPolicy, ClientPolicyWrapper)):
        missing = [h for h in _hooks(iface) if h not in vars(wrapper)]
        assert not missing, f"{wrapper.__name__} does not delegate {missing}"
    # calls reach the base (state hooks are namespaced, so compared separately below)
    base = FedAvg(StrategyConfig(), 3)
    w = StrategyWrapper(base)
    args = {
        "configure_round": (1, torch.zeros(D), [0, 1, 2], 1.0, 1, np.random.default_rng(0)),
        "broadcast": (torch.zeros(D),),
        "upload_cohorts": (1, {}),
        "aggregate": (1, torch.zeros(D), one_cohort({"delta": torch.ones(D)}, 1.0, 1)),
        "round_metrics": (),
        "eval_params": (torch.zeros(D),),
        "personal_params": (torch.zeros(D), {}),
    }
    for hook, a in args.items():
        with mock.patch.object(base, hook, wraps=getattr(base, hook)) as spy:
            getattr(w, hook)(*a)
        assert spy.call_count == 1, hook
    assert w.client is base.client and w.server_opt is base.server_opt
    pol = ClientPolicyWrapper(base.client)
    bc = {"params": torch.zeros(D)}
    cargs = {
        "start_params": (4, bc, {}),
        "local_objective": (4, bc, {}),
        "client_update": (4, bc, torch.ones(D), 10, 1, 0.1, {}),
        "download_numel": (4, bc, {}),
    }
    assert sorted(cargs) == _hooks(ClientPolicy)
    for hook, a in cargs.items():
        with mock.patch.object(base.client, hook, wraps=getattr(base.client, hook)) as spy:
            getattr(pol, hook)(*a)
        assert spy.call_count == 1 and spy.call_args.args[0] == 4, hook  # the client, explicit


def test_feddiffuse_keeps_its_cohorts_and_personal_models_under_a_wrapper() -> None:
    """The failure the split prevents: a wrapper around FedDiffuse used to fall back to the
    default single cohort and lose the personal (client-local) models."""
    from securefed.config import FedDiffuseConfig
    from securefed.strategies import StrategyWrapper
    from securefed.strategies.feddiffuse import _LOCAL, FedDiffuse

    groups = {"encoder": torch.arange(0, 20), "bottleneck": torch.arange(20, 30),
              "decoder": torch.arange(30, D)}
    fd = FedDiffuse(FedAvg(StrategyConfig(), 4), FedDiffuseConfig(enabled=True, variant="udec"),
                    groups, 0, derive=lambda *a: 1, purpose=0)
    dp = StrategyWrapper(fd)  # e.g. a DP or calibration layer that changes neither role
    plan = dp.configure_round(1, torch.zeros(D), [0, 1, 2, 3], 1.0, 1, np.random.default_rng(0))
    ups = {c: dp.client.client_update(c, plan.broadcast, torch.ones(D) * 0.01, 5, 1, 0.1, {})
           for c in plan.clients}
    assert set(next(iter(ups.values())).vectors) == {"delta.shared"}  # FedDiffuse's segments
    assert set(dp.upload_cohorts(1, ups)) == {"shared"}
    state = {_LOCAL: torch.full((fd.local_idx.numel(),), 7.0)}
    personal = dp.personal_params(torch.zeros(D), state)
    assert personal is not None and torch.all(personal[fd.local_idx] == 7.0)
    assert torch.all(personal[fd.shared_idx] == 0.0)


def test_state_dicts_are_namespaced_per_layer_and_round_trip() -> None:
    from securefed.config import DPConfig, SecureAggregationConfig
    from securefed.privacy.client_level import ClientLevelDP

    def build() -> ClientLevelDP:
        return ClientLevelDP(
            Scaffold(StrategyConfig(name="scaffold", ema_decay=0.5, server_momentum=0.9), 3),
            DPConfig(level="client", target_epsilon=8.0, max_update_norm=1.0),
            SecureAggregationConfig(), 1.0,
        )

    s = build()
    s.base.broadcast(torch.zeros(D))
    s.server_opt.step(torch.zeros(D), torch.ones(D))
    s.clip = 0.25
    state = s.state_dict()
    assert set(state) == {
        "client_dp.clip", "base.server.momentum", "base.server.ema", "base.scaffold.control"
    }
    t = build()
    t.load_state_dict(state)
    assert t.clip == 0.25 and torch.equal(t.server_opt.ema, s.server_opt.ema)
    assert torch.equal(t.base.control, s.base.control)  # type: ignore[attr-defined]


def test_server_optimizer_keeps_the_ema_consistent_when_a_step_is_replaced() -> None:
    from securefed.strategies import ServerOptimizer

    opt = ServerOptimizer(StrategyConfig(ema_decay=0.5))
    x1 = opt.step(torch.zeros(3), torch.ones(3))  # EMA starts at x1 = 1
    opt.replace_last_step(x1, torch.full((3,), 2.0))
    assert torch.equal(opt.released(x1), torch.full((3,), 2.0))
    x2 = opt.step(torch.full((3,), 2.0), torch.ones(3))  # 3; ema 0.5*2 + 0.5*3 = 2.5
    opt.replace_last_step(x2, torch.full((3,), 5.0))  # ema as if the step gave 5: 3.5
    assert torch.allclose(opt.released(x2), torch.full((3,), 3.5))
