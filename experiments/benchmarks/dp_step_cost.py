"""Cost of one DP-SGD step: plain vs Opacus hooks vs securefed (a benchmark script, not a test).

Times one gradient computation of the default UNet (``ModelConfig()`` defaults, 1x8x8 digits
shape, ``UNet(cfg, 1, 8)``) on the DDPM loss, for each batch size, with four methods:

- ``plain``: forward + ``loss.sum().backward()`` (no clipping, no noise);
- ``opacus``: ``opacus.GradSampleModule`` hooks materialise per-example gradients
  (``p.grad_sample``), then per-example norms, clipping, the clipped sum and Gaussian noise by
  hand (what ``PrivacyEngine``'s optimizer does);
- ``securefed-2pass``: exact per-example norms from one outputs-only backward
  (:class:`~securefed.privacy.per_sample_norms.PerSampleGradNorms`), then a second backward
  of ``sum_i w_i loss_i`` (Lee & Kifer 2021 two-pass clipping);
- ``securefed``: :func:`~securefed.privacy.dp_step.dp_sgd_step` (one backward, book-keeping
  clipped sum; Bu et al. 2023), noise from a seeded ``torch.Generator``;
- ``securefed-secure``: the same step with the noise a DP run actually uses
  (:class:`~securefed.noise.secure_noise.SecureGaussian`: AES-256-CTR, Box-Muller in float64,
  four normals per coordinate against floating-point attacks), i.e. the full DP step.

No optimizer step is included (it is the same for all methods), so the ratios are upper bounds
on the ratios of whole training steps. The other DP methods draw the noise from a seeded
``torch.Generator`` so that their comparison measures clipping; the secure noise alone for the
same model is also timed separately.

Timings are medians over ``--repeats`` steps, interleaved round-robin across methods so that
load from other processes hits every method alike; ``--clock cpu`` times this thread's CPU time
(``time.thread_time``) instead of wall-clock time, which on a shared machine leaves out the time
the process waits descheduled (with one torch thread every step runs in this thread, AES
included). Memory is the peak resident set size
(RSS, from ``/proc/self/status`` ``VmHWM`` after resetting it via ``/proc/self/clear_refs``)
above the RSS right after setup, measured in a fresh process per (method, batch) over a few
steps; where the reset is not permitted it falls back to ``resource.getrusage`` ``ru_maxrss``.

``--profile`` adds, per batch size, where the DP step's time goes (medians over the same number
of steps, phases timed one after the other in this process): forward with hooks, backward to
the layer outputs, per-example norms by layer kind and norm form (ghost / materialise /
direct), the weighted (clipped) gradient sum by layer kind, and the secure noise split into
the AES-CTR keystream and the rest (conversion, Box-Muller, sum of four, cast); and the plain
step's forward and backward for comparison. It reaches into ``PerSampleGradNorms``' per-layer
methods (the same calls ``dp_sgd_step`` makes, one layer at a time).

``--baseline PATH`` adds ``baseline-securefed`` and ``baseline-securefed-secure``: the same two
steps with the ``securefed`` package of another checkout at ``PATH`` (e.g. ``main``), copied to
a temporary directory and imported as ``securefed_baseline``, interleaved with the other
methods in this process, so that a before/after comparison sees the same load and the same
plain-step samples (separate runs on a shared machine scatter by +-0.1x).

    python experiments/benchmarks/dp_step_cost.py [--batches 64 128 256] [--repeats 7]
        [--threads 1] [--multiplicity 1] [--no-memory] [--quick] [--profile]
        [--clock wall|cpu] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import multiprocessing as mp
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

from securefed.config import DiffusionConfig, ModelConfig
from securefed.diffusion.loss import diffusion_loss
from securefed.diffusion.schedule import NoiseSchedule
from securefed.diffusion.unet import UNet
from securefed.privacy.dp_step import dp_sgd_step
from securefed.privacy.per_sample_norms import PerSampleGradNorms

#: the timer of every measurement; ``--clock cpu`` switches it to this thread's CPU time
_clock: Callable[[], float] = time.perf_counter

METHODS = ("plain", "opacus", "securefed-2pass", "securefed", "securefed-secure")
BASELINE_METHODS = ("baseline-securefed", "baseline-securefed-secure")
#: the ``securefed`` package of ``--baseline`` (imported as ``securefed_baseline``), or None
_baseline: ModuleType | None = None
#: issue 14: a DP step INCLUDING secure noise at most this many times a plain step (batch 128)
TARGET = 1.25
CLIP = 1.0
SIGMA = 1.0


class _TorchNoise:
    """Seeded torch.Generator Gaussian noise (benchmark only: not cryptographically secure)."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape: tuple[int, ...], std: float, device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.gen).mul_(std).to(device)


