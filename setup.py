"""Drives the CMake build of pyengine._C (CMakeLists.txt is the one description of sources).

Environment:
  PYENGINE_CUDA=0|1      force the CUDA kernels off/on (default: on when nvcc and a CUDA torch exist)
  TORCH_CUDA_ARCH_LIST   CUDA architectures, e.g. "9.0" (default) or "8.0;9.0+PTX"
  CUDA_HOME              toolkit root (default /usr/local/cuda when it exists)
  MAX_JOBS               parallel compile jobs (default: number of CPUs)
  PYENGINE_BUILD_DIR     where CMake builds (default build/<python tag>); kept between builds
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "pyengine's native build needs torch installed first "
                "(pip install torch, then pip install --no-build-isolation -e .)"
            ) from exc
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = sysconfig.get_config_var("SOABI") or "py"
        build_dir = Path(os.environ.get("PYENGINE_BUILD_DIR", ROOT / "build" / tag))
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("PYENGINE_CUDA", "AUTO").upper()
        cuda = {"0": "OFF", "FALSE": "OFF", "1": "ON", "TRUE": "ON"}.get(cuda, cuda)
        env = dict(os.environ)
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
            env["CUDA_HOME"] = "/usr/local/cuda"
        cfg = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPYENGINE_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if env.get("CUDA_HOME"):
            cfg.append(f"-DCMAKE_CUDA_COMPILER={env['CUDA_HOME']}/bin/nvcc")
        try:
            import ninja  # noqa: F401

            cfg.append("-GNinja")
            if (build_dir / "Makefile").exists():  # generator changed: start over
                import shutil

                shutil.rmtree(build_dir)
                build_dir.mkdir(parents=True)
        except ImportError:
            pass
        jobs = env.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True, env=env)


setup(ext_modules=[CMakeExtension("pyengine._C")], cmdclass={"build_ext": CMakeBuild})
