"""Build entry point. `pip install .` builds nothing but the pure-Python package (no nvcc needed).

`FASTLORA_BUILD_CUDA=1 pip install .` also builds the optional CUDA extension (csrc/) with nvcc, pybind11
and ninja (fastlora/cuda_build.py: sm_80 and sm_90 machine code plus PTX) into fastlora/_fastlora_cuda.
Either way csrc/ ships inside the package (fastlora/_csrc), so `python -m fastlora build-cuda` can build it
just in time later.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _cuda_build():
    """fastlora/cuda_build.py loaded from its file: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("fastlora_cuda_build", ROOT / "fastlora" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class BuildPy(build_py):
    """Copies csrc/ into the built package as fastlora/_csrc, for just-in-time builds after installing."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastlora" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / "csrc").iterdir():
            if source.is_file():
                shutil.copy2(source, target / source.name)


class BuildCuda(build_ext):
    """Builds the extension with ninja (not setuptools' compiler classes, which know no nvcc)."""

    def build_extension(self, ext):
        built = _cuda_build().build(Path(self.build_temp).resolve() / "cuda", verbose=bool(self.verbose))
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built.module, target)


ext_modules = []
if os.environ.get("FASTLORA_BUILD_CUDA") == "1":
    ext_modules.append(Extension("fastlora._fastlora_cuda", sources=[]))

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy, "build_ext": BuildCuda})
