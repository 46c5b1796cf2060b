"""Exact per-example gradient norms and the fast DP-SGD step against slow references.

The reference gradient of example ``b`` is obtained by a Python loop: forward only its rows
``k * B + b`` (``k < K``), backpropagate its loss, read the parameter gradients. The layers and
the UNet have no cross-example interaction, so this equals the per-example gradient of the
batched loss.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from securefed.config import DiffusionConfig, ModelConfig
from securefed.diffusion.loss import diffusion_loss, diffusion_loss_from_draws
from securefed.diffusion.schedule import NoiseSchedule
from securefed.diffusion.unet import UNet
from securefed.privacy.dp_step import DPStepStats, dp_sgd_step
from securefed.privacy.per_sample_norms import PerSampleGradNorms, trainable_layers

torch.set_num_threads(1)

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


class TorchNoise:
    """A ``torch.Generator``-backed Gaussian source (the secure source has the same method)."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[tuple[int, ...], float]] = []

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device) -> Tensor:
        self.calls.append((tuple(shape), std))
        return (torch.randn(shape, generator=self.gen) * std).to(device)


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def reference_grads(
    model: nn.Module, example_loss: Callable[[Tensor], Tensor], b: int, k: int
) -> list[list[Tensor]]:
    """Per-example gradients by a loop: ``example_loss(rows)`` is the loss of one example."""
    params = _params(model)
    out = []
    for i in range(b):
        rows = torch.tensor([j * b + i for j in range(k)])
        grads = torch.autograd.grad(example_loss(rows), params, allow_unused=True)
        out.append(
            [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        )
    return out


def _norm(grads: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads))


