"""Drop-in modules: same constructor arguments, attributes and state_dict keys as the
torch.nn classes they replace (each subclasses it), forward through fastnets.ops."""
from .norm import GroupNorm, LayerNorm, RMSNorm

__all__ = ["GroupNorm", "LayerNorm", "RMSNorm"]
