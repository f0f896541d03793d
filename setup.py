"""imaml_fast: fast, batched implicit-gradient meta-learning (iMAML) for PyTorch."""
from setuptools import find_packages, setup

setup(
    name="imaml_fast",
    version="0.1.0",
    description="Batched iMAML meta-gradients: many tasks at once, masked batched CG, kernel backends",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # kernels/ (Triton) sits at the top level beside csrc/ and installs as imaml_fast.kernels.
    packages=find_packages(include=["imaml_fast", "imaml_fast.*"]) + ["imaml_fast.kernels"],
    package_dir={"imaml_fast.kernels": "kernels"},
    # A range that the CPU build 2.13 satisfies; torch.func and materialize_grads need >= 2.1.
    install_requires=["torch>=2.1,<2.15", "numpy>=1.22"],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.0"],
                    "triton": ["triton>=3.0"]},
)