def check_layer(
    model: nn.Module,
    x: Tensor,
    b: int,
    k: int,
    strategy: str,
) -> None:
    """Norms, per-layer norms and weighted sums of a model applied to ``K*B`` rows ``x``."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        probe = model(x)
    r = torch.randn(probe.shape, generator=gen, dtype=torch.float64).to(probe.dtype)

    def row_losses(rows: Tensor) -> Tensor:
        z = model(x[rows]).reshape(len(rows), -1)
        return (z * r[rows].reshape(len(rows), -1)).sum(1) + 0.3 * (z**2).sum(1)

    def example_loss(rows: Tensor) -> Tensor:
        return row_losses(rows).mean()

    with PerSampleGradNorms(model, k, strategy=strategy) as psn:  # type: ignore[arg-type]
        row_losses(torch.arange(k * b)).reshape(k, b).mean(0).sum().backward()
        norms = psn.norms()
        layer_sq = sum(v**2 for v in psn.layer_norms().values())
        w = torch.rand(b, generator=gen, dtype=torch.float64).to(norms.dtype)
        weighted = psn.weighted_grads(w)
    ref = reference_grads(model, example_loss, b, k)
    ref_norms = torch.stack([_norm(g) for g in ref])
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer_sq.double(), ref_norms**2, rtol=1e-4, atol=1e-7)
    for j, p in enumerate(_params(model)):
        expect = sum(w[i].double() * ref[i][j].double() for i in range(b))
        # entries are sums of many terms: absolute tolerance relative to the tensor's scale
        scale = float(expect.abs().max()) if expect.numel() else 0.0
        eps = 1e-10 if p.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(weighted[p].double(), expect, rtol=1e-4, atol=eps * scale)


# ----------------------------------------------------------------------------- single layers
@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    groups = draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3, 3])), draw(st.sampled_from([1, 2, 3, 3]))
    stride = (draw(st.sampled_from([1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2])))
    dilation = (draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2])))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["half", "half", "int", "same", "valid"]))
    if kind == "same" and stride != (1, 1):
        kind = "half"
    padding: object = kind
    if kind == "half":  # "same"-like integer padding, as in the UNet
        padding = ((kh // 2) * dilation[0], (kw // 2) * dilation[1])
    elif kind == "int":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max(kh * dilation[0], 3), 7))
    w = draw(st.integers(max(kw * dilation[1], 3), 7))
    return {
        "cin": groups * draw(st.integers(1, 3)),
        "cout": groups * draw(st.integers(1, 3)),
        "kernel": (kh, kw),
        "stride": stride,
        "dilation": dilation,
        "groups": groups,
        "padding": padding,
        "padding_mode": mode,
        "bias": draw(st.booleans()),
        "hw": (h, w),
        "b": draw(st.integers(1, 4)),
        "k": draw(st.integers(1, 3)),
    }


UNET_CONV = {
    "cin": 3, "cout": 2, "kernel": (3, 3), "stride": (1, 1), "dilation": (1, 1), "groups": 1,
    "padding": (1, 1), "padding_mode": "zeros", "bias": True, "hw": (4, 4), "b": 2, "k": 1,
}


@settings(SETTINGS, max_examples=80)
@given(conv_cases())
@example(UNET_CONV)
@example({**UNET_CONV, "k": 2, "stride": (2, 2), "hw": (5, 4)})
@example({**UNET_CONV, "k": 3, "padding": "same", "padding_mode": "reflect"})
def test_conv2d_norms(case: dict) -> None:
    """Both exact forms (Gram/ghost and materialised) against the loop, any conv geometry."""
    torch.manual_seed(0)
    conv = nn.Conv2d(
        case["cin"], case["cout"], case["kernel"], stride=case["stride"], padding=case["padding"],
        dilation=case["dilation"], groups=case["groups"], bias=case["bias"],
        padding_mode=case["padding_mode"],
    ).double()
    b, k = case["b"], case["k"]
    x = torch.randn(k * b, case["cin"], *case["hw"], dtype=torch.float64)
    for strategy in ("ghost", "materialise"):
        check_layer(conv, x, b, k, strategy)


@SETTINGS
@given(
    d=st.integers(1, 5), o=st.integers(1, 5), bias=st.booleans(),
    lead=st.sampled_from([(), (1,), (3,), (2, 3)]), b=st.integers(1, 4), k=st.integers(1, 3),
)
def test_linear_norms(d: int, o: int, bias: bool, lead: tuple[int, ...], b: int, k: int) -> None:
    """2-D inputs and token sequences ``[N, *, D]``, both exact forms."""
    torch.manual_seed(0)
    lin = nn.Linear(d, o, bias=bias).double()
    x = torch.randn(k * b, *lead, d, dtype=torch.float64)
    for strategy in ("ghost", "materialise"):
        check_layer(lin, x, b, k, strategy)


@SETTINGS
@given(
    groups=st.integers(1, 3), cpg=st.integers(1, 3), spatial=st.sampled_from([(), (4,), (3, 2)]),
    b=st.integers(1, 4), k=st.integers(1, 3),
)
def test_groupnorm_norms(
    groups: int, cpg: int, spatial: tuple[int, ...], b: int, k: int
) -> None:
    torch.manual_seed(0)
    gn = nn.GroupNorm(groups, groups * cpg).double()
    with torch.no_grad():  # non-trivial affine parameters
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(k * b, groups * cpg, *spatial, dtype=torch.float64)
    if spatial == () and cpg == 1:
        x = torch.randn(k * b, groups * cpg, 2, dtype=torch.float64)
    check_layer(gn, x, b, k, "auto")


@SETTINGS
@given(
    num=st.integers(2, 5), dim=st.integers(1, 4), length=st.sampled_from([0, 1, 3]),
    padding_idx=st.sampled_from([None, 0]), b=st.integers(1, 4), k=st.integers(1, 3),
)
def test_embedding_norms(
    num: int, dim: int, length: int, padding_idx: int | None, b: int, k: int
) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(num, dim, padding_idx=padding_idx).double()
    shape = (k * b,) if length == 0 else (k * b, length)
    idx = torch.randint(0, num, shape)  # small vocabularies: repeated indices within an example
    check_layer(emb, idx, b, k, "auto")


def test_shared_layer_called_twice() -> None:
    """Weight sharing: a layer's calls are concatenated, not their norms added."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.conv(torch.tanh(self.conv(x)))
            return self.lin(torch.tanh(self.lin(h.flatten(2))))

    for k in (1, 2):
        check_layer(Twice().double(), torch.randn(3 * k, 2, 2, 2, dtype=torch.float64), 3, k,
                    "auto")


