"""Client-side local training and the model <-> vector hand-off."""

from securefed.client.trainer import LocalResult, LocalTrainer, local_steps_for, make_optimizer
from securefed.diffusion.params import get_flat, num_params, param_slices, set_flat

__all__ = [
    "LocalResult",
    "LocalTrainer",
    "get_flat",
    "local_steps_for",
    "make_optimizer",
    "num_params",
    "param_slices",
    "set_flat",
]
