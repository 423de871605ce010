"""One AdamW and one cosine schedule per layer, driven as if they were one optimizer.

Layer-local learning gives every layer its own loss, so every layer gets its own
optimizer too: no optimizer state or step count is shared between layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LayerOptimizers:
    """AdamW + CosineAnnealingLR for each parameter group (a layer, or the readout)."""

    def __init__(
        self,
        layers: list[nn.Module],
        lr: float,
        weight_decay: float,
        total_steps: int,
    ):
        self.optimizers = [
            torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
            for layer in layers
        ]
        self.schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
            for opt in self.optimizers
        ]

    @property
    def param_groups(self) -> list[dict]:
        """The first layer's groups: every layer follows the same schedule."""
        return self.optimizers[0].param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        return {str(i): opt.state_dict() for i, opt in enumerate(self.optimizers)}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state) != [str(i) for i in range(len(self.optimizers))]:
            raise ValueError(
                f"optimizer state contains {len(state)} layers, this arm has "
                f"{len(self.optimizers)}: the checkpoint is from another arm layout"
            )
        for i, opt in enumerate(self.optimizers):
            opt.load_state_dict(state[str(i)])


class LayerSchedulers:
    """Step every layer's cosine schedule together."""

    def __init__(self, optimizers: LayerOptimizers):
        self.schedulers = optimizers.schedulers

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {str(i): s.state_dict() for i, s in enumerate(self.schedulers)}

    def load_state_dict(self, state: dict) -> None:
        for i, scheduler in enumerate(self.schedulers):
            scheduler.load_state_dict(state[str(i)])