# ------------------------------------------------------------------------------- the UNet
def tiny_unet(class_conditional: bool) -> UNet:
    cfg = ModelConfig(
        base_channels=8, channel_mults=(1, 2), norm_groups=4, attention_levels=(1,),
        class_conditional=class_conditional,
    )
    torch.manual_seed(0)
    model = UNet(cfg, 1, 8, num_classes=3 if class_conditional else None)
    with torch.no_grad():  # the zero-initialised output convs would hide most gradients
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model


def unet_setup(class_conditional: bool, b: int, k: int) -> tuple[UNet, Callable[[Tensor], Tensor]]:
    """The model and ``loss(example indices) -> per-example diffusion losses`` on fixed draws."""
    model = tiny_unet(class_conditional)
    sched = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(b, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 3, (b,), generator=gen) if class_conditional else None
    t = torch.randint(0, 50, (k, b), generator=gen)
    noise = torch.randn(k, b, 1, 8, 8, generator=gen)

    def losses(ex: Tensor) -> Tensor:
        return diffusion_loss_from_draws(
            model, sched, x0[ex], t[:, ex], noise[:, ex], None if y is None else y[ex]
        )

    return model, losses


@pytest.mark.parametrize(("class_conditional", "k"), [(False, 1), (True, 2), (False, 3)])
def test_unet_norms_match_loop(class_conditional: bool, k: int) -> None:
    b = 3
    model, losses = unet_setup(class_conditional, b, k)
    with PerSampleGradNorms(model, k) as psn:
        losses(torch.arange(b)).sum().backward()
        norms = psn.norms()
        choices = set(psn.layer_choices().values())
    ref = torch.stack([
        _norm(list(torch.autograd.grad(losses(torch.tensor([i])).sum(), _params(model))))
        for i in range(b)
    ])
    torch.testing.assert_close(norms.double(), ref, rtol=1e-4, atol=1e-7)
    assert choices <= {"ghost", "materialise", "taps", "direct"}


def test_unet_diffusion_loss_num_draws() -> None:
    """``diffusion_loss(..., num_draws=K)`` (K*B rows, per-example [B] losses) end to end."""
    b, k = 2, 2
    model = tiny_unet(False)
    sched = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand(b, 1, 8, 8) * 2 - 1
    with PerSampleGradNorms(model, k) as psn:
        diffusion_loss(model, sched, x0, generator=torch.Generator().manual_seed(0),
                       num_draws=k).sum().backward()
        assert psn.num_rows == k * b
        norms = psn.norms()
    ref = []
    for i in range(b):
        gen = torch.Generator().manual_seed(0)  # same draws; keep example i's rows only
        loss = diffusion_loss(model, sched, x0, generator=gen, num_draws=k)[i]
        ref.append(_norm(list(torch.autograd.grad(loss, _params(model)))))
    torch.testing.assert_close(norms.double(), torch.stack(ref), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("class_conditional", "k"), [(True, 1), (False, 3)])
