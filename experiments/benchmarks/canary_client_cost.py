"""Cost of client-level canary clients: whole `securefed run` rounds with and without them.

Runs the client-level teeth scale (``experiments/audit_teeth.py --level client``: 20 clients of
32 records, 10 per round, 2 local steps, the tiny UNet, DP-FedAvg at epsilon 1, ``plain``
protocol) for ``--rounds`` rounds, alternating runs with ``--m`` canary clients and without so
that load from other processes hits both alike, and prints the median round wall time of each,
their ratio, and the time spent inside the canary work itself (``ClientCanaryRound``: keyed
sampling, the budget check, reading the earlier rounds' files, adding ``S u_i``, scoring,
committing) per round, measured in the same process (issue 15: at most 10% of a round).

    python experiments/benchmarks/canary_client_cost.py [--m 1000] [--rounds 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from audit_teeth import _client_config

    import securefed.privacy.canaries as canaries_mod
    from securefed.io import read_jsonl
    from securefed.run import run_experiment

    spent = [0.0]

    def timed(f: Callable[..., Any]) -> Callable[..., Any]:
        def g(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t

        return g

    cls = canaries_mod.ClientCanaryRound
    for name in ("__init__", "add_to", "observe", "commit"):
        setattr(cls, name, timed(getattr(cls, name)))

    rounds: dict[bool, list[float]] = {True: [], False: []}
    per_round: list[float] = []
    for rep in range(args.repeats):
        for on in (True, False):
            cfg = _client_config(rep, 1.0, 20, 32, 10, args.rounds, 2, args.m)
            cfg = cfg.model_copy(
                update={"canaries": cfg.canaries.model_copy(update={"enabled": on})}
            )
            spent[0] = 0.0
            with tempfile.TemporaryDirectory() as tmp:
                run_experiment(cfg, Path(tmp) / "run", progress=False, write_report=False)
                rows = read_jsonl(Path(tmp) / "run" / "metrics.jsonl")
            rounds[on] += [float(r["seconds"]["round_total"]) for r in rows]
            if on:
                per_round.append(spent[0] / max(1, len(rows)))
    with_c, without = statistics.median(rounds[True]), statistics.median(rounds[False])
    work = statistics.median(per_round)
    print(
        f"m = {args.m} canary clients, {args.rounds} rounds x {args.repeats} repeats: median "
        f"round {with_c:.3f} s with, {without:.3f} s without (wall ratio "
        f"{with_c / without:.3f}); canary work {work:.4f} s per round = "
        f"{work / without:.1%} of a round without (ratio {1 + work / without:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
