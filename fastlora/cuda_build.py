"""Building the CUDA extension (``csrc/``) with nvcc, pybind11 and ninja. Imports nothing of torch, so that
``setup.py`` can use it (``FASTLORA_BUILD_CUDA=1 pip install .``) as well as ``fastlora.cuda_ext.build``.

Two products, each from one ninja file:
- ``_fastlora_cuda<EXT_SUFFIX>``: the pybind11 module over the CUDA runtime (linked statically, so only the
  driver is needed where it runs), machine code for sm_80 and sm_90 plus PTX for newer GPUs; ptxas's
  report of every kernel (registers, spills, stack, shared memory) is kept beside it in ``ptxas.log``;
- ``libfastlora_replay.so``: the kernel's arithmetic (csrc/lora_decode_math.h) compiled for the host, which
  the tests load with ctypes to replay the kernel on a CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["ARCHS", "BuildError", "build", "build_replay", "cache_dir", "csrc_dir", "find_nvcc", "parse_ptxas"]

# Machine code for these compute capabilities, PTX for the last one (newer GPUs compile it when loading).
ARCHS = ("80", "90")
_SOURCES = ("lora_decode.cu", "bindings.cpp")
_HEADERS = ("lora_decode.h", "lora_decode_math.h")
MODULE = "_fastlora_cuda"


class BuildError(RuntimeError):
    """The extension could not be built: the message says what is missing or which command failed."""


def csrc_dir() -> Path:
    """The CUDA sources: ``fastlora/_csrc`` in an installed package, ``csrc/`` beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "lora_decode.cu").is_file():
            return candidate
    raise BuildError(f"the CUDA sources are not installed (looked in {here / '_csrc'} and {here.parent / 'csrc'})")


def find_nvcc() -> Path:
    """nvcc from $CUDA_HOME (or $CUDA_PATH), else from PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    if Path("/usr/local/cuda/bin/nvcc").is_file():
        return Path("/usr/local/cuda/bin/nvcc")
    raise BuildError("nvcc not found: install the CUDA toolkit, or set CUDA_HOME to it")


def _cuda_root(nvcc: Path) -> Path:
    """The toolkit holding nvcc: where include/cuda_runtime.h and the static runtime are."""
    for root in (nvcc.resolve().parent.parent, nvcc.parent.parent, Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime.h").is_file():
            return root
    raise BuildError(f"no include/cuda_runtime.h beside {nvcc}: set CUDA_HOME to the toolkit")


def _ninja() -> str:
    try:
        import ninja  # the pip package ships the binary

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if found is None:
        raise BuildError("ninja not found: pip install ninja")
    return found


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError:
        raise BuildError("pybind11 not found: pip install pybind11") from None
    return pybind11.get_include()


def _cxx() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise BuildError("no C++ compiler found (set CXX)")


def _nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def _source_hash(src: Path, *extra: str) -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS, "replay.cpp"):
        digest.update((src / name).read_bytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where just-in-time builds go: $FASTLORA_CACHE_DIR, else ~/.cache/fastlora (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("FASTLORA_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlora"


def _run_ninja(build_dir: Path, text: str, verbose: bool) -> None:
    (build_dir / "build.ninja").write_text(text)
    command = [_ninja(), "-C", str(build_dir)] + (["-v"] if verbose else [])
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if verbose:
        print(result.stdout, end="", file=sys.stderr)
    if result.returncode != 0:
        raise BuildError(f"building in {build_dir} failed:\n{result.stdout[-6000:]}{result.stderr[-2000:]}")


@dataclasses.dataclass(frozen=True)
class Built:
    """A finished build: the module's path, ptxas's report, the directory."""

    module: Path
    ptxas_log: Path
    directory: Path
    archs: tuple[str, ...]


def build(directory: Path | str | None = None, archs: tuple[str, ...] = ARCHS, verbose: bool = False) -> Built:
    """Build ``_fastlora_cuda`` into ``directory`` (default: a folder of ``cache_dir()`` named by a hash of
    the sources, nvcc's version, the Python ABI and ``archs``; an up-to-date build is reused: ninja rebuilds
    only what changed). Raises BuildError saying what is missing (nvcc, ninja, pybind11, a compiler) or
    which command failed."""
    archs = tuple(str(a) for a in archs)
    if not archs or not all(a.isdigit() for a in archs):
        raise BuildError(f"archs: expected compute capabilities such as ('80', '90'), got {archs!r}")
    src = csrc_dir()
    nvcc = find_nvcc()
    root = _cuda_root(nvcc)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    if directory is None:
        key = _source_hash(src, _nvcc_version(nvcc), suffix, ",".join(archs))
        directory = cache_dir() / f"cuda-{key}"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in archs)
    gencode += f" -gencode arch=compute_{archs[-1]},code=compute_{archs[-1]}"
    python_include = sysconfig.get_paths()["include"]
    arch_list = ",".join(f"sm_{a}" for a in archs) + f",compute_{archs[-1]}"
    text = f"""# generated by fastlora/cuda_build.py
