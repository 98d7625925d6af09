"""disentangle_jax: per-step text-embedding mixing for Stable Diffusion, in JAX/Flax."""
import setuptools

# Exact pins: the Flax model classes exist only in diffusers<=0.39 and transformers<=4.57.x,
# and an unpinned resolve backtracks into versions that do not build (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "diffusers==0.39.0",
    "transformers==4.57.6",  # never the [flax] extra: it pins an ancient jax
    "huggingface-hub==0.36.2",
    "tokenizers==0.22.2",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "absl-py==2.5.1",
    "ml_collections==1.1.0",
]

EXTRAS = {
    # Test-only: parity against diffusers' PyTorch classes. 2.13.0 is the CPU build;
    # any other torch spec pulls a multi-GB CUDA build.
    # pytest-xdist runs the suite on both cores of a CI machine (`pytest -n 2`).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "torch==2.13.0",
             "matplotlib==3.11.2"],
    "plots": ["matplotlib==3.11.2"],
    # Accelerator wheels for GPU/TPU hosts (never installed on the CPU dev machines).
    "cuda12": ["jax[cuda12]==0.10.2"],
    "cuda13": ["jax[cuda13]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="disentangle_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["disentangle_jax", "disentangle_jax.*"]),
    # The trained toy world (weights, configs, tokenizer) ships inside the package.
    package_data={"disentangle_jax.toy": ["weights/*", "weights/*/*", "weights/*/*/*", "inputs/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
