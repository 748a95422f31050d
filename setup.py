"""Drives CMake to build the CUDA extension `vit_kernels._C` (the pybind11 cmake_example pattern).

VIT_KERNELS_BUILD_CUDA: unset = build when nvcc is found, else install pure Python and say why;
"1" = a missing nvcc or a failed compile is an error; "0" = never build.
CMAKE_ARGS are passed through; CMAKE_BUILD_PARALLEL_LEVEL sets the compile jobs (default: all cores).
VIT_KERNELS_CUTLASS_DIR: a CUTLASS root (a folder holding include/cutlass/cutlass.h) for the sm_90a GEMMs; unset =
the nvidia-cutlass wheel's headers (a build requirement in pyproject.toml); where neither exists they are not built.
The compiler output is also written to vit_kernels/_C.build.log (tests/test_build.py reads ptxas's report there).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        mode = os.environ.get("VIT_KERNELS_BUILD_CUDA", "")
        if mode == "0":
            print("vit-kernels: VIT_KERNELS_BUILD_CUDA=0, skipping the CUDA backend (vit_kernels._C)")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError("VIT_KERNELS_BUILD_CUDA=1 but nvcc was not found (CUDA_HOME, /usr/local/cuda, PATH)")
            print("vit-kernels: nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): CUDA backend skipped, pure Python")
            return
        try:
            for ext in self.extensions:
                self.build_cmake(ext, nvcc)
        except (subprocess.CalledProcessError, OSError) as exc:
            if mode == "1":
                raise
            print(f"vit-kernels: the CUDA backend failed to build ({exc}); installed without it")

    def build_cmake(self, ext: CMakeExtension, nvcc: str):
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        cutlass = find_cutlass()
        print(f"vit-kernels: CUTLASS headers for the sm_90a GEMMs: {cutlass or 'not found, those GEMMs are skipped'}")
        origin = "VIT_KERNELS_CUTLASS_DIR" if os.environ.get("VIT_KERNELS_CUTLASS_DIR") else "nvidia-cutlass wheel"
        cmake_args += [f"-DVK_CUTLASS_DIR={cutlass or ''}", f"-DVK_CUTLASS_ORIGIN={origin}"]
        if shutil.which("ninja") or importlib_has("ninja"):
            cmake_args.append("-GNinja")
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_temp, check=True)
        # extdir is the package folder (vit_kernels/), where _C lands.
        run_logged(["cmake", "--build", ".", "--parallel", jobs], build_temp, extdir / "_C.build.log")


def run_logged(cmd: list[str], cwd: Path, log: Path) -> None:
    """Run cmd, echoing its output as it comes and keeping a copy in `log` (ptxas's warnings and spill report)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True) as proc:  # fmt: skip
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def find_cutlass() -> str | None:
    """The CUTLASS root for CMake's VK_CUTLASS_DIR: VIT_KERNELS_CUTLASS_DIR, else the nvidia-cutlass wheel's copy."""
    env = os.environ.get("VIT_KERNELS_CUTLASS_DIR")
    if env:
        if not (Path(env) / "include" / "cutlass" / "cutlass.h").is_file():
            raise RuntimeError(f"VIT_KERNELS_CUTLASS_DIR={env} holds no include/cutlass/cutlass.h")
        return str(Path(env).resolve())
    import importlib.util

    # The wheel ships the headers as data of its cutlass_library package: locate it without importing it.
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.origin:
        root = Path(spec.origin).parent / "source"
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return str(root)
    return None


def importlib_has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


setup(ext_modules=[CMakeExtension("vit_kernels._C")], cmdclass={"build_ext": CMakeBuild})
