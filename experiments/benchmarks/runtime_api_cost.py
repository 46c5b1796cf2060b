"""Cost of one Flower Runtime API request: a site worker's ``AcquireTask`` (a benchmark script).

The site worker (``securefed site-worker``) takes every message from its SuperNode's Runtime API
over HTTP; every stage of a deployed round is a chain of such requests (and of the SuperNodes'
and the coordinator's requests to the SuperLink), polled for, never pushed. This measures the
cheapest of them: ``AcquireTask`` against an idle SuperNode (no task pending), the request the
worker repeats while it waits. One SuperNode of a loopback federation exactly as
``docs/deploy.md`` deploys it (``securefed supernode --isolation process``, TLS to the SuperLink,
Runtime API auth secret); its own worker is stopped so that only this process asks.

    python experiments/benchmarks/runtime_api_cost.py [--calls 100] [--repeats 5]

Prints, per repeat and as medians: wall per call, this process's CPU per call (the client side:
httpx, the protobuf codec, the HMAC interceptor) and the SuperNode's CPU per call (read from
``/proc``, Linux; FastAPI/uvicorn and the Runtime API handler).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from securefed.deploy.loopback import LoopbackFederation
from securefed.deploy.worker import SiteWorker


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100, help="AcquireTask calls per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runtime-api-cost-"))
    fed = LoopbackFederation(work / "fed", 2, worker=True, idle_poll=0.1,
                             node_config={i: {"partition-id": i} for i in range(2)})
    try:
        fed.start()
        for name, proc in fed.procs.items():
            if name.endswith("_worker"):
                proc.popen.kill()
        time.sleep(12.0)  # past the SuperNodes' 10 s grace: they poll the SuperLink every 3 s
        node = fed.procs["site_0"].popen.pid
        worker = SiteWorker(fed.runtime_address(0), fed.runtime_secret(0).read_bytes())
        worker.acquire()  # connect
        walls, clients, nodes = [], [], []
        print(f"{args.calls} AcquireTask calls per repeat against an idle SuperNode")
        for rep in range(args.repeats):
            n0, c0, t0 = process_cpu(node), time.process_time(), time.monotonic()
            for _ in range(args.calls):
                if worker.acquire() is not None:
                    raise RuntimeError("a task was pending: the SuperNode is not idle")
            walls.append((time.monotonic() - t0) / args.calls * 1e3)
            clients.append((time.process_time() - c0) / args.calls * 1e3)
            nodes.append((process_cpu(node) - n0) / args.calls * 1e3)
            print(f"repeat {rep + 1}: wall {walls[-1]:.2f} ms, client CPU {clients[-1]:.2f} ms, "
                  f"SuperNode CPU {nodes[-1]:.2f} ms per call")
        worker.close()
        print(f"median: wall {statistics.median(walls):.2f} ms, client CPU "
              f"{statistics.median(clients):.2f} ms, SuperNode CPU "
              f"{statistics.median(nodes):.2f} ms per AcquireTask")
    finally:
        fed.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
