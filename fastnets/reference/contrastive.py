"""CLIP / SigLIP losses in torch ops, materialising the (N x N) logits (open_clip's ClipLoss /
SigLipLoss formulas), float32 math (float64 for float64 features)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None, kind: str = "softmax"
              ) -> Tensor:
    """softmax: mean of the image->text and text->image cross-entropies against the diagonal.
    sigmoid: -sum(logsigmoid(labels * (scale * I Tᵀ + bias))) / N, labels +1 on the diagonal,
    -1 elsewhere. Returned in the features' dtype."""
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    i, t = image_features.to(acc), text_features.to(acc)
    logits = torch.as_tensor(logit_scale).to(acc) * i @ t.T
    if logit_bias is not None:
        logits = logits + torch.as_tensor(logit_bias).to(acc)
    n = logits.shape[0]
    if kind == "softmax":
        labels = torch.arange(n, device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        labels = 2 * torch.eye(n, device=logits.device, dtype=acc) - 1
        loss = -F.logsigmoid(labels * logits).sum() / n
    return loss.to(image_features.dtype)


def zero_shot_logits(image_features: Tensor, classifier: Tensor, logit_scale, normalize: bool = True) -> Tensor:
    """scale * normalize(image_features) @ classifier, float32 math, in the features' dtype."""
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    f = image_features.to(acc)
    if normalize:
        f = F.normalize(f, dim=-1)
    return (torch.as_tensor(logit_scale).to(acc) * f @ classifier.to(acc)).to(image_features.dtype)