nvcc = {nvcc}
cxx = {_cxx()}
src = {src}
rule nvcc
  command = $nvcc -std=c++17 -O3 --threads 0 -Xcompiler -fPIC {gencode} -Xptxas -v -I$src -c $in -o $out 2> $out.ptxas.log || (cat $out.ptxas.log; exit 1)
  description = nvcc $in
rule cxx
  command = $cxx -std=c++17 -O2 -fPIC -fvisibility=hidden -DFASTLORA_ARCHS='"{arch_list}"' -I$src -I{root / "include"} -I{_pybind11_include()} -I{python_include} -c $in -o $out
  description = c++ $in
rule link
  command = $cxx -shared -o $out $in -L{root / "lib64"} -L{root / "lib"} -lcudart_static -ldl -lpthread -lrt
  description = link $out
build lora_decode.o: nvcc $src/lora_decode.cu | $src/lora_decode.h $src/lora_decode_math.h
build bindings.o: cxx $src/bindings.cpp | $src/lora_decode.h $src/lora_decode_math.h
build {MODULE}{suffix}: link bindings.o lora_decode.o
"""
    _run_ninja(directory, text, verbose)
    return Built(directory / f"{MODULE}{suffix}", directory / "lora_decode.o.ptxas.log", directory, archs)


def build_replay(directory: Path | str | None = None, verbose: bool = False) -> Path:
    """Build ``libfastlora_replay.so`` (the kernel's arithmetic for the host; a C++ compiler is all it needs)
    and return its path."""
    src = csrc_dir()
    if directory is None:
        directory = cache_dir() / f"replay-{_source_hash(src)}"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = f"""# generated by fastlora/cuda_build.py
rule cxx_shared
  command = {_cxx()} -std=c++17 -O2 -fPIC -shared -I{src} $in -o $out
  description = c++ $in
build libfastlora_replay.so: cxx_shared {src}/replay.cpp | {src}/lora_decode_math.h
"""
    _run_ninja(directory, text, verbose)
    return directory / "libfastlora_replay.so"


_FUNCTION = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_NUMBERS = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(text: str) -> list[dict]:
    """ptxas -v's report as one dict per (kernel, arch): kernel (mangled name), arch, registers, stack,
    spill_stores, spill_loads, shared (bytes of static shared memory; 0 when not reported)."""
    entries: list[dict] = []
    for line in text.splitlines():
        match = _FUNCTION.search(line)
        if match:
            entries.append({"kernel": match.group(1), "arch": match.group(2), "registers": None, "stack": 0,
                            "spill_stores": 0, "spill_loads": 0, "shared": 0})  # fmt: skip
            continue
        if not entries:
            continue
        for key, pattern in _NUMBERS.items():
            found = pattern.search(line)
            if found:
                entries[-1][key] = int(found.group(1))
    return entries
