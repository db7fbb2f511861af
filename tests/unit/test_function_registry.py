"""Function registry (functions.py) and module loading (vfmodules.py), without a network."""
import os

import pytest

from srv6pipes import functions, vfmodules
from srv6pipes.functions import (KIND_PYTHON, Function, FunctionConflict, FunctionRegistry,
                                 UnknownFunction, load_dpi_patterns)

from tests.support.cmodules import build_c_module

MODULES = os.path.join(os.path.dirname(__file__), "..", "modules")
BUILTINS = [(0, "identity"), (1, "xor"), (2, "xor-passes"), (3, "compress"), (4, "decompress"),
            (5, "encrypt"), (6, "decrypt"), (7, "dpi"), (8, "count")]


def test_builtins_by_id_name_and_kind():
    registry = FunctionRegistry()
    assert [(f.function_id, f.name) for f in registry] == BUILTINS
    assert registry.resolve("xor").function_id == 1
    assert registry.resolve("0x3").name == "compress"
    assert registry.resolve(5).kind == KIND_PYTHON
    assert registry.by_id(0).kind == functions.KIND_SPLICE
    assert all(f.address for f in registry if f.kind == functions.KIND_C)
    with pytest.raises(UnknownFunction):
        registry.resolve("nope")
    with pytest.raises(UnknownFunction):
        registry.by_id(0x999)


def test_conflicts_are_refused_with_the_holder_named():
    registry = FunctionRegistry()
    with pytest.raises(FunctionConflict, match="taken by 'xor'"):
        registry.check_free([Function(1, "other", KIND_PYTHON)])
    with pytest.raises(FunctionConflict, match="name 'dpi'"):
        registry.check_free([Function(0x200, "dpi", KIND_PYTHON)])
    with pytest.raises(FunctionConflict, match="0x200"):  # duplicate inside the module
        registry.check_free([Function(0x200, "a", KIND_PYTHON), Function(0x200, "b", KIND_PYTHON)])


def test_slots_are_kept_per_function_and_never_reused_by_another():
    registry = FunctionRegistry()
    first = registry.register(Function(0x200, "mine", KIND_PYTHON, module="m"))
    assert registry.unregister_module("m") == [first]
    with pytest.raises(UnknownFunction):
        registry.by_id(0x200)
    other = registry.register(Function(0x201, "yours", KIND_PYTHON, module="n"))
    again = registry.register(Function(0x200, "mine", KIND_PYTHON, module="m"))
    assert again.slot == first.slot != other.slot
    assert registry.slot_names()[first.slot] == "mine"
    follower = FunctionRegistry()  # a worker registers in the slots the master chose
    assert follower.register(Function(0x200, "mine", KIND_PYTHON), slot=42).slot == 42


def test_stats_slots_run_out_with_a_clear_error():
    registry = FunctionRegistry(functions=[])
    for index in range(functions.MAX_FUNCTION_SLOTS - 1):
        registry.register(Function(index, f"f{index}", KIND_PYTHON))
    with pytest.raises(FunctionConflict, match="no stats slot left"):
        registry.register(Function(9999, "last", KIND_PYTHON))


def test_dpi_pattern_file(trusted_path, tmp_path):
    path = trusted_path / "patterns"
    path.write_bytes(b"# comment\n\nplain text\n\\xde\\xad\\xbe\\xef\nback\\\\slash\n")
    assert load_dpi_patterns(str(path)) == [b"plain text", b"\xde\xad\xbe\xef", b"back\\slash"]
    assert load_dpi_patterns(None) == []
    path.write_bytes(b"ok\n" + b"x" * 256 + b"\n")
    with pytest.raises(ValueError, match=":2:"):
        load_dpi_patterns(str(path))
    untrusted = tmp_path / "patterns"      # in /tmp: others could swap it
    untrusted.write_bytes(b"x\n")
    with pytest.raises(ValueError, match="writable by group or others"):
        load_dpi_patterns(str(untrusted))


# -- modules -------------------------------------------------------------------------------------
def test_module_names_come_from_the_file_name():
    assert vfmodules.module_name("/x/vf_caesar.so") == "vf_caesar"
    assert vfmodules.module_name("chaos.py") == "chaos"
    with pytest.raises(vfmodules.ModuleLoadError, match="shared object"):
        vfmodules.module_name("/x/readme.txt")


def test_python_module_init_deinit_and_functions(tmp_path):
    marker = tmp_path / "events"
    source = tmp_path / "lifecycle.py"
    source.write_text(
        "from srv6pipes.vfapi import Function\n"
        f"LOG = {str(marker)!r}\n"
        "def note(text):\n"
        "    with open(LOG, 'a') as log: log.write(text)\n"
        "def init(): note('init ')\n"
        "def deinit(): note('deinit')\n"
        "def stats(): return {'answer': 42}\n"
        "FUNCTIONS = [Function(0x300, 'upper', lambda c, d, b, e: b.upper())]\n")
    module = vfmodules.load_module(str(source))
    assert module.name == "lifecycle" and module.stats() == {"answer": 42}
    assert [(f.function_id, f.name, f.module) for f in module.functions] == [(0x300, "upper", "lifecycle")]
    assert module.functions[0].python.process(None, 0, b"ab", False) == b"AB"
    module.unload()
    module.unload()  # idempotent
    assert marker.read_text() == "init deinit"


@pytest.mark.parametrize("body, message", [
    ("raise ImportError('broken on purpose')\n", "broken on purpose"),
    ("FUNCTIONS = []\n", "declares no FUNCTIONS"),
    ("from srv6pipes.vfapi import Function\n"
     "def init(): raise RuntimeError('init says no')\n"
     "FUNCTIONS = [Function(0x300, 'x', lambda c, d, b, e: b)]\n", "init says no"),
])
def test_bad_python_modules_are_refused(tmp_path, body, message):
    source = tmp_path / "bad.py"
    source.write_text(body)
    with pytest.raises(vfmodules.ModuleLoadError, match=message):
        vfmodules.load_module(str(source))
    with pytest.raises(vfmodules.ModuleLoadError, match=message):
        vfmodules.probe_module(str(source))


def test_probe_describes_a_module_without_loading_it_here():
    described = vfmodules.probe_module(os.path.join(MODULES, "faulty.py"))
    assert [(d["id"], d["name"], d["module"], d["kind"]) for d in described] == [
        (0x7F02, "faulty", "faulty", "python")]


def test_probe_survives_a_module_that_crashes_or_hangs(tmp_path):
    source = tmp_path / "crash.c"
    source.write_text(
        '#include "srv6pipes_vf.h"\n#include <signal.h>\nPIPES_VF_MODULE;\n'
        "static int boom(void) { raise(SIGSEGV); return 0; }\n"
        "static void *sp(uint32_t p, const struct pipes_flow_info *f) { (void)p; (void)f; return 0; }\n"
        "static ssize_t pr(void *c, int d, const uint8_t *i, size_t *n, uint8_t *o, size_t cap,"
        " int fl) { (void)c; (void)d; (void)i; (void)n; (void)o; (void)cap; (void)fl; return 0; }\n"
        "const struct pipes_func_desc all_funcs[] = {{ .id = 0x300, .name = \"crash\","
        " .init = boom, .spawn = sp, .process = pr }, { 0 }};\n")
    with pytest.raises(vfmodules.ModuleLoadError, match="crashed while loading .SIGSEGV"):
        vfmodules.probe_module(str(build_c_module(source, tmp_path)))
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(vfmodules.ModuleLoadError, match="longer than"):
        vfmodules.probe_module(str(hang), timeout=0.5)
