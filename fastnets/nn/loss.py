"""CrossEntropyLoss on the chunked cross-entropy kernel (subclasses torch.nn.CrossEntropyLoss);
ClipLoss / SigLipLoss (open_clip's call shapes) on the tiled contrastive-loss kernel."""
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


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` call shape on fastnets' tiled ``clip_loss``:
    ``loss(image_features, text_features, logit_scale)`` (logit_scale the multiplier itself).
    distributed / group: the loss across torch.distributed ranks (gather with gradient; the
    gradients averaged by DDP equal the single-process loss's on the whole batch)."""

    kind = "softmax"

    def __init__(self, *, distributed: bool = False, group=None, exchange: str = "gather"):
        super().__init__()
        self.distributed, self.group, self.exchange = distributed, group, exchange

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None) -> Tensor:
        return ops.clip_loss(image_features, text_features, logit_scale, logit_bias, kind=self.kind,
                             distributed=self.distributed, group=self.group, exchange=self.exchange)


class SigLipLoss(ClipLoss):
    """open_clip's ``SigLipLoss`` call shape: ``loss(image_features, text_features, logit_scale,
    logit_bias)``; exchange="neighbour" is SigLIP's ring across ranks."""

    kind = "sigmoid"
