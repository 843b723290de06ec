"""Build of the sdrpn package and its compiled extension ``sdrpn._C``.

The CPU kernels are always compiled (OpenMP). The CUDA kernels are added when the installed
torch is a CUDA build and a CUDA compiler is found (``CUDA_HOME`` or ``nvcc`` on ``PATH``), or when
``FORCE_CUDA=1``; ``SDRPN_CPU_ONLY=1`` always builds the CPU kernels only. ``TORCH_CUDA_ARCH_LIST``
selects the GPU architectures, as for any torch extension.

    pip install --no-build-isolation -e .
"""

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def read_version() -> str:
    text = (ROOT / "sdrpn" / "version.py").read_text()
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("sdrpn/version.py does not define __version__")
    return match.group(1)


def build_cuda() -> bool:
    if env_flag("SDRPN_CPU_ONLY"):
        return False
    if env_flag("FORCE_CUDA"):
        return True
    import torch

    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in editable and sdist builds.
    return sorted(str(path.relative_to(ROOT)) for path in ROOT.glob(pattern))


def runtime_search_path(with_cuda: bool) -> list[str]:
    """Linker flags that let `import sdrpn._C` find torch's libraries (and the CUDA runtime the
    kernels were compiled against) even when torch has not been imported first. When it has, the
    libraries already loaded are reused."""
    if sys.platform == "win32":
        return []
    import torch

    directories = [Path(torch.__file__).resolve().parent / "lib"]
    if with_cuda and CUDA_HOME is not None:
        directories += [
            Path(CUDA_HOME) / name
            for name in ("lib64", "lib")
            if any((Path(CUDA_HOME) / name).glob("libcudart.so*"))
        ]
    return [f"-Wl,-rpath,{directory}" for directory in directories]


def extension():
    with_cuda = build_cuda()
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    files = [
        *sources("csrc/kernels/cpu/*.cpp"),
        "csrc/torch/op_checks.cpp",
        "csrc/torch/ops_cpu.cpp",
        "csrc/torch/ops_schema.cpp",
    ]
    # No -std flag: torch adds the standard its own headers need (C++17 or newer); the kernels
    # are C++17 code (CMakeLists.txt builds them as such).
    compile_args = {"cxx": ["-O3", *openmp]}
    macros = []
    if with_cuda:
        files += ["csrc/torch/ops_cuda.cpp", *sources("csrc/kernels/cuda/*.cu")]
        compile_args["nvcc"] = ["-O3"]
        macros.append(("SDRPN_WITH_CUDA", None))
    kind = CUDAExtension if with_cuda else CppExtension
    print(f"sdrpn: building the {'CPU and CUDA' if with_cuda else 'CPU'} kernels", file=sys.stderr)
    return kind(
        name="sdrpn._C",
        sources=files,
        define_macros=macros,
        extra_compile_args=compile_args,
        extra_link_args=[*openmp, *runtime_search_path(with_cuda)],
    )


setup(
    name="sdrpn",
    version=read_version(),
    description=(
        "Self-distilled RoI predictors for fine-grained perception in multimodal LLMs, "
        "with compiled CPU/CUDA post-processing kernels"
    ),
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sdrpn", "sdrpn.*"]),
    # The testbed's tiny model and RPN (what `sdrpn demo` runs) ship inside the package.
    package_data={"sdrpn.testbed": ["assets/*/*"]},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17",
        "numpy",
        "pillow",
        "safetensors",
        "scikit-image",
        "tqdm",
    ],
    # `pip install "sdrpn[lmms-eval]"`: the lmms-eval release `--model sdrpn` is tested with. lmms-eval
    # patches filelock's internals, which filelock 4 (pulled in by recent torch releases) changed.
    extras_require={"lmms-eval": ["lmms-eval==0.7.3", "filelock<4"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "console_scripts": ["sdrpn = sdrpn.cli:main"],
        "lmms_eval.models": ["sdrpn = sdrpn.integrations.lmms_eval_registration:manifest"],
    },
    zip_safe=False,
)