def test_dp_step_clipped_sum_matches_loop(class_conditional: bool, k: int) -> None:
    b, b_exp = 4, 5.5
    model, losses = unet_setup(class_conditional, b, k)
    ref = [
        list(torch.autograd.grad(losses(torch.tensor([i])).sum(), _params(model)))
        for i in range(b)
    ]
    ref_norms = torch.stack([_norm(g) for g in ref])
    c = float(ref_norms.sort().values[1]) * 1.01  # two examples clipped, two not
    scale = (c / (ref_norms + 1e-6)).clamp(max=1.0)
    for i in range(b):  # every clipped per-example gradient has norm <= C
        assert float(scale[i] * ref_norms[i]) <= c * (1 + 1e-6)
    stats = dp_sgd_step(
        model, lambda: losses(torch.arange(b)), batch_size_expected=b_exp, max_grad_norm=c,
        noise_multiplier=0.0, noise_source=TorchNoise(), group_size=k,
    )
    for j, p in enumerate(_params(model)):
        expect = sum(scale[i] * ref[i][j].double() for i in range(b)) / b_exp
        atol = 1e-5 * float(expect.abs().max())  # float32 sums: tolerance at the tensor's scale
        torch.testing.assert_close(p.grad.double(), expect, rtol=1e-4, atol=atol)
    assert stats.batch_size == b
    assert stats.clipped_fraction == pytest.approx(float((ref_norms > c).double().mean()))
    assert stats.mean_norm == pytest.approx(float(ref_norms.mean()), rel=1e-4)
    with torch.no_grad():
        mean_loss = float(losses(torch.arange(b)).mean())
    assert stats.mean_loss == pytest.approx(mean_loss, rel=1e-5)


def test_dp_step_sensitivity_with_noise_multiplicity() -> None:
    """Removing one example moves the clipped sum by at most C (K = 3 rows per example)."""
    b, k, c = 4, 3, 0.02
    model, losses = unet_setup(False, b, k)
    params = _params(model)

    def clipped_sum(examples: Tensor) -> list[Tensor]:
        dp_sgd_step(model, lambda: losses(examples), batch_size_expected=1.0, max_grad_norm=c,
                    noise_multiplier=0.0, noise_source=TorchNoise(), group_size=k)
        return [p.grad.clone() for p in params]

    full = clipped_sum(torch.arange(b))
    for drop in range(b):
        rest = clipped_sum(torch.tensor([i for i in range(b) if i != drop]))
        diff = _norm([(f - r).detach() for f, r in zip(full, rest, strict=True)])
        assert float(diff) <= c * (1 + 1e-4)


def test_dp_step_per_row_losses_equal_per_example_losses() -> None:
    b, k = 3, 2
    model, _ = unet_setup(False, b, k)
    sched = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    x0 = torch.rand(b, 1, 8, 8) * 2 - 1
    t = torch.randint(0, 50, (k, b))
    noise = torch.randn(k, b, 1, 8, 8)

    def per_row() -> Tensor:
        from securefed.diffusion.schedule import q_sample

        xt = q_sample(sched, x0.repeat(k, 1, 1, 1), t.reshape(-1), noise.reshape(k * b, 1, 8, 8))
        out = model(xt, t.reshape(-1))
        return (out - noise.reshape(k * b, 1, 8, 8)).pow(2).flatten(1).mean(1)  # [K*B]

    kw = {"batch_size_expected": 3.0, "max_grad_norm": 0.01, "noise_multiplier": 0.0,
          "noise_source": TorchNoise(), "group_size": k}
    s1 = dp_sgd_step(model, per_row, **kw)  # type: ignore[arg-type]
    g1 = [p.grad.clone() for p in _params(model)]
    s2 = dp_sgd_step(  # type: ignore[arg-type]
        model, lambda: diffusion_loss_from_draws(model, sched, x0, t, noise), **kw
    )
    for p, g in zip(_params(model), g1, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-8)
    assert s1.batch_size == s2.batch_size == b
    assert s1.mean_loss == pytest.approx(s2.mean_loss, rel=1e-6)
    assert s1.mean_norm == pytest.approx(s2.mean_norm, rel=1e-5)


