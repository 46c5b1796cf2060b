"""Federation drivers: the in-process simulation (deployment lives in ``securefed.deploy``)."""

from securefed.federation.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_latest,
    save_checkpoint,
)
from securefed.federation.simulation import RoundRecord, SimClient, Simulation
from securefed.seeds import derive_seed

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "RoundRecord",
    "SimClient",
    "Simulation",
    "derive_seed",
    "load_latest",
    "save_checkpoint",
]
