"""Packaging for minaction.

The repository keeps its kernels where a reader expects them -- Triton kernels in
``kernels/`` and C++/CUDA sources in ``csrc/`` -- and ships them inside the package
as ``minaction.kernels`` and ``minaction._csrc``. Nothing is compiled at install
time: the C++ (and, on a CUDA torch, the CUDA) extension is built with ninja on
first use and cached (see ``minaction/backends/cpu.py``), so installing never needs
a particular torch build.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["minaction", "minaction.*"]) + ["minaction.kernels", "minaction._csrc"],
    package_dir={"minaction.kernels": "kernels", "minaction._csrc": "csrc"},
    package_data={
        "minaction._csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"],
        "minaction": ["study/presets/*.toml"],
    },
    include_package_data=True,
)
