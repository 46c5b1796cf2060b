"""FedDiffuse (de Goede, Cox, Decouchant 2024): exchange only parts of the UNet.

Wraps FedAvg or FedProx. The UNet's ``parameter_groups()`` (encoder / bottleneck / decoder)
define what is shared:

- ``full``: every group, every round (equals the base strategy).
- ``usplit``: the selected clients are paired at random each round; in each pair one client
  sends the encoder + bottleneck delta, the other the decoder delta (an unpaired client sends
  both). Every client downloads and trains the whole global model; nothing is client-local.
- ``udec``: only the decoder is shared; encoder and bottleneck stay on the client.
- ``ulatdec``: bottleneck + decoder shared; the encoder stays on the client.

Local groups live in the client's private state (``SimClient.state["feddiffuse.local"]``, a
``[D_local]`` vector, checkpointed with the client) and never enter a protocol input: a client
packs only the vectors of the segments it shares, and a round with clients sharing different
segments (USPLIT) runs one protocol session per segment, each of which reveals only a SUM.
Each segment's global update is the weighted mean over the clients that sent it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from securefed.config import FedDiffuseConfig
from securefed.strategies.base import (
    ClientPolicy,
    ClientPolicyWrapper,
    ClientUpdate,
    CohortSum,
    RoundPlan,
    Strategy,
    StrategyWrapper,
)

__all__ = [
    "SEGMENTS",
    "FedDiffuse",
    "FedDiffuseClient",
    "group_indices",
    "pair_clients",
    "shared_groups",
]

#: the segments a client can send (each one protocol session in USPLIT)
SEGMENTS: dict[str, tuple[str, ...]] = {
    "front": ("encoder", "bottleneck"),
    "back": ("decoder",),
}
_LOCAL = "feddiffuse.local"

_SHARED: dict[str, tuple[str, ...]] = {
    "full": ("encoder", "bottleneck", "decoder"),
    "usplit": ("encoder", "bottleneck", "decoder"),
    "udec": ("decoder",),
    "ulatdec": ("bottleneck", "decoder"),
}


def shared_groups(variant: str) -> tuple[str, ...]:
    """UNet groups that leave the client under ``variant`` (the rest stay local)."""
    try:
        return _SHARED[variant]
    except KeyError:
        raise ValueError(
            f"feddiffuse.variant: unknown variant {variant!r}; choose one of {sorted(_SHARED)}"
        ) from None


def group_indices(
    slices: Mapping[str, slice], groups: Mapping[str, Sequence[str]]
) -> dict[str, torch.Tensor]:
    """Group name -> sorted int64 indices into the flat ``[D]`` parameter vector.

    Args:
        slices: parameter name -> slice of the flat vector (``param_slices(model)``).
        groups: ``UNet.parameter_groups()``.
    """
    out = {}
    for g, names in groups.items():
        parts = [torch.arange(slices[n].start, slices[n].stop) for n in names]
        out[g] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return out


def pair_clients(clients: Sequence[int], rng: np.random.Generator) -> dict[int, tuple[str, ...]]:
    """USPLIT assignment: random pairs, first of each pair sends ``front``, second ``back``; an
    odd client out sends both. Returns client -> segments it sends."""
    perm = [int(c) for c in rng.permutation(np.asarray(clients, dtype=np.int64))]
    out: dict[int, tuple[str, ...]] = {}
    for i in range(0, len(perm) - 1, 2):
        out[perm[i]], out[perm[i + 1]] = ("front",), ("back",)
    if len(perm) % 2:
        out[perm[-1]] = ("front", "back")
    return out


class FedDiffuse(StrategyWrapper):
    """Partial-UNet exchange around a FedAvg/FedProx ``base``.

    Args:
        base: the wrapped strategy (its local objective and server update rule are used).
        cfg: the ``feddiffuse`` section.
        groups: group -> indices into ``[D]`` (:func:`group_indices`).
        seed: run seed (USPLIT pairing stream). derive: ``derive_seed``. purpose: its purpose id.
    """

    name = "feddiffuse"
    layer = "feddiffuse"

    def __init__(
        self,
        base: Strategy,
        cfg: FedDiffuseConfig,
        groups: Mapping[str, torch.Tensor],
        seed: int,
        *,
        derive: Callable[..., int],
        purpose: int,
    ) -> None:
        super().__init__(base)
        self.variant = cfg.variant
        self.groups = {k: v.clone() for k, v in groups.items()}
        shared = shared_groups(cfg.variant)
        self.shared = shared
        self.local_groups = tuple(
            g for g in ("encoder", "bottleneck", "decoder") if g not in shared
        )
        cat = torch.cat
        empty = torch.zeros(0, dtype=torch.long)
        self.shared_idx = torch.sort(cat([self.groups[g] for g in shared] or [empty])).values
        self.local_idx = torch.sort(
            cat([self.groups[g] for g in self.local_groups] or [empty])
        ).values
        self.segment_idx = {
            s: torch.sort(cat([self.groups[g] for g in gs])).values for s, gs in SEGMENTS.items()
        }
        self.dim = int(sum(v.numel() for v in self.groups.values()))
        self.seed = seed
        self._derive = derive
        self._purpose = purpose
        self._assignment: dict[int, tuple[str, ...]] = {}

    @property
    def personalized(self) -> bool:
        """True when clients keep local groups (UDEC, ULATDEC): no single global model."""
        return self.local_idx.numel() > 0

    # ------------------------------------------------------------------ planning
    def configure_round(
        self,
        rnd: int,
        global_params: torch.Tensor,
        available: Sequence[int],
        fraction: float,
        minimum: int,
        rng: np.random.Generator,
    ) -> RoundPlan:
        plan = self.base.configure_round(rnd, global_params, available, fraction, minimum, rng)
        self.assign(rnd, plan.clients)
        return plan

    def assign(self, rnd: int, clients: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """Set (and return) round ``rnd``'s segment assignment of ``clients``: USPLIT pairs them
        from the public ``(seed, USPLIT, rnd)`` stream (:func:`pair_clients`); the other
        variants send the same segment from every client. A deployed site calls this with the
        round's signed client list, so it recomputes its segments instead of trusting the
        coordinator's."""
        self._assignment = self.pairing(rnd, clients)
        return dict(self._assignment)

    def pairing(self, rnd: int, clients: Sequence[int]) -> dict[int, tuple[str, ...]]:
        """Round ``rnd``'s segment assignment of ``clients`` (:meth:`assign` without setting
        it): a deployed coordinator plans the next round's sessions with it."""
        if self.variant == "usplit":
            own = np.random.default_rng(self._derive(self.seed, self._purpose, rnd))
            return pair_clients(clients, own)
        segs = ("all",) if self.variant == "full" else ("shared",)
        return dict.fromkeys((int(c) for c in clients), segs)

    def segments_of(self, cid: int) -> tuple[str, ...]:
        """Segments client ``cid`` sends this round."""
        return self._assignment[cid]

    def _segment_index(self, seg: str) -> torch.Tensor:
        if seg == "all":
            return torch.arange(self.dim)
        if seg == "shared":
            return self.shared_idx
        return self.segment_idx[seg]

    # ------------------------------------------------------------------ the clients' view
    def make_client_policy(self) -> ClientPolicy:
        return FedDiffuseClient(self.base.client, self)

    def compose(self, global_params: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """``[D]`` model: the global shared groups with the client's local groups (if any)."""
        if local is None or self.local_idx.numel() == 0:
            return global_params
        out = global_params.clone()
        out[self.local_idx] = local.to(out.dtype)
        return out

    def segments_for_update(self, cid: int) -> tuple[str, ...]:
        """The segments client ``cid`` uploads this round (the plan's public assignment)."""
        if self.variant != "usplit":  # the same segment for every client in every round (a
            # deployed site runs no configure_round: it needs no assignment for these variants)
            return ("all",) if self.variant == "full" else ("shared",)
        if cid not in self._assignment:
            raise RuntimeError(
                f"FedDiffuse usplit: client {cid} is not in this round's plan (configure_round "
                "assigns the segments)"
            )
        return self._assignment[cid]

    # ------------------------------------------------------------------ server side
    def upload_cohorts(
        self, rnd: int, updates: Mapping[int, ClientUpdate]
    ) -> dict[str, dict[int, ClientUpdate]]:
        """One cohort per segment; each member contributes only that segment's vector."""
        cohorts: dict[str, dict[int, ClientUpdate]] = {}
        for cid in sorted(updates):
            u = updates[cid]
            for key in sorted(u.vectors):
                seg = key.split(".", 1)[1]
                cohorts.setdefault(seg, {})[cid] = ClientUpdate(
                    vectors={key: u.vectors[key]}, weight=u.weight, new_state=u.new_state
                )
        return cohorts

    def aggregate(
        self, rnd: int, global_params: torch.Tensor, results: Mapping[str, CohortSum]
    ) -> torch.Tensor:
        """Each segment: weighted mean of its senders' deltas; groups nobody sent (or kept
        local) get a zero delta; then the base's server update (server lr, momentum, EMA)."""
        if not results:
            raise ValueError(f"round {rnd}: nothing to aggregate")
        mean = torch.zeros(global_params.numel(), dtype=torch.float64)
        for seg, r in results.items():
            if r.total_weight <= 0 or r.num_contributors == 0:
                continue
            mean[self._segment_index(seg)] = r.sums[f"delta.{seg}"].to(torch.float64) / (
                r.total_weight
            )
        return self.server_opt.step(global_params, mean)

    def personal_params(
        self, global_params: torch.Tensor, client_state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if not self.personalized:
            return None
        return self.compose(self.base.eval_params(global_params), client_state.get(_LOCAL))

    def round_metrics(self) -> dict[str, object]:
        return {
            "feddiffuse": {
                "variant": self.variant,
                "segments": {str(c): list(s) for c, s in sorted(self._assignment.items())},
            }
        }


class FedDiffuseClient(ClientPolicyWrapper):
    """FedDiffuse's client: it trains the composed model (shared groups from the server, its
    local groups from its own state) and uploads only the segments it shares this round; its
    local groups go to its private state."""

    def __init__(self, base: ClientPolicy, fd: FedDiffuse) -> None:
        super().__init__(base)
        self.fd = fd

    def start_params(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        return self.fd.compose(broadcast["params"], client_state.get(_LOCAL))

    def download_numel(
        self, cid: int, broadcast: Mapping[str, torch.Tensor],
        client_state: Mapping[str, torch.Tensor],
    ) -> int:
        """UDEC/ULATDEC: only the shared groups once the client holds its local groups (the
        first contact downloads the whole initial model)."""
        if self.fd.personalized and _LOCAL in client_state:
            return int(self.fd.shared_idx.numel())
        return sum(int(v.numel()) for v in broadcast.values())

    def client_update(
        self,
        cid: int,
        broadcast: Mapping[str, torch.Tensor],
        local_params: torch.Tensor,
        num_examples: int,
        local_steps: int,
        lr: float,
        client_state: Mapping[str, torch.Tensor],
        mean_grad: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Only the vectors of the segments this client shares; local groups go to new_state."""
        start = self.start_params(cid, broadcast, client_state)
        inner = self.base.client_update(
            cid, {**broadcast, "params": start}, local_params, num_examples, local_steps, lr,
            client_state, mean_grad,
        )
        if set(inner.vectors) != {"delta"}:  # pragma: no cover - excluded by config validation
            raise TypeError(f"FedDiffuse wraps delta-only strategies, got {sorted(inner.vectors)}")
        delta = inner.vectors["delta"]
        vectors = {
            f"delta.{s}": delta[self.fd._segment_index(s)]
            for s in self.fd.segments_for_update(cid)
        }
        new_state = dict(inner.new_state)
        if self.fd.personalized:
            new_state[_LOCAL] = local_params[self.fd.local_idx].clone()
        return ClientUpdate(vectors=vectors, weight=inner.weight, new_state=new_state)