def test_dp_step_noise_and_empty_batch() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.GroupNorm(1, 2))
    sigma, c, b_exp = 1.5, 2.0, 4.0
    src = TorchNoise(seed=5)
    stats = dp_sgd_step(model, lambda: None, batch_size_expected=b_exp, max_grad_norm=c,
                        noise_multiplier=sigma, noise_source=src)
    assert stats == DPStepStats(mean_loss=0.0, batch_size=0, clipped_fraction=0.0, mean_norm=0.0)
    assert [s for s, _ in src.calls] == [tuple(p.shape) for p in model.parameters()]
    assert all(std == pytest.approx(sigma * c) for _, std in src.calls)
    replay = TorchNoise(seed=5)
    for p in model.parameters():
        noise = replay.normal(tuple(p.shape), sigma * c, p.device)
        torch.testing.assert_close(p.grad, noise / b_exp)
    # an empty forward (0 rows) is also noise only
    src = TorchNoise(seed=5)
    stats = dp_sgd_step(model, lambda: model(torch.zeros(0, 3)).sum(1),
                        batch_size_expected=b_exp, max_grad_norm=c, noise_multiplier=sigma,
                        noise_source=src)
    assert stats.batch_size == 0
    replay = TorchNoise(seed=5)
    for p in model.parameters():
        noise = replay.normal(tuple(p.shape), sigma * c, p.device)
        torch.testing.assert_close(p.grad, noise / b_exp)
    # with data: grad = (clipped sum + noise) / b_exp, noise drawn after clipping
    x = torch.randn(3, 3)
    dp_sgd_step(model, lambda: model(x).pow(2).sum(1), batch_size_expected=b_exp,
                max_grad_norm=c, noise_multiplier=0.0, noise_source=TorchNoise())
    clean = [p.grad.clone() for p in model.parameters()]
    dp_sgd_step(model, lambda: model(x).pow(2).sum(1), batch_size_expected=b_exp,
                max_grad_norm=c, noise_multiplier=sigma, noise_source=TorchNoise(seed=9))
    replay = TorchNoise(seed=9)
    for p, g in zip(model.parameters(), clean, strict=True):
        torch.testing.assert_close(
            p.grad, g + replay.normal(tuple(p.shape), sigma * c, p.device) / b_exp
        )


# ------------------------------------------------------------------------- refusals, misc
def test_unsupported_layers_are_named() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

    model = nn.Module()
    model.down = nn.ModuleList([Block()])
    with pytest.raises(ValueError, match=r"layer 'down\.0\.bn' \(BatchNorm2d\) cannot be made "
                                         r"differentially private: per-example gradients are "
                                         r"not defined for batch statistics; use GroupNorm"):
        PerSampleGradNorms(model)
    seq = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\)"):
        trainable_layers(seq)
    seq[1].requires_grad_(False)  # frozen: fine
    assert [n for n, _ in trainable_layers(seq)] == ["0"]
    with pytest.raises(ValueError, match=r"layer '0' \(Embedding\).*scale_grad_by_freq"):
        trainable_layers(nn.Sequential(nn.Embedding(3, 2, scale_grad_by_freq=True)))

    class MyLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    with pytest.raises(ValueError, match=r"overrides Linear\.forward"):
        trainable_layers(nn.Sequential(MyLinear(2, 2)))
    with pytest.raises(ValueError, match="group_size"):
        PerSampleGradNorms(seq, group_size=0)


def test_no_grad_forward_is_ignored_and_inplace_is_detected() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    with PerSampleGradNorms(model) as psn:
        with torch.no_grad():
            model(torch.randn(5, 3))
        assert psn.num_rows == 0
        model(torch.randn(4, 3)).sum().backward()
        with pytest.raises(RuntimeError, match="modified in place"):
            psn.norms()
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    with PerSampleGradNorms(model) as psn:
        model(torch.randn(4, 3)).sum().backward()
        assert psn.norms().shape == (4,)
        psn.clear()
        model(torch.randn(2, 3)).sum().backward()
        assert psn.norms().shape == (2,)
    assert not model[0]._forward_hooks


