"""Integrations with other libraries, as swap rules. Importing them registers their rules
in fastnets.swap and imports none of the libraries (each imports its library when a rule
matches one of its modules, or when its functions are called)."""
from . import transformers  # noqa: F401
from . import diffusers  # noqa: F401,E402
