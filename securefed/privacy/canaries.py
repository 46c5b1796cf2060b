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
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import nn

from securefed.io import atomic_write_bytes, atomic_write_json
from securefed.privacy.secure_noise import derive_key

__all__ = [
    "CANARY_KEY_FILENAME",
    "ClientCanaries",
    "GradientCanaries",
    "canary_uniforms",
    "load_gradient_scores",
]

CANARY_KEY_FILENAME = "canary.key"
_ROUNDS_DIR = "gradient_rounds"
_PURPOSE_DRAW, _PURPOSE_SAMPLE = 1, 2


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
        d = Path(canary_dir)
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        atomic_write_bytes(d / CANARY_KEY_FILENAME, self.key, mode=0o600)
        buf = io.BytesIO()
        np.savez(
            buf,
            param_index=self.param_index,
            offset=self.offset,
            signs=self.signs,
            included=self.included,
            clients=self.clients,
        )
        atomic_write_bytes(d / "gradient.npz", buf.getvalue(), mode=0o600)
        atomic_write_json(
            d / "gradient.json",
            {
                "m": len(self),
                "included": int(self.included.sum()),
                "clip": float(clip),
                "kind": "dirac gradient canaries (white-box, record-level DP-SGD)",
                "note": "audit-only secrets: never release with the model",
            },
            mode=0o600,
        )
        return d

    @classmethod
    def load(cls, canary_dir: str | Path) -> GradientCanaries | None:
        d = Path(canary_dir)
        if not (d / "gradient.npz").exists():
            return None
        key = (d / CANARY_KEY_FILENAME).read_bytes()
        with np.load(d / "gradient.npz", allow_pickle=False) as z:
            arrs = {k: z[k] for k in z.files}
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
        sel = np.flatnonzero(self.clients == cid)
        return ClientCanaries(self, sel, rnd, cid, model, sample_rate, clip)

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
    gradient along each of the client's canaries); :attr:`scores` holds their sums."""

    def __init__(
        self,
        canaries: GradientCanaries,
        selected: np.ndarray,
        rnd: int,
        cid: int,
        model: nn.Module,
        sample_rate: float,
        clip: float,
    ) -> None:
        self.canaries = canaries
        self.selected = selected
        self.q = float(sample_rate)
        self.clip = float(clip)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pidx = canaries.param_index[selected]
        self.off = torch.as_tensor(canaries.offset[selected])
        self.sign = canaries.signs[selected]
        self.inc = canaries.included[selected]
        self.scores = np.zeros(selected.size, dtype=np.float64)
        self.sampled = np.zeros(selected.size, dtype=np.int64)
        self._key = derive_key(canaries.key, _PURPOSE_SAMPLE, rnd, cid)
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
