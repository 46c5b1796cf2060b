"""Cost of white-box gradient canaries: one client's DP-SGD round with and without them.

Trains the quickstart UNet (``experiments/quickstart.yaml``'s model, 8x8 digits) with the
project's :class:`~securefed.client.dp.DPLocalTrainer` for ``--steps`` local steps (one round)
at Poisson batch 64, ChaCha20 noise, on ``--records`` records; with canaries, ALL ``--m``
canaries belong to this client (the worst case: in a federation they are spread over the
clients). Rounds alternate with / without canaries so that load from other processes hits both
alike; the script prints the median wall time of each and their ratio (issue 15: at most 1.10).

    python experiments/benchmarks/canary_cost.py [--m 1000] [--steps 12] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=1000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--records", type=int, default=288)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from securefed.builders import build_model, prepare_data
    from securefed.client.dp import DPLocalTrainer, sample_rate_for
    from securefed.config import load_config
    from securefed.diffusion import NoiseSchedule
    from securefed.diffusion.params import get_flat
    from securefed.privacy import SecureGaussian
    from securefed.privacy.canaries import GradientCanaries
    from securefed.strategies.base import LocalObjective

    torch.set_num_threads(args.threads)
    cfg = load_config("experiments/quickstart.yaml")
    data = prepare_data(cfg)
    members = data.members.subset(torch.arange(args.records).numpy())
    model = build_model(cfg, members.image_shape, members.num_classes)
    ccfg = cfg.client.model_copy(update={"local_steps": args.steps, "local_epochs": None})
    trainer = DPLocalTrainer(model, NoiseSchedule.from_config(cfg.diffusion), ccfg, cfg.dp,
                             torch.device("cpu"), cfg.model.class_conditional)
    start = get_flat(model)
    gc = GradientCanaries.draw(model, args.m, 1)
    q = sample_rate_for(ccfg, len(members))
    times: dict[str, list[float]] = {"plain": [], "canaries": []}
    hook_s: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.repeats + 1):
            for mode in ("plain", "canaries"):
                hook = (
                    gc.for_client(r, 0, model, q, cfg.dp.max_grad_norm)
                    if mode == "canaries" else None
                )
                spent = [0.0]
                if hook is not None:  # time the hook's own work (robust to machine load)
                    for name in ("extra_sum", "observe"):
                        fn = getattr(hook, name)

                        def timed(
                            *a: object, _fn: object = fn, _spent: list[float] = spent
                        ) -> object:
                            t = time.perf_counter()
                            out = _fn(*a)  # type: ignore[operator]
                            _spent[0] += time.perf_counter() - t
                            return out

                        setattr(hook, name, timed)
                t0 = time.perf_counter()
                trainer.train_private(
                    members, start, LocalObjective(), r, noise_multiplier=1.0,
                    noise_source=SecureGaussian(), canaries=hook,
                )
                if r > 0:  # the first pair warms up
                    times[mode].append(time.perf_counter() - t0)
                    if hook is not None:
                        hook_s.append(spent[0])
    plain, can = statistics.median(times["plain"]), statistics.median(times["canaries"])
    params = sum(p.numel() for p in model.parameters())
    print(
        f"DP-SGD round: {args.steps} steps, batch {ccfg.batch_size} of {len(members)} records, "
        f"{params} parameters, m = {args.m} canaries on this client, {args.repeats} repeats"
    )
    print(f"median round without canaries {plain:.3f} s, with canaries {can:.3f} s")
    print(f"ratio {can / plain:.3f} (goal <= 1.10)")
    hs = statistics.median(hook_s)
    print(
        f"time inside the canary hook: {hs:.4f} s per round = {hs / plain:.2%} of a round "
        f"(ratio from it: {(plain + hs) / plain:.3f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
