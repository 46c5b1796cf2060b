"""``RunDir``: the one owner of a run directory's layout and of what it releases.

Every module that reads or writes a run directory asks a :class:`RunDir` for the path; no
other module spells a file name of the run directory. The layout::

    <run>/config.yaml            resolved config (every default written out)
          metrics.jsonl          one RoundRecord per round (securefed.federation.record)
          label_histogram.json   per-client label counts of the partition (public)
          model.json             parameter count, parameter groups, image shape
          privacy_ledger.json    the per-client privacy ledger (DP runs)
          secrets/dp_noise.key   the run's secret noise key (0600; never released)
          checkpoints/           round_XXXX.pt + latest.json (checksummed)
          samples/               round_XXXX.png grids, holdout.png
          auxiliary/             FedDDPM auxiliary set (what the server saw)
          received/              FedDDPM model uploads the server received individually (0600)
          canaries/              audit-only canary secrets and scores (0600)
          public_pretrain.json   public pre-training facts
          stopped.json           why a run stopped early (exhausted budgets)
          report.md + *.png      the run report (securefed.report)
          audit/                 the privacy audit (securefed audit)
          status.json, sites.json  deployment: the coordinator's live status and its sites

The released model of a run is decided here once (:meth:`RunDir.released_params`): the
strategy's EMA when it keeps one, else the global model. ``securefed sample``, the audit and
the report all release that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from securefed.artefacts.checkpoint import Checkpoint
from securefed.artefacts.grid import save_grid

__all__ = ["LEDGER_FILE", "NOISE_KEY_FILE", "SECRETS_DIR", "RunDir", "released_params"]

#: the privacy ledger (a run directory, or a deployed site's state folder)
LEDGER_FILE = "privacy_ledger.json"
#: the run's secret DP noise key (0600; never released), inside SECRETS_DIR
NOISE_KEY_FILE = "dp_noise.key"
#: the folder (0700) of a run's or a site's secrets
SECRETS_DIR = "secrets"


def released_params(ckpt: Checkpoint) -> torch.Tensor:
    """``[D]`` float32: the parameters a run releases at a checkpoint: what the strategy
    evaluates (its ``eval_params``: the EMA when kept), recorded by the round engine in the
    checkpoint, else the global model."""
    chosen = ckpt.released if ckpt.released is not None else ckpt.global_params
    return chosen.detach().to(torch.float32)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created until a writer creates it)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------------ files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def label_histogram(self) -> Path:
        return self.root / "label_histogram.json"

    @property
    def model_info(self) -> Path:
        return self.root / "model.json"

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER_FILE

    @property
    def secrets(self) -> Path:
        return self.root / SECRETS_DIR

    @property
    def noise_key(self) -> Path:
        return self.secrets / NOISE_KEY_FILE

    @property
    def public_pretrain(self) -> Path:
        return self.root / "public_pretrain.json"

    @property
    def stopped(self) -> Path:
        return self.root / "stopped.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def sites(self) -> Path:
        return self.root / "sites.json"

    # ------------------------------------------------------------------ folders
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def auxiliary(self) -> Path:
        return self.root / "auxiliary"

    @property
    def received(self) -> Path:
        return self.root / "received"

    @property
    def canaries(self) -> Path:
        return self.root / "canaries"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    @property
    def audit_json(self) -> Path:
        """``audit/report.json``: everything ``securefed audit`` found (the report renders it)."""
        return self.audit / "report.json"

    @property
    def audit_markdown(self) -> Path:
        return self.audit / "report.md"

    def sample_grid(self, rnd: int) -> Path:
        """``samples/round_XXXX.png`` of round ``rnd`` (0: before federated training)."""
        return self.samples / f"round_{rnd:04d}.png"

    @property
    def holdout_grid(self) -> Path:
        """``samples/holdout.png``: real holdout images beside the generated grids."""
        return self.samples / "holdout.png"

    def received_upload(self, cid: int) -> Path:
        """``received/client_<cid>.pt``: an individual upload the server received."""
        return self.received / f"client_{cid}.pt"

    # ------------------------------------------------------------------ writing
    def save_sample_grid(self, rnd: int, images: torch.Tensor) -> Path:
        """Write ``[N, C, H, W]`` images in ``[-1, 1]`` as ``samples/round_XXXX.png``."""
        return save_grid(images, self.sample_grid(rnd))

    def save_holdout_grid(self, images: torch.Tensor) -> Path:
        """Write real holdout images as ``samples/holdout.png`` (the report's first screen)."""
        return save_grid(images, self.holdout_grid)

    # ------------------------------------------------------------------ checks
    def is_run(self) -> bool:
        """True when this is a securefed run directory (it has a ``config.yaml``)."""
        return self.config.is_file()

    def require_run(self) -> None:
        """Raise FileNotFoundError (naming the folder) unless this is a run directory."""
        if not self.is_run():
            raise FileNotFoundError(
                f"{self.root} has no config.yaml: it is not a securefed run directory"
            )

    def is_new(self) -> bool:
        """True when the folder does not exist or is empty."""
        return not self.root.exists() or not any(self.root.iterdir())
