"""Cost of one secure-aggregation round: CPU seconds and bytes, per client and at the server.

Compares, in one run and on one machine, plain fp32 summation, pairwise masking (SecAgg:
complete graph; SecAgg+: random k-regular graph; both also with 10% of the clients dropping
after sharing keys, which makes the server reconstruct their masks), and CKKS when
``securefed.secagg.ckks`` imports. Then the per-client cost of SecAgg+ as n grows.

Reported per row (medians over ``--repeats`` rounds; per-client values are the median client):
bytes up / down per client, their ratio to plain fp32 (4 bytes per parameter), the bytes beyond
the masked vector ("key material": keys, Shamir shares, signatures, id lists), client CPU seconds
(``time.process_time`` around each client step) and per 1M parameters, server CPU seconds.
Plain's client CPU is the cost of serialising the vector to fp32 bytes.

Targets (from the issue): masking bytes <= 1.05x plain fp32 plus key material (checked here
with the key material included in the 1.05x); client masking
CPU <= 0.3 s per 1M parameters; SecAgg+ per-client cost from n=100 to n=1000 at most 1.5x; CKKS
bytes <= 15x plain.

    python experiments/benchmarks/secagg_cost.py            # full (1M parameters, n=10, 100)
    python experiments/benchmarks/secagg_cost.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from securefed.config import SecureAggregationConfig
from securefed.secagg.base import AggregationProtocol, AggregationResult
from securefed.secagg.masking import MaskingAggregation, Stage
from securefed.secagg.plain import PlainAggregation


@dataclass
class Row:
    label: str
    n: int
    d: int
    bytes_up: float
    bytes_down: float
    client_s: float
    server_s: float
    wall_s: float
    note: str = ""


def auto_k(n: int) -> int:
    """Bell et al. 2020 use k = O(log n): here the even number >= 2 log2 n."""
    k = math.ceil(2 * math.log2(max(n, 2)))
    return k + (k % 2)


def _inputs(n: int, d: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    pool = [rng.uniform(-1, 1, d) for _ in range(min(n, 4))]  # a few distinct vectors
    return {i: pool[i % len(pool)] for i in range(n)}


def _plain_client_seconds(x: np.ndarray) -> float:
    t0 = time.process_time()
    x.astype(np.float32).tobytes()
    return time.process_time() - t0


def measure(
    label: str,
    make: Callable[[], AggregationProtocol],
    n: int,
    d: int,
    repeats: int,
    drop_frac: float = 0.0,
    note: str = "",
) -> Row:
    xs = _inputs(n, d)
    ups, downs, clients, servers, walls = [], [], [], [], []
    for r in range(repeats):
        proto = make()
        if isinstance(proto, MaskingAggregation):
            proto.record_server_view = False
        ndrop = round(drop_frac * n)
        drops = {c: Stage.MASKED_INPUT for c in range(1, n, max(1, n // max(ndrop, 1)))[:ndrop]}
        gc.collect()
        t0 = time.perf_counter()
        res: AggregationResult = proto.aggregate(r + 1, xs, drops or None)
        walls.append(time.perf_counter() - t0)
        live = [c for c in res.survivors if c not in drops]
        ups.append(statistics.median(res.bytes_up[c] for c in live))
        downs.append(statistics.median(res.bytes_down[c] for c in live))
        if res.client_seconds:
            clients.append(statistics.median(res.client_seconds[c] for c in live))
        else:
            clients.append(statistics.median(_plain_client_seconds(xs[c]) for c in live[:5]))
        servers.append(res.server_seconds)
        if drops and res.info.get("dropouts_recovered") != len(drops):
            note = f"recovered {res.info.get('dropouts_recovered')} of {len(drops)}"
    return Row(
        label,
        n,
        d,
        statistics.median(ups),
        statistics.median(downs),
        statistics.median(clients),
        statistics.median(servers),
        statistics.median(walls),
        note,
    )


def masking(n: int, k: int | None, threshold: float, bits: int) -> Callable[[], MaskingAggregation]:
    cfg = SecureAggregationConfig(
        protocol="masking", neighbours="all" if k is None else k, threshold=threshold, bits=bits
    )
    return lambda: MaskingAggregation.from_config(cfg, n)


def ckks_factory(n: int) -> tuple[Callable[[], AggregationProtocol] | None, str]:
    try:
        from securefed.secagg.ckks import CKKSAggregation

        cfg = SecureAggregationConfig(protocol="ckks")
        CKKSAggregation.from_config(cfg, n)
    except Exception as exc:  # missing module, TenSEAL, or a broken build: skip the row
        return None, f"{type(exc).__name__}: {exc}"
    return (lambda: CKKSAggregation.from_config(cfg, n)), ""


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def print_table(rows: list[Row], plain: dict[int, Row]) -> None:
    head = (
        f"{'protocol':<34}{'n':>6}{'D':>10}{'up/client':>12}{'x fp32':>8}{'key mat.':>11}"
        f"{'down/client':>13}{'client s':>10}{'s / 1M':>8}{'server s':>10}{'x plain':>9}"
        f"{'wall s':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        base = plain.get(r.n)
        fp32 = 4.0 * r.d
        ratio = r.bytes_up / fp32
        key_mat = max(r.bytes_up - fp32, 0.0) if not r.label.startswith("ckks") else float("nan")
        srv = r.server_s / base.server_s if base and base.d == r.d and base.server_s > 0 else None
        print(
            f"{r.label:<34}{r.n:>6}{r.d:>10}{_fmt_bytes(r.bytes_up):>12}{ratio:>8.3f}"
            f"{'-' if math.isnan(key_mat) else _fmt_bytes(key_mat):>11}"
            f"{_fmt_bytes(r.bytes_down):>13}{r.client_s:>10.4f}{r.client_s * 1e6 / r.d:>8.3f}"
            f"{r.server_s:>10.3f}{'-' if srv is None else f'{srv:.0f}x':>9}{r.wall_s:>8.1f}"
            + (f"  ({r.note})" if r.note else "")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=1_000_000, help="vector length D")
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--k", type=int, default=0, help="SecAgg+ degree (0: 2*ceil(log2 n), even)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.1, help="fraction dropping (masked_input)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scaling-clients", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--scaling-params", type=int, default=100_000)
    ap.add_argument("--scaling-k", type=int, default=16, help="fixed k for the scaling rows")
    ap.add_argument("--ckks-clients", type=int, nargs="+", default=[10])
    ap.add_argument("--no-ckks", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller sizes, one repeat (~1 min)")
    args = ap.parse_args(argv)
    if args.quick:  # 1M parameters still, one repeat, fewer rows
        args.repeats = 1
        args.scaling_clients = [100, 1000]
        args.scaling_params = min(args.scaling_params, 50_000)
    # warm-up: first-use imports (scipy's csgraph, TenSEAL) must not count as round cost
    masking(4, 2, 0.5, args.bits)().aggregate(0, _inputs(4, 16))
    masking(4, None, 0.5, args.bits)().aggregate(0, _inputs(4, 16))

    d, reps = args.params, args.repeats
    print(
        f"secure aggregation cost: D={d}, repeats={reps}, threshold={args.threshold}, "
        f"bits={args.bits}, dropout={args.dropout:.0%} at {Stage.MASKED_INPUT}"
    )
    rows: list[Row] = []
    plain: dict[int, Row] = {}
    for n in args.clients:
        k = args.k or auto_k(n)
        p = measure("plain fp32", PlainAggregation, n, d, reps)
        plain[n] = p
        rows.append(p)
        drop = f"{args.dropout:.0%} drop"
        specs: list[tuple[str, int | None, float]] = [
            ("masking complete (SecAgg)", None, 0.0),
            (f"masking {k}-regular (SecAgg+)", k, 0.0),
            (f"masking complete, {drop}", None, args.dropout),
            (f"masking {k}-regular, {drop}", k, args.dropout),
        ]
        if args.quick and n >= 100:  # the slowest row; the k-regular one shows recovery cost
            specs.remove((f"masking complete, {drop}", None, args.dropout))
        for label, kk, frac in specs:
            make = masking(n, kk, args.threshold, args.bits)
            rows.append(measure(label, make, n, d, reps, frac))
            print(f"  done: {label} n={n}", flush=True)
        if not args.no_ckks and n in args.ckks_clients:
            ckks, why = ckks_factory(n)
            if ckks is None:
                print(f"  ckks row skipped (n={n}): {why}")
            else:
                rows.append(measure("ckks (TenSEAL)", ckks, n, d, reps))
        sys.stdout.flush()
    print()
    print_table(rows, plain)

    ks = args.scaling_k
    print(f"\nSecAgg+ per-client cost as n grows (k={ks} fixed, D={args.scaling_params}):")
    scale_rows = [
        measure(
            f"masking {ks}-regular",
            masking(n, ks, args.threshold, args.bits),
            n,
            args.scaling_params,
            reps,
        )
        for n in args.scaling_clients
    ]
    print_table(scale_rows, {})

    print("\ntargets:")
    ok = True

    def check(name: str, value: float, limit: float) -> None:
        nonlocal ok
        good = value <= limit
        ok &= good
        print(f"  [{'PASS' if good else 'FAIL'}] {name}: {value:.3f} (limit {limit})")

    for r in rows:
        if r.label.startswith("masking"):
            base = plain[r.n]
            check(
                f"{r.label} n={r.n}: bytes up (incl. key material) / plain fp32",
                r.bytes_up / base.bytes_up,
                1.05,
            )
            check(f"{r.label} n={r.n}: client CPU s per 1M params", r.client_s * 1e6 / r.d, 0.3)
        if r.label.startswith("ckks"):
            check(f"ckks n={r.n}: bytes up / plain fp32", r.bytes_up / plain[r.n].bytes_up, 15.0)
    by_n = {r.n: r for r in scale_rows}
    if 100 in by_n and 1000 in by_n:
        check("SecAgg+ client CPU n=1000 / n=100", by_n[1000].client_s / by_n[100].client_s, 1.5)
        check("SecAgg+ client bytes n=1000 / n=100", by_n[1000].bytes_up / by_n[100].bytes_up, 1.5)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
