"""Build and install SRv6Pipes.

The package lives in the folder ``pipes/`` but is installed under the import name
``srv6pipes``: Python 3.11's standard library already has a module called ``pipes``.
Every ``cext/NAME.pyx`` is compiled by Cython into the extension ``srv6pipes._NAME``,
so a fresh clone builds with one command (``pip install -e .``).
"""
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - only hit on a machine without Cython
    raise SystemExit("Cython is needed to build SRv6Pipes: pip install cython") from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def cython_extensions():
    extensions = []
    for source in sorted(glob.glob(os.path.join("cext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(source))[0]
        extensions.append(
            Extension(
                f"srv6pipes._{name}",
                [source],
                include_dirs=["cext"],
                extra_compile_args=["-O3", "-Wno-unused-function"],
            )
        )
    return cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
        include_path=["cext"],
    )


class build_py_with_kernel(build_py):
    """Ships kernel/*.in (nftables templates) inside the package as srv6pipes/kernel/,
    so an installed pipesd finds them without the source tree."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "srv6pipes", "kernel")
        os.makedirs(target, exist_ok=True)
        for template in glob.glob(os.path.join(HERE, "kernel", "*.in")):
            self.copy_file(template, os.path.join(target, os.path.basename(template)))


setup(
    name="srv6pipes",
    cmdclass={"build_py": build_py_with_kernel},
    version="0.1.0",
    description="In-network bytestream functions steered by IPv6 Segment Routing",
    packages=["srv6pipes"],
    package_dir={"srv6pipes": "pipes"},
    ext_modules=cython_extensions(),
    python_requires=">=3.11",
    install_requires=[
        "python-prctl",
        "posix_ipc",
        "NetfilterQueue",
        "pyroute2",
        "cryptography",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-timeout", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "pipesd=srv6pipes.cli:pipesd_main",
            "pipesctl=srv6pipes.cli:pipesctl_main",
        ]
    },
)
