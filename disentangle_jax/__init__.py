"""disentangle_jax: per-step text-embedding mixing for Stable Diffusion v1.x in JAX/Flax.

Reimplements "Uncovering the Disentanglement Capability in Text-to-Image Diffusion Models"
(Wu et al., CVPR 2023). See README.md for the map of modules.
"""
__version__ = "0.1.0"
