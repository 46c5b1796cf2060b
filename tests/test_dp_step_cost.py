"""The DP-cost benchmark's before/after mode (``--baseline``): another checkout's package is
imported under another name and its DP step runs interleaved with this checkout's."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch
from torch import nn

from tests.helpers import ROOT


def _bench() -> ModuleType:
    path = ROOT / "experiments" / "benchmarks" / "dp_step_cost.py"
    spec = importlib.util.spec_from_file_location("dp_step_cost", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dp_step_cost"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_baseline_is_a_separate_copy_that_computes_the_same_step() -> None:
    import securefed.privacy.dp_step as ours

    bench = _bench()
    pkg = bench._load_baseline(str(ROOT))  # this checkout as its own baseline
    assert pkg.__name__ == "securefed_baseline"
    theirs = importlib.import_module("securefed_baseline.privacy.dp_step")
    assert theirs is not ours and theirs.PerSampleGradNorms is not ours.PerSampleGradNorms
    # the copy's modules import each other, not this checkout's
    assert theirs.PerSampleGradNorms.__module__ == "securefed_baseline.privacy.per_sample_norms"
    grads = []
    for step in (ours.dp_sgd_step, theirs.dp_sgd_step):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3))
        x = torch.randn(4, 2, 5, 5)
        step(model, lambda m=model, x=x: m(x).square().flatten(1).sum(1),
             batch_size_expected=4.0, max_grad_norm=0.5, noise_multiplier=0.0,
             noise_source=bench._TorchNoise())
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_baseline_methods_need_a_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["dp_step_cost.py", "--methods", "baseline-securefed"])
    with pytest.raises(SystemExit):
        bench.main()
    with pytest.raises(SystemExit, match="no securefed package"):
        bench._load_baseline(str(ROOT / "experiments"))
