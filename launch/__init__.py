"""The command-line programs (flag handling only; the work is in disentangle_jax).

Importing any of them first quiets diffusers'/transformers' logging, before either is imported.
"""
import os

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
