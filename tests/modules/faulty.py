"""TEST module: a Python function that fails on demand (id 0x7f02, `faulty`).

Identity, except that a chunk containing b"BOOM" raises RuntimeError (a bug: the flow must be
reset and counted as vf_errors, nothing else disturbed) and one containing b"BLOCK" raises
ResetFlow (a decision: counted as vf_resets).
"""
from srv6pipes.vfapi import Function, ResetFlow


def process(ctx, direction, data, eof):
    if b"BOOM" in data:
        raise RuntimeError("faulty: asked to fail")
    if b"BLOCK" in data:
        raise ResetFlow("faulty: asked to block")
    return data


FUNCTIONS = [Function(0x7F02, "faulty", process, description="test: fails on demand")]