def _load_baseline(checkout: str) -> ModuleType:
    """Import ``<checkout>/securefed`` as the package ``securefed_baseline`` (a renamed copy).

    Raises:
        SystemExit: ``checkout`` has no ``securefed`` package.
    """
    src = Path(checkout) / "securefed"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"--baseline {checkout}: no securefed package ({src}/__init__.py)")
    root = Path(tempfile.mkdtemp(prefix="dp_step_baseline_"))
    atexit.register(shutil.rmtree, root, True)
    dst = root / "securefed_baseline"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(r"\b(from|import)(\s+)securefed(?=[.\s])")
    for f in dst.rglob("*.py"):
        f.write_text(pattern.sub(r"\1\2securefed_baseline", f.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("securefed_baseline")


def _make_step(method: str, batch: int, k: int) -> Callable[[], None]:
    """A closure running one gradient computation of ``method`` on a fresh default UNet."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(), 1, 8)
    sched = NoiseSchedule.from_config(DiffusionConfig())
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1
    noise = _TorchNoise()
    params = [p for p in model.parameters() if p.requires_grad]

    def losses(net: nn.Module) -> Tensor:  # [B] per-example losses over K draws
        return diffusion_loss(net, sched, x0, generator=gen, num_draws=k)

    if method == "plain":

        def step() -> None:
            model.zero_grad(set_to_none=True)
            losses(model).sum().backward()

        return step

    if method == "opacus":
        if k != 1:
            raise ValueError("opacus: per-example clipping over K rows is not supported")
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

        def step() -> None:
            for p in params:
                p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
            losses(gsm).sum().backward()
            gs = [p.grad_sample for p in params]  # type: ignore[attr-defined]
            norms = torch.stack([g.reshape(batch, -1).norm(dim=1) for g in gs], 1).norm(dim=1)
            w = (CLIP / (norms + 1e-6)).clamp(max=1.0)
            for p, g in zip(params, gs, strict=True):
                clipped = torch.einsum("i,i...->...", w, g)
                p.grad = (clipped + noise.normal(tuple(p.shape), SIGMA * CLIP, p.device)) / batch

        return step

    if method == "securefed-2pass":

        def step() -> None:
            with PerSampleGradNorms(model, k, capture_grads=False) as psn:
                loss = losses(model)
                psn.backward(loss.sum(), retain_graph=True)
                w = (CLIP / (psn.norms() + 1e-6)).clamp(max=1.0)
            model.zero_grad(set_to_none=True)
            (loss * w).sum().backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(noise.normal(tuple(p.shape), SIGMA * CLIP, p.device)).div_(batch)

        return step

    if method in ("securefed", "securefed-secure", *BASELINE_METHODS):
        from securefed.noise.secure_noise import SecureGaussian

        step_fn: Callable[..., object] = dp_sgd_step
        gaussian: Callable[[bytes], object] = SecureGaussian
        if method in BASELINE_METHODS:
            if _baseline is None:
                raise ValueError(f"{method}: needs --baseline PATH")
            pkg = _baseline.__name__
            step_fn = importlib.import_module(f"{pkg}.privacy.dp_step").dp_sgd_step
            try:  # securefed's layout since issue 16: noise/ below privacy/
                noise_mod = importlib.import_module(f"{pkg}.noise.secure_noise")
            except ModuleNotFoundError:  # a checkout from before it
                noise_mod = importlib.import_module(f"{pkg}.privacy.secure_noise")
            gaussian = noise_mod.SecureGaussian
        src = noise if not method.endswith("-secure") else gaussian(bytes(32))

        def step() -> None:
            step_fn(
                model, lambda: losses(model), batch_size_expected=float(batch),
                max_grad_norm=CLIP, noise_multiplier=SIGMA, noise_source=src, group_size=k,
            )

        return step

    raise ValueError(f"unknown method {method!r}")


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _memory_child(method: str, batch: int, k: int, threads: int, steps: int) -> tuple[float, str]:
    """Peak RSS above the post-setup baseline (MiB) over ``steps`` steps, in this process."""
    torch.set_num_threads(threads)
    step = _make_step(method, batch, k)
    how = "VmHWM"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    except OSError:
        how = "ru_maxrss"
    base = _rss_kib("VmRSS")
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step()
    if how == "VmHWM":
        peak = _rss_kib("VmHWM")
        if base is None or peak is None:
            return float("nan"), how
        return (peak - base) / 1024, how
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_max) / 1024, how


def _memory(method: str, batch: int, k: int, threads: int, steps: int) -> tuple[float, str]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_memory_child, (method, batch, k, threads, steps))


def _secure_noise_ms(numel_shapes: list[tuple[int, ...]], repeats: int) -> float | None:
    try:
        from securefed.noise.secure_noise import SecureGaussian
    except ImportError:
        return None
    src = SecureGaussian(bytes(32))
    times = []
    for _ in range(repeats):
        t0 = _clock()
        src.normal_many(numel_shapes, 1.0, torch.device("cpu"))
        times.append(_clock() - t0)
    return statistics.median(times) * 1e3


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"Conv2d{module.kernel_size[0]}x{module.kernel_size[1]}/s{module.stride[0]}"
    return type(module).__name__


def _profile(batch: int, k: int, repeats: int) -> list[tuple[str, float]]:
    """Median ms per phase of one plain step and one DP step with secure noise (see module doc)."""
    from collections import defaultdict

    from securefed.noise.secure_noise import SecureGaussian

    torch.manual_seed(0)
    model = UNet(ModelConfig(), 1, 8)
    sched = NoiseSchedule.from_config(DiffusionConfig())
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1
    shapes = [tuple(p.shape) for p in model.parameters()]
    n_params = sum(p.numel() for p in model.parameters())
    src = SecureGaussian(bytes(32))
    times: dict[str, list[float]] = defaultdict(list)

    def timed(key: str, t0: float) -> None:
        times[key].append(_clock() - t0)

    chunks = [min(1 << 15, n_params - s) for s in range(0, n_params, 1 << 15)]
    for r in range(repeats + 1):  # the first round warms up and is dropped
        model.zero_grad(set_to_none=True)
        t0 = _clock()
        loss = diffusion_loss(model, sched, x0, generator=gen, num_draws=k)
        timed("plain: forward", t0)
        t0 = _clock()
        loss.sum().backward()
        timed("plain: backward", t0)
        model.zero_grad(set_to_none=True)
        with PerSampleGradNorms(model, k, capture_grads=False) as psn:
            t0 = _clock()
            loss = diffusion_loss(model, sched, x0, generator=gen, num_draws=k)
            timed("dp: forward (hooks)", t0)
            t0 = _clock()
            psn.backward(loss.sum())
            timed("dp: backward to layer outputs", t0)
            b = psn.batch_size
            per: dict[str, float] = defaultdict(float)
            for layer in psn._layers:
                t0 = _clock()
                psn._layer_sq_norm(layer, b)
                per[f"dp: norms {_layer_kind(layer.module)} {layer.choice}"] += _clock() - t0
            norms = psn.layer_sq_norms_total().sqrt()
            w = (CLIP / (norms + 1e-6)).clamp(max=1.0)
            w_rows = w.repeat(k)  # per row, as weighted_grads passes it
            for layer in psn._layers:
                t0 = _clock()
                pairs = psn._grads(layer)
                for pname, param in layer.module.named_parameters(recurse=False):
                    if pname in layer.small:
                        w @ layer.small[pname].reshape(b, -1)
                    elif param.requires_grad and pairs:
                        psn._weighted_weight(layer.module, pairs, w_rows)
                per[f"dp: clipped sum {_layer_kind(layer.module)}"] += _clock() - t0
            if r:
                for key, v in per.items():
                    times[key].append(v)
        t0 = _clock()
        src.normal_many(shapes, SIGMA * CLIP, torch.device("cpu"))
        timed("noise: total (SecureGaussian.normal_many)", t0)
        t0 = _clock()
        for m in chunks:  # the same keystream bytes, in the same chunks, without Box-Muller
            src._keystream_words(4 * m)
        timed("noise: AES-CTR keystream alone", t0)
    rows = [(key, statistics.median(v[-repeats:]) * 1e3) for key, v in times.items()]
    return sorted(rows, key=lambda kv: (kv[0].split(":")[0], -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per method and batch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--multiplicity", type=int, default=1,
                    help="K noise draws per example (DPDM); Opacus is skipped for K > 1")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    choices=METHODS + BASELINE_METHODS)
    ap.add_argument("--baseline", metavar="PATH",
                    help="a checkout whose securefed package the baseline-* methods use (added "
                         "to --methods unless listed there)")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-process RSS runs")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: time.thread_time, the CPU time of this "
                         "(single torch) thread, which leaves out time spent descheduled on a "
                         "loaded machine (cache and memory contention still count)")
    ap.add_argument("--profile", action="store_true",
                    help="also print where the DP step's time goes, per phase and layer kind")
    ap.add_argument("--quick", action="store_true",
                    help="batch 128 only, 3 repeats, 1 warm-up, 2 memory steps")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.repeats, args.warmup, args.memory_steps = [128], 3, 1, 2
    global _clock
    if args.clock == "cpu":
        if args.threads != 1:
            ap.error("--clock cpu times one thread: use it with --threads 1")
        _clock = time.thread_time
    torch.set_num_threads(args.threads)
    k = args.multiplicity
    methods = [m for m in args.methods if not (m == "opacus" and k > 1)]
    if args.baseline:
        global _baseline
        _baseline = _load_baseline(args.baseline)
        if not any(m in BASELINE_METHODS for m in methods):
            methods += [m for m in BASELINE_METHODS if m.removeprefix("baseline-") in methods]
    elif any(m in BASELINE_METHODS for m in methods):
        ap.error("baseline-* methods need --baseline PATH")
    n_params = sum(p.numel() for p in UNet(ModelConfig(), 1, 8).parameters())
    print(f"DP step cost: default UNet ({n_params / 1e6:.2f}M parameters), 1x8x8, K={k}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or '?'}")
    print(f"median of {args.repeats} steps after {args.warmup} warm-up, methods interleaved, "
          f"{'wall-clock' if args.clock == 'wall' else 'thread CPU'} time; "
          "no optimizer step; noise from torch.Generator except securefed-secure")
    print(f"memory: peak RSS above post-setup RSS, fresh process, {args.memory_steps} steps\n")
    mw = max(16, *(len(m) + 1 for m in methods))
    header = (f"{'batch':>5}  {'method':<{mw}}{'median ms':>10}{'x plain':>9}"
              f"{'peak MiB':>10}{'x plain':>9}")
    print(header)
    print("-" * len(header))
    ratio_128: dict[str, float] = {}
    mem_how = ""
    for batch in args.batches:
        steps = {m: _make_step(m, batch, k) for m in methods}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.warmup + args.repeats):
            for m in methods:
                t0 = _clock()
                steps[m]()
                if r >= args.warmup:
                    times[m].append(_clock() - t0)
        del steps
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        mem: dict[str, float] = {}
        if not args.no_memory:
            for m in methods:
                if m in BASELINE_METHODS:  # the spawned child cannot import the baseline copy
                    continue
                mem[m], mem_how = _memory(m, batch, k, args.threads, args.memory_steps)
        base_t = med.get("plain")
        base_m = mem.get("plain")
        for m in methods:
            rt = f"{med[m] / base_t:>8.2f}x" if base_t else f"{'-':>9}"
            mm = f"{mem[m]:>10.1f}" if m in mem else f"{'-':>10}"
            rm = (f"{mem[m] / base_m:>8.2f}x" if base_m and m in mem and base_m > 0
                  else f"{'-':>9}")
            print(f"{batch:>5}  {m:<{mw}}{med[m]:>10.1f}{rt}{mm}{rm}")
            if batch == 128 and base_t:
                ratio_128[m] = med[m] / base_t
        print()
    if args.profile:
        for batch in args.batches:
            rows = _profile(batch, k, args.repeats)
            print(f"\nprofile, batch {batch} (median ms of {args.repeats} steps, phases timed "
                  "one after the other):")
            for key, ms in rows:
                print(f"  {key:<52}{ms:>8.2f}")
    if mem_how:
        print(f"(peak memory via {mem_how})")
    shapes = [tuple(p.shape) for p in UNet(ModelConfig(), 1, 8).parameters()]
    sec = _secure_noise_ms(shapes, 3 if args.quick else 5)
    if sec is not None:
        print(f"secure noise alone (SecureGaussian, AES-256-CTR) for all {n_params} parameters: "
              f"{sec:.1f} ms per step")
    if "securefed" in ratio_128:
        print(f"DP step WITHOUT secure noise at batch 128: {ratio_128['securefed']:.2f}x plain")
    for m in BASELINE_METHODS:
        if m in ratio_128:
            print(f"baseline ({args.baseline}) {m.removeprefix('baseline-')} at batch 128: "
                  f"{ratio_128[m]:.2f}x plain")
    if "securefed-secure" in ratio_128:
        ratio = ratio_128["securefed-secure"]
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"DP step INCLUDING secure noise at batch 128: {ratio:.2f}x plain "
              f"(target <= {TARGET}x: {verdict})")


if __name__ == "__main__":
    main()
