"""FedDDPM+ (Peng et al. 2025; abstract only): calibrate only when learning slows down.

After every aggregation the server measures the global model's DDPM loss on a held-out slice of
the auxiliary set (fixed noise). :class:`SlowLearningDetector` fires when the relative
improvement over the last ``window`` rounds falls below ``threshold``; the server then runs ONE
calibration of ``correction_steps`` (at most ``max_corrections`` times; 1 = the paper's one-shot
correction) and otherwise none. Every decision (when, why, the improvement measured) goes to
``metrics.jsonl``, with the server steps saved against FedDDPM (``calibration_steps`` per round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from securefed.config import FedDDPMConfig
from securefed.strategies.base import Strategy
from securefed.strategies.fedddpm import FedDDPM, ServerCalibrator

__all__ = ["DetectorDecision", "FedDDPMPlus", "SlowLearningDetector", "relative_improvement"]

log = logging.getLogger(__name__)


def relative_improvement(before: float, after: float) -> float:
    """``(before - after) / |before|``: the fraction by which a loss dropped (negative if it
    rose). ``before == 0`` gives 0 (nothing left to improve)."""
    if not (math.isfinite(before) and math.isfinite(after)):
        raise ValueError(f"losses must be finite, got before={before}, after={after}")
    return 0.0 if before == 0 else (before - after) / abs(before)


@dataclass(frozen=True)
class DetectorDecision:
    """What the detector concluded after one observed loss.

    Attributes:
        fire: correct now.
        improvement: relative improvement over the window (None until the window is full).
        reason: a human-readable explanation (logged and written to metrics.jsonl).
    """

    fire: bool
    improvement: float | None
    reason: str


@dataclass
class SlowLearningDetector:
    """Pure slow-learning detector driven by a sequence of losses (one per round).

    With losses ``L_1..L_t`` observed since the last correction, it fires at ``t`` when
    ``t > window`` and ``(L_{t-window} - L_t) / |L_{t-window}| < threshold``, provided fewer
    than ``max_corrections`` corrections were made. After a firing the history restarts, so the
    next decision needs ``window + 1`` fresh losses.
    """

    window: int
    threshold: float
    max_corrections: int = 1
    history: list[float] = field(default_factory=list)
    corrections: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"fedddpm.detector_window: must be >= 1, got {self.window}")
        if self.threshold < 0:
            raise ValueError(f"fedddpm.detector_threshold: must be >= 0, got {self.threshold}")

    def observe(self, loss: float) -> DetectorDecision:
        """Record ``loss`` and decide."""
        if not math.isfinite(loss):
            raise ValueError(f"loss must be finite, got {loss}")
        self.history.append(float(loss))
        if self.corrections >= self.max_corrections:
            return DetectorDecision(False, None, f"{self.corrections} correction(s) made: done")
        if len(self.history) <= self.window:
            return DetectorDecision(
                False, None, f"window filling ({len(self.history)}/{self.window + 1} losses)"
            )
        before, after = self.history[-1 - self.window], self.history[-1]
        imp = relative_improvement(before, after)
        if imp < self.threshold:
            self.corrections += 1
            self.history = []
            return DetectorDecision(
                True,
                imp,
                f"aux-holdout loss improved {imp:.2%} over {self.window} rounds "
                f"({before:.5f} -> {after:.5f}) < threshold {self.threshold:.2%}",
            )
        return DetectorDecision(
            False, imp, f"improving: {imp:.2%} over {self.window} rounds >= {self.threshold:.2%}"
        )

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "history": torch.tensor(self.history, dtype=torch.float64),
            "corrections": torch.tensor(self.corrections),
        }

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.history = [float(x) for x in state["history"].tolist()]
        self.corrections = int(state["corrections"])


def drive(detector: SlowLearningDetector, losses: Sequence[float]) -> list[DetectorDecision]:
    """Feed a loss sequence; the decisions in order (for tests and what-if analyses)."""
    return [detector.observe(x) for x in losses]


class FedDDPMPlus(FedDDPM):
    """FedDDPM with detector-triggered one-shot correction instead of per-round calibration."""

    name = "fedddpm_plus"

    def __init__(
        self,
        base: Strategy,
        cfg: FedDDPMConfig,
        calibrator: ServerCalibrator,
        detector: SlowLearningDetector | None = None,
        client_examples_per_round: int | None = None,
    ) -> None:
        super().__init__(base, cfg, calibrator, client_examples_per_round)
        self.detector = detector or SlowLearningDetector(
            cfg.detector_window, cfg.detector_threshold, cfg.max_corrections
        )
        self.rounds_seen = 0

    def after_aggregation(self, rnd: int, new: torch.Tensor) -> torch.Tensor:
        self.rounds_seen += 1
        self.rounds_aggregated += 1
        loss = self.calibrator.holdout_loss(new.to(torch.float32))
        dec = self.detector.observe(loss)
        info: dict[str, object] = {
            "aux_holdout_loss": round(loss, 6),
            "detector": {"fired": dec.fire, "improvement": dec.improvement, "reason": dec.reason},
        }
        out = new
        steps, secs = 0, 0.0
        if dec.fire:
            res = self.calibrator.calibrate(
                new.to(torch.float32), self.fd.correction_steps, rnd, use_all=False
            )
            out = self._commit(new, res)
            steps, secs = res.steps, res.seconds
            info["corrected"] = dec.reason
            info["calibration_loss"] = round(res.mean_loss, 6)
            log.info("round %d: FedDDPM+ correction of %d steps: %s", rnd, steps, dec.reason)
        info.update(
            server_steps=steps,
            server_seconds=round(secs, 4),
            server_steps_saved_vs_fedddpm=self.rounds_seen * self.steps_per_round
            - self.server_steps_total,
        )
        self._last = info
        return out

    def own_state(self) -> dict[str, torch.Tensor]:
        out = super().own_state()
        for k, v in self.detector.state().items():
            out[f"detector.{k}"] = v
        out["rounds_seen"] = torch.tensor(self.rounds_seen)
        return out

    def load_own_state(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load_own_state(state)
        pre = "detector."
        det = {k[len(pre):]: v for k, v in state.items() if k.startswith(pre)}
        if det:
            self.detector.load(det)
            self.rounds_seen = int(state["rounds_seen"])
