"""Triton kernels and their launchers, one module per kernel family.

Installed as ``fastnets.kernels`` (never import a top-level ``kernels``). Importing this
package imports triton but touches no GPU. Whether the kernels are compiled for the GPU
or run by Triton's CPU interpreter is fixed when a module here is first imported, by
TRITON_INTERPRET (fastnets sets it for FASTNETS_BACKEND=interpret).
"""
