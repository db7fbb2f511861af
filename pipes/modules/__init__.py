"""C VF modules shipped with SRv6Pipes, built by setup.py from cext/examples/NAME.c.

They are plain shared objects, loaded by path (`pipesctl load`, srv6pipes._vf.load_c_module),
not imported:

    vf_caesar.so   the documented example: caesar (id 0x100) and uncaesar (id 0x101)
"""
import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def module_path(name: str) -> str:
    """The path of the shipped module NAME.so (whether it was built or not)."""
    return os.path.join(DIRECTORY, f"{name}.so")
