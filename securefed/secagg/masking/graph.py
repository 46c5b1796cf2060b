"""The masking graph: who shares masks and Shamir shares with whom.

- SecAgg (Bonawitz et al. 2017): the complete graph, every pair of clients masks.
- SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead"):
  a random k-regular graph with k = O(log n), so per-client cost is polylogarithmic in n. As in
  their construction, the graph is a Harary graph H_{k,n} (a ring where each node links to its
  k/2 nearest nodes on each side; for odd k also to the node opposite) with the nodes placed on
  the ring in a uniformly random order.

The random order is *public* randomness of the round, so every party derives the same graph
without a message: ``seed = SHA-256(DOMAIN / graph || round id || sorted client ids)`` keys the
AES-256-CTR keystream of :mod:`~securefed.noise.prg`, and the ring order is the clients sorted
by a 64-bit key read from it (a uniform permutation; ties, probability < n^2 / 2^64, break by
id). An odd k with an odd number of clients admits no k-regular graph: k is then raised to
k + 1. ``k >= n - 1`` gives the complete graph.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from securefed.noise.prg import DOMAIN, keystream

__all__ = ["NeighbourGraph", "build_graph", "effective_degree", "round_seed"]


def round_seed(round_id: int, ids: Sequence[int]) -> bytes:
    """Public 32-byte seed of the round's graph: SHA-256 over the round id and the sorted ids."""
    h = hashlib.sha256(DOMAIN + b"/graph")
    h.update(struct.pack(">QQ", round_id, len(ids)))
    for cid in sorted(ids):
        h.update(struct.pack(">Q", cid))
    return h.digest()


def effective_degree(k: int | None, n: int) -> int:
    """The degree actually used for ``n`` nodes: ``n - 1`` (complete) or k, or k + 1 (odd k, n)."""
    if k is None or k >= n - 1:
        return n - 1
    if k < 2:
        raise ValueError(f"secure_aggregation.neighbours: k must be >= 2, got {k}")
    if k % 2 == 1 and n % 2 == 1:
        k += 1
    return min(k, n - 1)


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected graph on the round's clients.

    Attributes:
        nodes: sorted client ids.
        degree: every node's degree (``len(nodes) - 1`` when complete).
        ring: ``[n]`` client ids in ring order (Harary graph); empty when complete.
    """

    nodes: tuple[int, ...]
    degree: int
    ring: np.ndarray = field(repr=False)
    _position: dict[int, int] = field(repr=False, compare=False)

    @property
    def complete(self) -> bool:
        return self.degree >= len(self.nodes) - 1

    @property
    def neighbourhood_size(self) -> int:
        """Size of a closed neighbourhood ``N[u] = N(u) + {u}``: the Shamir share holders."""
        return self.degree + 1

    def neighbours(self, u: int) -> frozenset[int]:
        """``N(u)``, excluding ``u``."""
        if self.complete:
            if u not in self.nodes:
                raise KeyError(u)
            return frozenset(self.nodes) - {u}
        n = len(self.nodes)
        p = self._position[u]
        half = self.degree // 2
        out = {int(self.ring[(p + d) % n]) for d in range(1, half + 1)}
        out |= {int(self.ring[(p - d) % n]) for d in range(1, half + 1)}
        if self.degree % 2 == 1:
            out.add(int(self.ring[(p + n // 2) % n]))
        return frozenset(out)

    def closed_neighbourhood(self, u: int) -> frozenset[int]:
        """``N[u] = N(u) + {u}``."""
        return self.neighbours(u) | {u}

    def is_connected(self, subset: Iterable[int]) -> bool:
        """Whether the subgraph induced by ``subset`` is connected (empty: False)."""
        members = set(subset)
        if not members:
            return False
        if self.complete:
            return True
        # lazy: scipy.sparse and its csgraph are slow to import; complete graphs never need them
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components  # lazy: as above

        n = len(self.nodes)
        alive = np.fromiter((int(c) in members for c in self.ring), dtype=bool, count=n)
        idx = np.arange(n)
        rows, cols = [], []
        offsets = list(range(1, self.degree // 2 + 1))
        if self.degree % 2 == 1:
            offsets.append(n // 2)
        for d in offsets:
            j = (idx + d) % n
            keep = alive & alive[j]
            rows.append(idx[keep])
            cols.append(j[keep])
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        adj = coo_matrix((np.ones(r.shape[0], dtype=np.int8), (r, c)), shape=(n, n))
        _, labels = connected_components(adj, directed=False)
        return len(set(labels[alive].tolist())) == 1


def build_graph(round_id: int, ids: Iterable[int], k: int | None) -> NeighbourGraph:
    """The round's masking graph: complete (``k`` None or ``>= n - 1``) or random Harary.

    Args:
        round_id: public round number (part of the seed).
        ids: the round's client ids.
        k: requested degree, or None for the complete graph.
    """
    nodes = tuple(sorted(set(int(i) for i in ids)))
    n = len(nodes)
    degree = effective_degree(k, n) if n > 1 else 0
    if degree >= n - 1:
        return NeighbourGraph(nodes, max(n - 1, 0), np.zeros(0, dtype=np.int64), {})
    seed = round_seed(round_id, nodes)
    sort_keys = np.frombuffer(keystream(seed, 8 * n), dtype="<u8")
    order = np.lexsort((np.asarray(nodes, dtype=np.int64), sort_keys))
    ring = np.asarray(nodes, dtype=np.int64)[order]
    position = {int(c): i for i, c in enumerate(ring)}
    return NeighbourGraph(nodes, degree, ring, position)
