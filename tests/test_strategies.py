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

D = 50


def _round(strategy, global_params, locals_, sizes, states=None, steps=10, lr=0.1):
    """One round through client_update -> plain SUM -> aggregate (the simulation's path)."""
    bc = strategy.broadcast(global_params)
    updates = {
        i: strategy.client_update(bc, w, n, steps, lr, (states or {}).get(i, {}))
        for i, (w, n) in enumerate(zip(locals_, sizes, strict=True))
    }
    keys = sorted(updates[0].vectors)
    agg = PlainAggregation().aggregate(
        1, {i: pack_update(u.vectors, keys, u.weight) for i, u in updates.items()}
    )
    sums, total_w = unpack_sum(agg.total, keys, updates)
    return strategy.aggregate(1, global_params, sums, total_w, len(updates)), updates


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
    obj = s.local_objective(s.broadcast(torch.zeros(D)), {})
    assert obj.prox_mu == 0.3 and obj.grad_correction is None
    assert FedAvg(StrategyConfig(), 2).local_objective({}, {}).prox_mu == 0.0


def test_scaffold_with_zero_control_variates_equals_fedavg() -> None:
    g = torch.randn(D)
    locals_ = [torch.randn(D) for _ in range(3)]
    sizes = [5, 9, 20]
    fedavg_new, _ = _round(FedAvg(StrategyConfig(), 3, 10.0), g, locals_, sizes)
    sc = Scaffold(StrategyConfig(name="scaffold", scaffold_control="option2"), 3, 10.0)
    obj = sc.local_objective(sc.broadcast(g), {})
    assert obj.grad_correction is not None and torch.count_nonzero(obj.grad_correction) == 0
    sc_new, _ = _round(sc, g, locals_, sizes)
    torch.testing.assert_close(sc_new, fedavg_new)


def test_scaffold_control_variates_follow_option_ii() -> None:
    g = torch.zeros(D)
    locals_ = [torch.full((D,), -1.0), torch.full((D,), -3.0)]
    sc = Scaffold(StrategyConfig(name="scaffold", scaffold_control="option2"), num_clients=4)
    assert not sc.local_objective(sc.broadcast(g), {}).track_mean_grad
    _, updates = _round(sc, g, locals_, [10, 10], steps=10, lr=0.1)
    # c_i+ = 0 - 0 + (x - y_i) / (K lr) = -y_i
    torch.testing.assert_close(updates[0].new_state["control"], torch.full((D,), 1.0))
    torch.testing.assert_close(updates[1].new_state["control"], torch.full((D,), 3.0))
    # c <- c + sum(dc) / N  (N = all clients, 4)
    torch.testing.assert_close(sc.control.float(), torch.full((D,), 1.0))
    # the next round's local correction for client 0 is c - c_0 = 0; for a fresh client it is c
    obj = sc.local_objective(sc.broadcast(g), updates[0].new_state)
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
        FedAvg(StrategyConfig(), 3).aggregate(1, torch.zeros(D), {"delta": torch.zeros(D)}, 0.0, 0)


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
    from securefed.client.update import get_flat
    from securefed.config import ClientConfig
    from securefed.data.datasets import load_dataset
    from securefed.diffusion import NoiseSchedule, UNet
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
    obj = sc.local_objective(bc, state)
    res = trainer.train(data, g, obj, seed=11)
    return sc, bc, res, state, ccfg.lr


def test_scaffold_gradient_variate_equals_option_ii_under_plain_sgd() -> None:
    """Slow reference: under SGD without momentum the mean raw gradient IS option II."""
    sc, bc, res, state, lr = _scaffold_local_run("sgd", "gradients")
    assert res.mean_grad is not None and res.mean_grad.shape == res.params.shape
    upd = sc.client_update(bc, res.params, res.num_examples, res.steps, lr, state, res.mean_grad)
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
    upd = sc.client_update(bc, res.params, res.num_examples, res.steps, lr, state, res.mean_grad)
    torch.testing.assert_close(upd.new_state["control"], res.mean_grad)
    with pytest.raises(ValueError, match="mean_grad"):
        sc.client_update(bc, res.params, res.num_examples, res.steps, lr, state)
