"""Build entry point. `pip install .` builds nothing: the package is pure Python.

The optional CUDA extension (csrc/) will be opt-in through an environment variable, so that a plain
install never needs nvcc or a CUDA build of torch.
"""

from setuptools import setup

setup()
