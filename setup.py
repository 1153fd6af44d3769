"""dediffusion_jax: De-Diffusion (text as the latent of an image autoencoder) in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup


def _pins(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="dediffusion_jax",
    version="0.1.0",
    description="De-Diffusion: an autoencoder whose latent is text, in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["dediffusion_jax", "dediffusion_jax.*", "projects", "projects.*"]),
    package_data={"projects.miniworld": ["assets/**/*"]},
    install_requires=_pins("requirements.txt"),
    # "coco": the COCO caption toolkit, only for the parity tests of fewshot/cider.py
    # (tests/test_fewshot_caption.py skips them without it); a 104 MB wheel (Java jars), pure Python.
    extras_require={"dev": _pins("requirements-dev.txt"), "coco": ["pycocoevalcap==1.2"]},
)
