"""Model <-> flat parameter vector, the unit every strategy and protocol works on.

The UNet has no buffers, so its state is exactly its parameters in ``named_parameters`` order.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["get_flat", "num_params", "param_slices", "set_flat"]


def num_params(model: nn.Module) -> int:
    """Total number of scalar parameters D."""
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> torch.Tensor:
    """A detached copy of all parameters as one ``[D]`` float32 CPU vector."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in model.parameters()])


def set_flat(model: nn.Module, vec: torch.Tensor) -> None:
    """Copy a ``[D]`` vector into the model's parameters (in ``named_parameters`` order)."""
    expected = num_params(model)
    if vec.ndim != 1 or vec.numel() != expected:
        raise ValueError(
            f"parameter vector has shape {tuple(vec.shape)}, the model needs [{expected}]"
        )
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(vec[offset : offset + n].view_as(p).to(p.device, p.dtype))
            offset += n


def param_slices(model: nn.Module) -> dict[str, slice]:
    """Parameter name -> its slice of the flat vector."""
    out: dict[str, slice] = {}
    offset = 0
    for name, p in model.named_parameters():
        out[name] = slice(offset, offset + p.numel())
        offset += p.numel()
    return out
