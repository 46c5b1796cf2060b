"""Run-directory artefacts, the lowest layer with torch: the run directory's layout and released
parameters (:mod:`.rundir`), checksummed checkpoints (:mod:`.checkpoint`) and sample grids
(:mod:`.grid`)."""

from securefed.artefacts.checkpoint import Checkpoint, CheckpointError, load_latest, save_checkpoint
from securefed.artefacts.grid import save_grid, to_grid_image
from securefed.artefacts.rundir import RunDir, released_params

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "RunDir",
    "load_latest",
    "released_params",
    "save_checkpoint",
    "save_grid",
    "to_grid_image",
]
