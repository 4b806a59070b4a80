"""nashkern: fused vocabulary ops and trainers for online preference optimisation.

The Triton kernels live in the top-level ``kernels/`` folder and install as ``nashkern.kernels``;
the optional CUDA extension (``csrc/``) installs as ``nashkern._C``.
"""
from setuptools import setup

setup(
    name="nashkern",
    version="0.1.0",
    description="Streaming log-prob / entropy / KL / geometric-mixture kernels and Nash-MD trainers",
    python_requires=">=3.9",
    packages=["nashkern", "nashkern.backends", "nashkern.kernels"],
    package_dir={"nashkern": "nashkern", "nashkern.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    entry_points={"console_scripts": ["nashkern=nashkern.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist"],
    },
)