def test_float32_conv_within_tolerance() -> None:
    """float32 (the training dtype) on a UNet-like conv: Gram and materialised forms agree."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(8, 16, 8, 8)
    for strategy in ("ghost", "materialise"):
        check_layer(conv, x, 4, 2, strategy)


def test_rows_not_multiple_of_group_size() -> None:
    model = nn.Linear(2, 1)
    with PerSampleGradNorms(model, group_size=2) as psn:
        model(torch.randn(3, 2)).sum().backward()
        with pytest.raises(ValueError, match="not a multiple of group_size"):
            psn.norms()
    with pytest.raises(ValueError, match="per_row_loss_fn returned 5 losses"):
        dp_sgd_step(model, lambda: model(torch.randn(4, 2)).sum(1).repeat(2)[:5],
                    batch_size_expected=1.0, max_grad_norm=1.0, noise_multiplier=0.0,
                    noise_source=TorchNoise(), group_size=2)



@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
@pytest.mark.parametrize("k", [1, 2])
def test_chunked_intermediates_match_the_reference(
    strategy: str, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-example intermediates are formed in cache-sized chunks of examples
    (``_CHUNK_ELEMENTS``); a chunk smaller than one example's Gram matrix (one example per
    chunk) and one that splits the batch unevenly both give the exact per-example norms and
    clipped sum, for the conv (ghost: input-Gram + tap shifts) and linear (outer) paths."""
    import securefed.privacy.per_sample_norms as psn_mod

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    lin = nn.Sequential(nn.Linear(7, 4))
    x_conv = torch.randn(5 * k, 6, 6, 6)
    x_lin = torch.randn(5 * k, 9, 7)
    for chunk in (1, 3 * (k * 36) ** 2 - 1):  # 1 example per chunk; 2 full + 1 partial chunks
        monkeypatch.setattr(psn_mod, "_CHUNK_ELEMENTS", chunk)
        check_layer(conv, x_conv, 5, k, strategy)
        check_layer(lin, x_lin, 5, k, strategy)


