"""Per-phase time breakdown of a federated round (a benchmark script, not a test).

Runs a config for a few rounds with FID off and prints, per phase, the median seconds across
rounds and its share of the round. As a same-run baseline it times bare optimizer steps of the
same UNet on one batch (no federation), so "train" can be read as a multiple of pure compute.

    python experiments/benchmarks/round_cost.py [--config experiments/quickstart.yaml]
        [--rounds 4] [--device cpu|cuda|auto] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from securefed.builders import build_model, prepare_data, resolve_device
from securefed.client.trainer import local_steps_for, make_optimizer
from securefed.config import load_config
from securefed.diffusion import NoiseSchedule, diffusion_loss
from securefed.run import run_experiment


def bare_step_seconds(cfg, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of one plain training step (forward + backward + Adam) on one batch."""
    data = prepare_data(cfg)
    model = build_model(cfg, data.members.image_shape, data.members.num_classes).to(device)
    sched = NoiseSchedule.from_config(cfg.diffusion).to(device)
    opt = make_optimizer(list(model.parameters()), cfg.client)
    x = data.members.images[: cfg.client.batch_size].to(device)
    y = (
        data.members.labels[: cfg.client.batch_size].to(device)
        if cfg.model.class_conditional
        else None
    )
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        loss = diffusion_loss(model, sched, x, y, generator=gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    overrides.update(
        {
            "federation.rounds": args.rounds,
            "evaluation.fid": False,
            "evaluation.fid_at_start": False,
            "evaluation.every": 1,
        }
    )
    cfg = load_config(args.config, overrides)
    device = resolve_device(args.device)
    print(
        f"config {args.config}: {cfg.federation.num_clients} clients, "
        f"protocol {cfg.secure_aggregation.protocol}, device {device}, {args.rounds} rounds"
    )
    step = bare_step_seconds(cfg, device)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(
            cfg, Path(tmp) / "run", device=args.device, progress=False, write_report=False
        )
    rows = [r for r in res.metrics if r["round"] > 0]
    phases = sorted({k for r in rows for k in r["seconds"] if k != "round_total"})
    total = statistics.median(r["seconds"]["round_total"] for r in rows)
    print(f"\n{'phase':<16}{'median s':>10}{'share':>8}")
    for ph in phases:
        med = statistics.median(r["seconds"].get(ph, 0.0) for r in rows)
        print(f"{ph:<16}{med:>10.3f}{med / total:>8.1%}")
    print(f"{'round total':<16}{total:>10.3f}{1:>8.0%}")
    data = prepare_data(cfg)
    steps = sum(local_steps_for(cfg.client, len(p)) for p in data.parts)
    train = statistics.median(r["seconds"]["train"] for r in rows)
    print(f"\nbaseline: bare optimizer step {step * 1e3:.1f} ms; local steps per round {steps}")
    print(
        f"train phase / (steps x bare step) = {train / (steps * step):.2f}x "
        "(overhead of the federation around pure compute)"
    )
    mb_up = statistics.median(r["bytes_up"] for r in rows) / 1e6
    mb_down = statistics.median(r["bytes_down"] for r in rows) / 1e6
    print(f"bytes per round: {mb_up:.2f} MB up, {mb_down:.2f} MB down")


if __name__ == "__main__":
    main()
