"""Reading a finished test run's checkpoint back as plain tensors."""

from __future__ import annotations

import torch


def final_params(run_dir, step: int = 5) -> dict[str, torch.Tensor]:
    """The model state of ``run_dir``'s checkpoint at ``step``, gathered into one process (DCP -> torch.save)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = f"{run_dir}/final.pt"
    dcp_to_torch_save(f"{run_dir}/checkpoints/step_{step:06d}", out)
    return torch.load(out, weights_only=False)["model"]
