"""Build and install SRv6Pipes.

The package lives in the folder ``pipes/`` but is installed under the import name
``srv6pipes``: Python 3.11's standard library already has a module called ``pipes``.
Every ``cext/NAME.pyx`` is compiled by Cython into the extension ``srv6pipes._NAME``,
so a fresh clone builds with one command (``pip install -e .``); the package metadata is in
pyproject.toml. The example C VF modules
``cext/examples/NAME.c`` become plain shared objects ``srv6pipes/modules/NAME.so``.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - only hit on a machine without Cython
    raise SystemExit("Cython is needed to build SRv6Pipes: pip install cython") from exc

HERE = os.path.dirname(os.path.abspath(__file__))

# Libraries an extension links besides libpython, by its .pyx name: _vf has the zlib of
# compress/decompress and the dlopen of the module loader (in libdl before glibc 2.34).
LIBRARIES = {"vf": ["z", "dl"]}


def cython_extensions():
    extensions = []
    for source in sorted(glob.glob(os.path.join("cext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(source))[0]
        extensions.append(
            Extension(
                f"srv6pipes._{name}",
                [source],
                include_dirs=["cext"],
                libraries=LIBRARIES.get(name, []),
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
    so an installed pipesd finds them without the source tree, and the C module header
    cext/srv6pipes_vf.h as srv6pipes/include/ (vfapi.include_dir, `pipesctl module-cflags`)."""

    def run(self):
        super().run()
        for folder, pattern in (("kernel", os.path.join("kernel", "*.in")),
                                ("include", os.path.join("cext", "srv6pipes_vf.h"))):
            target = os.path.join(self.build_lib, "srv6pipes", folder)
            os.makedirs(target, exist_ok=True)
            for source in glob.glob(os.path.join(HERE, pattern)):
                self.copy_file(source, os.path.join(target, os.path.basename(source)))


def build_bpf_programs(target_dirs):
    """kernel/NAME.bpf.c -> NAME.bpf.o (clang -target bpf) in each of target_dirs. Without
    clang the programs are skipped with a warning: pipesd then runs without them (see
    pipes/cookies.py)."""
    sources = sorted(glob.glob(os.path.join(HERE, "kernel", "*.bpf.c")))
    clang = shutil.which("clang") or shutil.which("clang-14")
    if not sources:
        return
    if clang is None:
        print("warning: clang not found: the BPF programs (SYN-cookie interception) are not built")
        return
    multiarch = sysconfig.get_config_var("MULTIARCH") or subprocess.run(
        ["gcc", "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    for source in sources:
        name = os.path.basename(source)[:-2] + ".o"
        first = os.path.join(target_dirs[0], name)
        os.makedirs(target_dirs[0], exist_ok=True)
        subprocess.run([clang, "-O2", "-target", "bpf", f"-I/usr/include/{multiarch}",
                        "-c", source, "-o", first], check=True)
        for other in target_dirs[1:]:
            shutil.copy(first, os.path.join(other, name))


class build_ext_with_vf_modules(build_ext):
    """Also builds cext/examples/NAME.c into srv6pipes/modules/NAME.so. A VF module is
    dlopen()ed by path, not imported, so it is a plain shared object without the Python
    extension suffix. Editable installs (inplace) get a copy next to the sources. And the
    BPF programs of kernel/ (build_bpf_programs), into srv6pipes/kernel/ (and kernel/)."""

    def run(self):
        super().run()
        targets = [os.path.join(self.build_lib, "srv6pipes", "kernel")]
        if self.inplace:
            targets.append(os.path.join(HERE, "kernel"))
        build_bpf_programs(targets)
        for source in sorted(glob.glob(os.path.join("cext", "examples", "*.c"))):
            name = os.path.splitext(os.path.basename(source))[0] + ".so"
            self.build_shared_object(source, "srv6pipes.modules", name, include_dirs=["cext"])
        # The LD_PRELOAD library of pipes-run (srv6pipes/preload.py): a plain shared object
        # too, loaded into other programs, never imported.
        self.build_shared_object(os.path.join("cext", "preload", "srv6pipes_preload.c"),
                                 "srv6pipes", "srv6pipes_preload.so",
                                 libraries=["dl", "pthread"])

    def build_shared_object(self, source, package, name, include_dirs=(), libraries=()):
        """source -> package's directory/name in the build (and next to the sources for an
        editable install)."""
        target = os.path.join(self.build_lib, *package.split("."), name)
        objects = self.compiler.compile([source], output_dir=self.build_temp,
                                        include_dirs=list(include_dirs),
                                        extra_postargs=["-O2", "-fPIC"])
        self.compiler.link_shared_object(objects, target, libraries=list(libraries))
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            self.copy_file(target, os.path.join(build_py.get_package_dir(package), name))


# Metadata, dependencies and entry points are in pyproject.toml ([project]); this file only
# adds what needs code: the Cython extensions, the VF modules, the BPF programs and the files
# copied into the package.
setup(
    cmdclass={"build_py": build_py_with_kernel, "build_ext": build_ext_with_vf_modules},
    ext_modules=cython_extensions(),
)
