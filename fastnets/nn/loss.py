"""CrossEntropyLoss on the chunked cross-entropy kernel (subclasses torch.nn.CrossEntropyLoss)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on the chunked cross-entropy kernel. Extra keyword
    ``z_loss`` (default 0): adds ``z_loss * logsumexp(logits)^2`` per row."""

    z_loss: float = 0.0

    def __init__(self, *args, z_loss: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss = float(z_loss)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return ops.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing, z_loss=self.z_loss)
