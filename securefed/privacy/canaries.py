"""White-box gradient canaries: an audit of record-level DP-SGD inside a real run.

References: Nasr et al. (2023), "Tight Auditing of Differentially Private Machine Learning"
(gradient and Dirac canaries); Steinke, Nasr & Jagielski (2023), "Privacy Auditing with One (1)
Training Run" (the white-box setting and the one-run bound).

Canary ``i`` is a record whose clipped gradient is always ``C * u_i``, with ``u_i = s_i e_{j_i}``
a Dirac direction: a random sign ``s_i`` on a distinct random coordinate ``j_i`` of the
model's weight tensors (``ndim >= 2``; biases and norm scales, whose gradients are coherent
across examples, are left out). Canaries in distinct coordinates are exactly orthogonal, adding
one costs one addition and scoring it one read (Nasr et al. 2023; dense random directions of a
650k-parameter model would be 2.6 GB at m = 1000).

- A fair coin INCLUDES each canary; every canary (included or not) belongs to one client drawn
  uniformly. An included canary is Poisson-sampled at its client's rate ``q`` at every DP-SGD
  step, like the client's records, and when sampled adds ``C * u_i`` to the clipped sum BEFORE
  the noise (:func:`~securefed.privacy.dp_step.dp_sgd_step`'s ``extra_sum``).
- Score (white-box: the adversary of DP-SGD sees every privatized gradient):
  ``score_i = sum over the client's steps of <g~_t, u_i> * (q n) / C``, the privatized gradient
  along ``u_i`` in units of ``C``: post-processing of the DP-SGD outputs, so a run that is
  (eps, delta)-DP for each canary bounds what the one-run audit can find. An included canary
  adds 1 per step it is sampled; the noise adds ``N(0, sigma^2)`` per step.
- Coins, coordinates, signs, owners and the per-step sampling come from a ChaCha20 keystream
  keyed by a 32-byte secret (``os.urandom``; ``canaries/canary.key``, mode 0600), never from the
  config seed: who knows the key knows which canaries went in.

Files under ``RUN_DIR/canaries/`` (all 0600; audit-only, never released with the model):
``canary.key``, ``gradient.npz`` (coords, signs, included, clients), ``gradient.json`` (m, clip),
``gradient_rounds/round_<r>.npy`` (``[m]`` float64 scores added in round ``r``; a resumed run
rewrites the rounds it replays and the audit sums the rounds up to the released checkpoint).

Client-level DP (DP-FedAvg) is audited with CANARY CLIENTS instead (:class:`CanaryClients`,
Andrew et al. 2024): the same keyed Dirac directions, each canary a client that sends
``S u_i`` when sampled; files ``clients.npz``, ``clients.json``, ``client_rounds/``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import nn

from securefed.io import atomic_write_bytes, atomic_write_json
from securefed.noise.secure_noise import derive_key
from securefed.privacy.accountant import epsilon_of
from securefed.privacy.ledger import EPSILON_SLACK
from securefed.strategies.base import ClientUpdate, unpack_sum

__all__ = [
    "CANARY_KEY_FILENAME",
    "CanaryClients",
    "ClientCanaries",
    "ClientCanaryRecord",
    "ClientCanaryRound",
    "GradientCanaries",
    "canary_uniforms",
    "discard_rounds_after",
    "load_client_scores",
    "load_gradient_scores",
]

CANARY_KEY_FILENAME = "canary.key"
_ROUNDS_DIR = "gradient_rounds"
_PURPOSE_DRAW, _PURPOSE_SAMPLE = 1, 2


def _save_secret(
    canary_dir: str | Path, name: str, key: bytes, arrays: dict[str, np.ndarray],
    meta: dict[str, object],
) -> Path:
    """The canary key, ``<name>.npz`` and ``<name>.json`` under ``canary_dir`` (0700), each
    written atomically with mode 0600: audit-only secrets."""
    d = Path(canary_dir)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    atomic_write_bytes(d / CANARY_KEY_FILENAME, key, mode=0o600)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy stubs: allow_pickle kw
    atomic_write_bytes(d / f"{name}.npz", buf.getvalue(), mode=0o600)
    atomic_write_json(
        d / f"{name}.json",
        {**meta, "note": "audit-only secrets: never release with the model"},
        mode=0o600,
    )
    return d


def _load_secret(
    canary_dir: str | Path, name: str
) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """Inverse of :func:`_save_secret`: ``(key, arrays)``, or None when there is no set."""
    d = Path(canary_dir)
    if not (d / f"{name}.npz").exists():
        return None
    key = (d / CANARY_KEY_FILENAME).read_bytes()
    with np.load(d / f"{name}.npz", allow_pickle=False) as z:
        return key, {k: z[k] for k in z.files}


def canary_uniforms(key: bytes, n: int) -> np.ndarray:
    """``n`` uniforms on [0, 1) (53-bit grid) from the ChaCha20 keystream of ``key``."""
    if n <= 0:
        return np.zeros(0)
    enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
    raw = np.frombuffer(enc.update(b"\x00" * (8 * n)), dtype="<u8")
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _weight_slots(model: nn.Module) -> tuple[list[int], list[int], list[int]]:
    """Trainable parameters in ``model.parameters()`` order: index, numel, and which of them
    are weight tensors (``ndim >= 2``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    weights = [i for i, p in enumerate(params) if p.dim() >= 2]
    return list(range(len(params))), numels, weights


@dataclass(frozen=True)
class GradientCanaries:
    """The run's ``m`` Dirac gradient canaries (see module docstring).

    Attributes:
        param_index: ``[m]`` int64, index into the trainable parameters
            (``model.parameters()`` order, ``requires_grad`` only).
        offset: ``[m]`` int64, flat position inside that parameter.
        signs: ``[m]`` float64, +-1.
        included: ``[m]`` bool, the fair coins.
        clients: ``[m]`` int64, the client each canary belongs to.
        key: the 32-byte secret everything was drawn from.
    """

    param_index: np.ndarray
    offset: np.ndarray
    signs: np.ndarray
    included: np.ndarray
    clients: np.ndarray
    key: bytes

    def __len__(self) -> int:
        return int(self.signs.size)

    # ------------------------------------------------------------------ creation / storage
    @classmethod
    def draw(
        cls, model: nn.Module, m: int, num_clients: int, key: bytes | None = None
    ) -> GradientCanaries:
        """Draw ``m`` canaries over ``model``'s weight tensors for ``num_clients`` clients."""
        if m < 2:
            raise ValueError(f"canaries.m: need at least 2 canaries, got {m}")
        if num_clients < 1:
            raise ValueError(f"canaries: need at least one client, got {num_clients}")
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError(f"canaries: the key must be 32 bytes, got {len(key)}")
        _, numels, weights = _weight_slots(model)
        total = sum(numels[i] for i in weights)
        if m > total // 4:
            raise ValueError(
                f"canaries.m: {m} canaries need distinct coordinates among the model's {total} "
                f"weight entries; use m <= {total // 4}"
            )
        u = canary_uniforms(derive_key(key, _PURPOSE_DRAW), 4 * m + 4 * m)
        # distinct coordinates: keyed random keys, first m of a rejection-free draw
        coords: list[int] = []
        seen: set[int] = set()
        for x in u[: 4 * m]:
            c = int(x * total)
            if c not in seen:
                seen.add(c)
                coords.append(c)
                if len(coords) == m:
                    break
        if len(coords) < m:  # pragma: no cover - 4m draws over >= 4m slots
            raise RuntimeError("canaries: could not draw distinct coordinates")
        cum = np.cumsum([0] + [numels[i] for i in weights])
        flat = np.asarray(coords, dtype=np.int64)
        slot = np.searchsorted(cum, flat, side="right") - 1
        param_index = np.asarray(weights, dtype=np.int64)[slot]
        offset = flat - cum[slot]
        rest = u[4 * m :]
        signs = np.where(rest[:m] < 0.5, -1.0, 1.0)
        included = rest[m : 2 * m] < 0.5
        clients = np.minimum((rest[2 * m : 3 * m] * num_clients).astype(np.int64), num_clients - 1)
        return cls(param_index, offset.astype(np.int64), signs, included, clients, key)

    def save(self, canary_dir: str | Path, clip: float) -> Path:
        """Write the key, the canaries and their metadata under ``canary_dir`` (all 0600)."""
        return _save_secret(
            canary_dir, "gradient", self.key,
            {"param_index": self.param_index, "offset": self.offset, "signs": self.signs,
             "included": self.included, "clients": self.clients},
            {"m": len(self), "included": int(self.included.sum()), "clip": float(clip),
             "kind": "dirac gradient canaries (white-box, record-level DP-SGD)"},
        )

    @classmethod
    def load(cls, canary_dir: str | Path) -> GradientCanaries | None:
        loaded = _load_secret(canary_dir, "gradient")
        if loaded is None:
            return None
        key, arrs = loaded
        return cls(
            arrs["param_index"].astype(np.int64),
            arrs["offset"].astype(np.int64),
            arrs["signs"].astype(np.float64),
            arrs["included"].astype(bool),
            arrs["clients"].astype(np.int64),
            key,
        )

    @classmethod
    def create_or_load(
        cls, canary_dir: str | Path, model: nn.Module, m: int, num_clients: int, clip: float
    ) -> GradientCanaries:
        """The run's canaries: loaded when ``canary_dir`` has them (resume), else drawn with a
        fresh key and saved."""
        got = cls.load(canary_dir)
        if got is not None:
            if len(got) != m:
                raise ValueError(
                    f"canaries.m: the run directory holds {len(got)} canaries, the config asks "
                    f"for {m}; keep canaries.m unchanged when resuming"
                )
            return got
        c = cls.draw(model, m, num_clients)
        c.save(canary_dir, clip)
        return c

    # ------------------------------------------------------------------ training
    def for_client(
        self, rnd: int, cid: int, model: nn.Module, sample_rate: float, clip: float
    ) -> ClientCanaries:
        """The hook for one client's DP-SGD in round ``rnd`` (see :class:`ClientCanaries`)."""
        sel = self.owned_by(cid)
        return ClientCanaries(
            self.param_index[sel], self.offset[sel], self.signs[sel], self.included[sel],
            self.sampling_key(rnd, cid), model, sample_rate, clip, selected=sel,
        )

    def owned_by(self, cid: int) -> np.ndarray:
        """``[m_cid]`` int64: the indices of client ``cid``'s canaries, ascending (the order
        :meth:`for_client` samples and scores them in)."""
        return np.flatnonzero(self.clients == cid).astype(np.int64)

    def sampling_key(self, rnd: int, cid: int) -> bytes:
        """The 32-byte key of client ``cid``'s per-step canary sampling in round ``rnd``
        (derived from the secret; it reveals nothing about other rounds, clients or coins)."""
        return derive_key(self.key, _PURPOSE_SAMPLE, rnd, cid)

    def commit(self, canary_dir: str | Path, rnd: int, scores: np.ndarray) -> Path:
        """Store round ``rnd``'s ``[m]`` scores (0600, atomic)."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(scores, dtype=np.float64), allow_pickle=False)
        path = Path(canary_dir) / _ROUNDS_DIR / f"round_{rnd:05d}.npy"
        atomic_write_bytes(path, buf.getvalue(), mode=0o600)
        return path


class ClientCanaries:
    """One client's canaries during one DP-SGD run: :meth:`extra_sum` before each step (the
    sampled included canaries' ``C * u_i``) and :meth:`observe` after it (the privatized
    gradient along each of the client's canaries); :attr:`scores` holds their sums.

    Built from the client's own canaries only (:meth:`GradientCanaries.for_client` in the
    simulation; a deployed site from the coordinator's signed assignment), so a party holding
    it learns nothing about the other clients' canaries or the secret key.

    Args:
        param_index / offset / signs / included: ``[m_c]`` the client's canaries (trainable
            parameter index, flat offset in it, +-1, the fair coin), in sampling order.
        sample_key: 32 bytes, :meth:`GradientCanaries.sampling_key` of the client-round: the
            ChaCha20 key of the per-step Poisson draws (one uniform per canary and step).
        model: the trained model (its ``requires_grad`` parameters, in order).
        sample_rate: the client's record sampling rate ``q``. clip: ``C``.
        selected: ``[m_c]`` the canaries' indices in the run's set (default ``arange(m_c)``).
    """

    def __init__(
        self,
        param_index: np.ndarray,
        offset: np.ndarray,
        signs: np.ndarray,
        included: np.ndarray,
        sample_key: bytes,
        model: nn.Module,
        sample_rate: float,
        clip: float,
        *,
        selected: np.ndarray | None = None,
    ) -> None:
        m = int(np.asarray(signs).size)
        if len(sample_key) != 32:
            raise ValueError(f"canaries: the sampling key must be 32 bytes, got {len(sample_key)}")
        self.selected = (
            np.arange(m, dtype=np.int64) if selected is None else np.asarray(selected, np.int64)
        )
        self.q = float(sample_rate)
        self.clip = float(clip)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pidx = np.asarray(param_index, dtype=np.int64)
        self.off = torch.as_tensor(np.asarray(offset, dtype=np.int64))
        self.sign = np.asarray(signs, dtype=np.float64)
        self.inc = np.asarray(included, dtype=bool)
        if not (self.selected.size == self.pidx.size == self.off.numel() == self.inc.size == m):
            raise ValueError("canaries: the client's canary arrays differ in length")
        self.scores = np.zeros(m, dtype=np.float64)
        self.sampled = np.zeros(m, dtype=np.int64)
        self._key = bytes(sample_key)
        self._enc = Cipher(algorithms.ChaCha20(self._key, b"\x00" * 16), mode=None).encryptor()
        self._groups = [(int(i), np.flatnonzero(self.pidx == i)) for i in np.unique(self.pidx)]

    def restart(self) -> None:
        """Forget the scores of a discarded training attempt (a retrain with fresh noise)."""
        self.scores[:] = 0.0
        self.sampled[:] = 0
        self._enc = Cipher(algorithms.ChaCha20(self._key, b"\x00" * 16), mode=None).encryptor()

    def _uniforms(self, n: int) -> np.ndarray:
        raw = np.frombuffer(self._enc.update(b"\x00" * (8 * n)), dtype="<u8")
        return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def extra_sum(self) -> dict[int, torch.Tensor]:
        """This step's Poisson sample of the included canaries, as ``{trainable param index:
        [param.shape] tensor}`` to add to the clipped sum before the noise."""
        hit = (self._uniforms(self.selected.size) < self.q) & self.inc
        self.sampled += hit
        out: dict[int, torch.Tensor] = {}
        for i, rows in self._groups:
            rows = rows[hit[rows]]
            if rows.size == 0:
                continue
            p = self.params[i]
            t = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            vals = torch.as_tensor(self.sign[rows] * self.clip, dtype=p.dtype, device=p.device)
            t[self.off[rows].to(p.device)] = vals
            out[i] = t.view_as(p)
        return out

    @torch.no_grad()
    def observe(self, expected_batch_size: float) -> None:
        """Add the privatized gradient along each canary (in units of ``C``) to its score:
        ``p.grad = (clipped sum + canaries + noise) / (q n)`` must be in place."""
        scale = expected_batch_size / self.clip
        for i, rows in self._groups:
            g = self.params[i].grad
            if g is None:
                continue
            vals = g.reshape(-1)[self.off[rows].to(g.device)].double().cpu().numpy()
            self.scores[rows] += self.sign[rows] * vals * scale


def load_gradient_scores(
    canary_dir: str | Path, up_to_round: int
) -> tuple[GradientCanaries, np.ndarray, list[int]] | None:
    """``(canaries, scores [m], rounds summed)``: the per-round scores of rounds
    ``<= up_to_round`` (the released model's), or None without gradient canaries."""
    d = Path(canary_dir)
    c = GradientCanaries.load(d)
    if c is None:
        return None
    total = np.zeros(len(c), dtype=np.float64)
    rounds = []
    for p in sorted((d / _ROUNDS_DIR).glob("round_*.npy")):
        r = int(p.stem.split("_")[1])
        if r > up_to_round:
            continue
        arr = np.load(p, allow_pickle=False)
        if arr.shape != total.shape:
            raise ValueError(f"{p}: {arr.shape} scores for {len(c)} canaries (corrupt file)")
        total += arr
        rounds.append(r)
    meta = json.loads((d / "gradient.json").read_text()) if (d / "gradient.json").exists() else {}
    if meta.get("m", len(c)) != len(c):
        raise ValueError(f"{d}/gradient.json: m disagrees with gradient.npz (corrupt)")
    return c, total, rounds


# =========================================================================== client-level DP
_PURPOSE_CLIENT_SAMPLE = 3
_CLIENT_ROUNDS_DIR = "client_rounds"


def _flat_positions(model: nn.Module, param_index: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``[m]`` positions in the model's flat ``[D]`` vector (:func:`~securefed.diffusion.params.
    get_flat`: every parameter, ``model.parameters()`` order) of canaries addressed as
    (trainable-parameter index, offset)."""
    all_params = list(model.parameters())
    starts = np.cumsum([0] + [p.numel() for p in all_params])[:-1]
    trainable = [k for k, p in enumerate(all_params) if p.requires_grad]
    glob = np.asarray(trainable, dtype=np.int64)[param_index]
    return (starts[glob] + offset).astype(np.int64)


@dataclass(frozen=True)
class CanaryClients:
    """``m`` canary clients for auditing client-level DP (DP-FedAvg) inside a real run.

    Andrew, Chien, Thakkar et al. (2024), "One-shot Empirical Privacy Estimation for Federated
    Learning", ICLR: canary clients send a fixed direction instead of a model delta; here the
    directions are Dirac (``u_i = s_i e_{j_i}``, a random sign on a distinct random weight
    coordinate, as for :class:`GradientCanaries`): exactly orthogonal, O(1) to add and to score.

    - A fair coin INCLUDES each canary client (ChaCha20 keyed by the secret ``canary.key``).
    - In every round each canary client is sampled at the round's client sampling rate
      ``q_r = selected / num_clients`` (keyed draw, one per canary and round, included or not),
      and - like a real client - only while its next participation keeps the accountant's
      epsilon within ``dp.target_epsilon`` (:meth:`eligible`).
    - A sampled INCLUDED canary contributes ``S_r u_i`` (``S_r`` = the round's clip norm: the
      largest update the clip allows) to the round's sum of clipped deltas, under the round's
      noise: :meth:`contribution` is the exact sum of the sampled included canaries' vectors.
    - Score of canary ``i`` (the server's white-box view: every per-round noised sum it
      receives): ``sum over its sampled rounds of <noised sum_r, u_i> / S_r``; an included one
      adds 1 per sampled round, the noise ``N(0, z_r^2)``.
    - The claim it is compared with: the accountant's epsilon of the canary's own history
      (one Gaussian-mechanism step at the round's charged multiplier, sample rate 1, per
      sampled round - what the ledger charges a real client for the same participations).

    Design choices (documented in docs/guide.md's audit section):

    - The real clients' noise is planned from the REAL selected clients only
      (:meth:`~securefed.privacy.client_level.ClientLevelDP.round_noise`); the canaries' summed
      vector is a constant of the secret key, independent of every real client's data, so adding
      it to the released sum is post-processing for them: their guarantee is unchanged.
    - The vector is added to the protocol's released sum, in the ``delta`` block, before the
      server divides by the number of real contributors: the place a real client's clipped
      delta reaches, under the same noise. Making each canary a protocol party instead would add
      ``m q`` parties with their own noise shares to every masking session (and change the
      survivor threshold the charge is planned for); with exact encoding the sum is the same.
    - Canaries are not counted in the divisor (``m q`` of them would dilute the real clients'
      mean) and send no adaptive-clipping bit (it would move ``S``); their cost to the model is
      ``S / n`` on each of their ``m`` coordinates per sampled round, out of ``D``.

    Files under ``RUN_DIR/canaries/`` (0600): ``canary.key``, ``clients.npz`` (param_index,
    offset, flat, signs, included), ``clients.json``, ``client_rounds/round_<r>.npz`` (``scores``
    ``[m]`` float64, ``sampled`` ``[m]`` bool, ``charged_multiplier``, ``clip``; a resumed run
    rewrites the rounds it replays and the audit reads rounds up to the released checkpoint).

    Attributes:
        param_index: ``[m]`` int64, trainable-parameter index. offset: ``[m]`` int64.
        flat: ``[m]`` int64, position in the flat ``[D]`` model vector (``get_flat`` order).
        signs: ``[m]`` float64 +-1. included: ``[m]`` bool. key: the 32-byte secret.
    """

    param_index: np.ndarray
    offset: np.ndarray
    flat: np.ndarray
    signs: np.ndarray
    included: np.ndarray
    key: bytes

    def __len__(self) -> int:
        return int(self.signs.size)

    # ------------------------------------------------------------------ creation / storage
    @classmethod
    def draw(cls, model: nn.Module, m: int, key: bytes | None = None) -> CanaryClients:
        """``m`` canary clients over ``model``'s weight tensors from ``key`` (fresh if None)."""
        g = GradientCanaries.draw(model, m, 1, key=key)
        flat = _flat_positions(model, g.param_index, g.offset)
        return cls(g.param_index, g.offset, flat, g.signs, g.included, g.key)

    def save(self, canary_dir: str | Path) -> Path:
        return _save_secret(
            canary_dir, "clients", self.key,
            {"param_index": self.param_index, "offset": self.offset, "flat": self.flat,
             "signs": self.signs, "included": self.included},
            {"m": len(self), "included": int(self.included.sum()),
             "kind": "dirac canary clients (white-box, client-level DP-FedAvg)"},
        )

    @classmethod
    def load(cls, canary_dir: str | Path) -> CanaryClients | None:
        d = Path(canary_dir)
        loaded = _load_secret(d, "clients")
        if loaded is None:
            return None
        key, a = loaded
        sizes = {a[k].shape for k in ("param_index", "offset", "flat", "signs", "included")}
        if len(sizes) != 1:
            raise ValueError(f"{d / 'clients.npz'}: arrays of different lengths (corrupt file)")
        return cls(a["param_index"].astype(np.int64), a["offset"].astype(np.int64),
                   a["flat"].astype(np.int64), a["signs"].astype(np.float64),
                   a["included"].astype(bool), key)

    @classmethod
    def create_or_load(cls, canary_dir: str | Path, model: nn.Module, m: int) -> CanaryClients:
        """Loaded when ``canary_dir`` has them (resume), else drawn with a fresh key and saved."""
        got = cls.load(canary_dir)
        if got is not None:
            if len(got) != m:
                raise ValueError(
                    f"canaries.m: the run directory holds {len(got)} canary clients, the config "
                    f"asks for {m}; keep canaries.m unchanged when resuming"
                )
            return got
        c = cls.draw(model, m)
        c.save(canary_dir)
        return c

    # ------------------------------------------------------------------ one round
    def sample(self, rnd: int, rate: float) -> np.ndarray:
        """``[m]`` bool: the canary clients the round-``rnd`` draw samples at ``rate`` (keyed by
        the secret; included or not, so the excluded ones are scored on the same footing)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"canary clients: sampling rate must be in [0, 1], got {rate}")
        return canary_uniforms(derive_key(self.key, _PURPOSE_CLIENT_SAMPLE, rnd), len(self)) < rate

    def eligible(
        self,
        histories: list[list[float]],
        charge: float,
        target_epsilon: float | None,
        delta: float,
        accountant: str,
        cache: dict[tuple[float, ...], float] | None = None,
    ) -> np.ndarray:
        """``[m]`` bool: whose next participation at ``charge`` keeps its accountant epsilon
        within ``target_epsilon`` (the rule a real client's ledger applies; all True without a
        target). ``histories[i]``: the charged multipliers of canary ``i``'s past rounds."""
        if target_epsilon is None:
            return np.ones(len(self), dtype=bool)
        cache = {} if cache is None else cache
        out = np.zeros(len(self), dtype=bool)
        for i, h in enumerate(histories):
            t = tuple(sorted(round(z, 12) for z in [*h, charge]))
            if t not in cache:
                cache[t] = float(epsilon_of([(z, 1.0, 1) for z in t], delta, accountant))
            out[i] = cache[t] <= target_epsilon * (1.0 + EPSILON_SLACK)
        return out

    def contribution(self, sampled: np.ndarray, clip: float, length: int) -> np.ndarray:
        """``[length]`` float64: the sum of the sampled included canary clients' updates
        ``S u_i`` (distinct coordinates, so exactly their sum), zero elsewhere."""
        v = np.zeros(length, dtype=np.float64)
        on = np.asarray(sampled, bool) & self.included
        v[self.flat[on]] = self.signs[on] * float(clip)
        return v

    def scores(self, noised_sum: np.ndarray, sampled: np.ndarray, clip: float) -> np.ndarray:
        """``[m]``: ``<noised_sum, u_i> / S`` for the sampled canaries, 0 for the others.

        Args:
            noised_sum: ``[D]`` the round's privatized sum of clipped model deltas (as the
                server receives it, canaries included, before dividing by the contributors).
        """
        s = np.asarray(sampled, bool)
        out = np.zeros(len(self), dtype=np.float64)
        out[s] = self.signs[s] * np.asarray(noised_sum, np.float64)[self.flat[s]] / float(clip)
        return out

    def commit(
        self,
        canary_dir: str | Path,
        rnd: int,
        scores: np.ndarray,
        sampled: np.ndarray,
        charged_multiplier: float,
        clip: float,
    ) -> Path:
        """Store round ``rnd``'s scores, participation and charge (0600, atomic)."""
        buf = io.BytesIO()
        np.savez(buf, scores=np.asarray(scores, np.float64), sampled=np.asarray(sampled, bool),
                 charged_multiplier=np.float64(charged_multiplier), clip=np.float64(clip))
        path = Path(canary_dir) / _CLIENT_ROUNDS_DIR / f"round_{rnd:05d}.npz"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue(), mode=0o600)
        return path


@dataclass(frozen=True)
class ClientCanaryRecord:
    """What the audit reads back: the summed scores and each canary's participation history.

    Attributes:
        canaries: the canary clients.
        scores: ``[m]`` sums over the rounds read (``sum_r x_{r,i}``, ``x`` in units of
            ``S_r``).
        statistic: ``[m]`` the audit's test statistic ``sum over sampled rounds of
            (x_{r,i} - 1/2) / z_r^2`` (``z_r`` the round's charged multiplier): the log
            likelihood ratio of "included" for Gaussian noise of std ``z_r`` per round, so
            canaries sampled in different numbers of rounds are ranked on one scale (a plain
            sum favours the often-sampled). Any statistic of the server's view is valid for the
            one-run bound; this one is the most powerful at the claimed noise.
        histories: per canary, the charged multipliers of the rounds it was sampled in.
        rounds: the rounds read (``<= up_to_round``).
        clips: the rounds' clip norms.
    """

    canaries: CanaryClients
    scores: np.ndarray
    statistic: np.ndarray
    histories: list[list[float]]
    rounds: list[int]
    clips: list[float]


def load_client_scores(
    canary_dir: str | Path, up_to_round: int | None = None
) -> ClientCanaryRecord | None:
    """The canary clients' rounds ``< up_to_round + 1`` (all when None), or None without
    canary clients."""
    d = Path(canary_dir)
    c = CanaryClients.load(d)
    if c is None:
        return None
    total = np.zeros(len(c), dtype=np.float64)
    stat = np.zeros(len(c), dtype=np.float64)
    hist: list[list[float]] = [[] for _ in range(len(c))]
    rounds: list[int] = []
    clips: list[float] = []
    for p in sorted((d / _CLIENT_ROUNDS_DIR).glob("round_*.npz")):
        r = int(p.stem.split("_")[1])
        if up_to_round is not None and r > up_to_round:
            continue
        with np.load(p, allow_pickle=False) as z:
            s, smp = z["scores"], z["sampled"].astype(bool)
            zc, clip = float(z["charged_multiplier"]), float(z["clip"])
        if s.shape != total.shape or smp.shape != total.shape:
            raise ValueError(f"{p}: {s.shape} scores for {len(c)} canary clients (corrupt file)")
        total += s
        stat += np.where(smp, (s - 0.5) / max(zc, 1e-6) ** 2, 0.0)
        for i in np.flatnonzero(smp):
            hist[i].append(zc)
        rounds.append(r)
        clips.append(clip)
    return ClientCanaryRecord(c, total, stat, hist, rounds, clips)


class ClientCanaryRound:
    """One round of the canary clients inside a transport's aggregation (the simulation's and
    the deployed coordinator's, both through :meth:`for_round` and :meth:`release`; see
    :class:`CanaryClients`): which canaries the round samples, their summed update added where
    the clients' clipped deltas are summed (before the server divides by the number of real
    contributors), their scores read from the noised sum, and the commit under ``canaries/``.

    Args:
        canaries: the run's canary clients.
        canary_dir: ``RUN_DIR/canaries``.
        rnd: the round. rate: the round's client sampling rate (selected / num_clients).
        clip: ``S_r``. charge: the multiplier each participant of the round is charged.
        target_epsilon, delta, accountant: the real clients' ledger plan (the budget rule).
        cache: epsilon cache shared across rounds (histories -> epsilon).
    """

    def __init__(
        self,
        canaries: CanaryClients,
        canary_dir: str | Path,
        rnd: int,
        rate: float,
        clip: float,
        charge: float,
        target_epsilon: float | None,
        delta: float,
        accountant: str,
        cache: dict[tuple[float, ...], float] | None = None,
    ) -> None:
        self.canaries, self.dir, self.rnd = canaries, Path(canary_dir), int(rnd)
        self.clip, self.charge = float(clip), float(charge)
        # histories from the stored rounds before this one: a resumed run rebuilds them exactly
        past = load_client_scores(self.dir, self.rnd - 1)
        hist = past.histories if past is not None else [[] for _ in range(len(canaries))]
        ok = canaries.eligible(hist, self.charge, target_epsilon, delta, accountant, cache)
        self.sampled = canaries.sample(self.rnd, rate) & ok
        self.scores = np.zeros(len(canaries), dtype=np.float64)
        self.released = False

    @classmethod
    def for_round(
        cls,
        canaries: CanaryClients,
        canary_dir: str | Path,
        rnd: int,
        selected: int,
        num_clients: int,
        layer: Any,
        target_epsilon: float | None,
        delta: float,
        accountant: str,
        cache: dict[tuple[float, ...], float] | None = None,
    ) -> ClientCanaryRound:
        """The round's canary clients as every transport builds them (the simulation's
        in-process clients and the deployed coordinator alike): sampled at the real clients'
        rate ``selected / num_clients``, at the clip norm and charge of the DP-FedAvg layer's
        current round plan (``layer``: :class:`~securefed.privacy.client_level.ClientLevelDP`
        after ``configure_round``), under the real clients' budget rule."""
        cur = getattr(layer, "current", None)
        if cur is None:  # pragma: no cover - wiring error
            raise RuntimeError("canary clients: the DP-FedAvg layer has no round plan yet")
        return cls(
            canaries, canary_dir, rnd, selected / max(1, num_clients), cur.clip,
            cur.charged_multiplier, target_epsilon, delta, accountant, cache,
        )

    def release(
        self, total: np.ndarray, keys: Sequence[str], layout: Mapping[int, ClientUpdate]
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The protocol's packed noised sum ``total`` unpacked (:func:`unpack_sum`, ``keys``
        order, ``layout`` any member's update) with the sampled canary clients' ``S u_i`` in its
        ``delta`` block, the canaries scored on the resulting delta sum (:meth:`observe`)."""
        some = next(iter(layout.values())).vectors
        if "delta" not in some:
            raise KeyError(f"canary clients: the packed update has no 'delta' vector ({keys})")
        offset = sum(int(some[k].numel()) for k in keys[: list(keys).index("delta")])
        total = self.add_to(total, offset, int(some["delta"].numel()))
        sums, total_weight = unpack_sum(total, keys, layout)
        self.observe(sums["delta"].numpy())
        return sums, total_weight

    def add_to(self, total: np.ndarray, offset: int, length: int) -> np.ndarray:
        """``total`` (a packed protocol sum) plus the sampled included canaries' ``S u_i`` in
        the ``delta`` block ``[offset, offset + length)``."""
        out = np.array(total, dtype=np.float64, copy=True)
        out[offset : offset + length] += self.canaries.contribution(
            self.sampled, self.clip, length
        )
        return out

    def observe(self, noised_delta_sum: np.ndarray) -> None:
        """Score the sampled canaries on the released noised sum ``[D]``."""
        if self.released:
            raise RuntimeError(
                "canary clients: one round released two sums of model deltas (several upload "
                "cohorts); canary clients need the single DP-FedAvg cohort"
            )
        self.scores = self.canaries.scores(noised_delta_sum, self.sampled, self.clip)
        self.released = True

    def commit(self) -> Path:
        """Write the round (0600). A round that released nothing records no participation."""
        sampled = self.sampled if self.released else np.zeros_like(self.sampled)
        scores = self.scores if self.released else np.zeros_like(self.scores)
        return self.canaries.commit(self.dir, self.rnd, scores, sampled, self.charge, self.clip)


def discard_rounds_after(canary_dir: str | Path, rnd: int) -> list[int]:
    """Delete the stored canary rounds (gradient canaries' and canary clients') after round
    ``rnd``; returns the rounds deleted, sorted.

    A deployed run resumed from its round-``rnd`` checkpoint calls this: the rounds after it
    are lost (their sums never reached a checkpointed model), and the rounds it runs next are
    committed afresh; without the folder (no canaries) nothing is deleted."""
    gone: set[int] = set()
    d = Path(canary_dir)
    for sub, pattern in ((_ROUNDS_DIR, "round_*.npy"), (_CLIENT_ROUNDS_DIR, "round_*.npz")):
        for p in sorted((d / sub).glob(pattern)):
            r = int(p.stem.split("_")[1])
            if r > rnd:
                p.unlink()
                gone.add(r)
    return sorted(gone)