@pytest.mark.parametrize("keep", [0, 1 << 20])
def test_kept_materialised_grads_give_the_same_clipped_sum(
    keep: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers whose norms materialise per-example weight gradients keep them for the clipped
    sum (``w @ G``) when small enough; kept (``1 << 20``) or recomputed by the weight-gradient
    kernel (``0``), norms and weighted sums equal the one-example-at-a-time reference, for
    grouped/strided convolutions, K > 1 and a Linear over positions."""
    import securefed.privacy.per_sample_norms as psn_mod

    monkeypatch.setattr(psn_mod, "_KEEP_ELEMENTS", keep)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2)
    with PerSampleGradNorms(conv, 1, strategy="materialise") as psn:
        conv(torch.randn(3, 4, 6, 6)).square().sum().backward()
        psn.norms()
        assert ("weight" in psn._layers[0].small) == (keep > 0)
    for k in (1, 2):
        check_layer(conv, torch.randn(3 * k, 4, 6, 6), 3, k, "materialise")
        check_layer(nn.Conv2d(3, 5, 1), torch.randn(3 * k, 3, 5, 5), 3, k, "materialise")
        check_layer(nn.Linear(4, 3), torch.randn(3 * k, 6, 4), 3, k, "materialise")


@st.composite
def stride1_conv_cases(draw: st.DrawFn) -> dict:
    groups = draw(st.integers(1, 3))
    kernel = draw(st.sampled_from([(3, 3), (3, 3), (2, 3), (3, 1), (1, 2), (1, 1)]))
    dilation = (draw(st.sampled_from([1, 1, 2])), draw(st.sampled_from([1, 1, 2])))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "circular"]))
    padding: object = draw(st.sampled_from(["same", "valid", "int"]))
    if padding == "int":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(max((kernel[0] - 1) * dilation[0] + 1, 3), 6))
    w = draw(st.integers(max((kernel[1] - 1) * dilation[1] + 1, 3), 6))
    return {
        "conv": dict(in_channels=groups * draw(st.integers(1, 3)),
                     out_channels=groups * draw(st.integers(1, 3)), kernel_size=kernel,
                     padding=padding, dilation=dilation, groups=groups, padding_mode=mode),
        "hw": (h, w), "b": draw(st.integers(1, 4)), "k": draw(st.integers(1, 3)),
    }


@settings(SETTINGS, max_examples=60)
@given(stride1_conv_cases(), st.data())
def test_conv_tap_grads_equal_torch_func_per_example_grads(case: dict, data: st.DataObject) -> None:
    """The per-tap GEMM form (padded, flattened input; no unfold) gives every example's weight
    gradient, summed over its K rows, as torch.func's vmap(grad) does, for any stride-1
    geometry (padding modes, string padding, dilation, groups) and any range of examples."""
    from torch.func import functional_call, grad, vmap

    from securefed.privacy.per_sample_norms import _conv_tap_grads

    torch.manual_seed(0)
    conv = nn.Conv2d(**case["conv"]).double()
    b, k = case["b"], case["k"]
    x = torch.randn(k * b, conv.in_channels, *case["hw"], dtype=torch.float64)
    with torch.no_grad():
        g = torch.randn_like(conv(x))
    lo = data.draw(st.integers(0, b - 1))
    hi = data.draw(st.integers(lo + 1, b))

    def example_loss(weight: Tensor, xe: Tensor, ge: Tensor) -> Tensor:  # xe [K, C, H, W]
        out = functional_call(conv, {"weight": weight}, (xe,))
        return (out * ge).sum()

    xb = x.reshape(k, b, *x.shape[1:]).transpose(0, 1)  # [B, K, ...]
    gb = g.reshape(k, b, *g.shape[1:]).transpose(0, 1)
    expect = vmap(grad(example_loss), in_dims=(None, 0, 0))(conv.weight.detach(), xb, gb)[lo:hi]
    got = _conv_tap_grads(conv, x, g, k, lo, hi)  # [T, (hi-lo)*G, Og, Cg]
    kh, kw = conv.kernel_size
    groups = conv.groups
    got = got.view(kh, kw, hi - lo, groups, got.shape[2], got.shape[3]).permute(2, 3, 4, 5, 0, 1)
    torch.testing.assert_close(got.reshape(expect.shape), expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("keep", [0, 1 << 20])
@pytest.mark.parametrize("k", [1, 2])
def test_tap_form_norms_and_clipped_sum_match_the_reference(
    keep: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the cost model picks the per-tap form (stride 1, few output channels), norms and
    clipped sum equal the one-example-at-a-time reference, with the per-example gradients kept
    for ``w @ G`` or (``_KEEP_ELEMENTS = 0``) computed in chunks of examples for the norms."""
    import securefed.privacy.per_sample_norms as psn_mod

    monkeypatch.setattr(psn_mod, "_KEEP_ELEMENTS", keep)
    monkeypatch.setattr(psn_mod, "_CHUNK_ELEMENTS", 150)  # several chunks of examples
    torch.manual_seed(0)
    convs = [
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(8, 1, 3, padding=2, dilation=2),  # like a UNet output conv
        nn.Conv2d(3, 2, (1, 3), padding="same", padding_mode="reflect"),
    ]
    for conv in convs:
        x = torch.randn(3 * k, conv.in_channels, 6, 5)
        with PerSampleGradNorms(conv, k, strategy="auto") as psn:
            conv(x).square().sum().backward()
            assert psn.layer_choices() == {"<root>": "taps"}
            assert ("weight" in psn._layers[0].small) == (keep > 0)
        check_layer(conv, x, 3, k, "auto")
        check_layer(conv.double(), x.double(), 3, k, "materialise")

