"""vf_crypto: keyring parsing, and encrypt/decrypt flows through the relay contract harness."""
from __future__ import annotations

import contextlib
import os
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srv6pipes import vf_crypto
from srv6pipes.vfapi import DOWN, UP, FlowAdapter, ResetFlow
from tests.support.vfharness import DirectionPump, chunked, make_flow, pump_to_end, run_direction

KEY1 = bytes(range(32))
KEY2 = bytes(range(100, 132))
ENCRYPT = next(f for f in vf_crypto.FUNCTIONS if f.name == "encrypt")
DECRYPT = next(f for f in vf_crypto.FUNCTIONS if f.name == "decrypt")
FLOW = make_flow()
KEYRING = {}   # "path": the module's keyring file, set by the keyring fixture


def write_keyring(path, text, mode=0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return path


@pytest.fixture(scope="module", autouse=True)
def keyring(trusted_path_factory):
    """Keys 1 and 2 configured for the whole module (hypothesis tests cannot use
    function-scoped fixtures); tests that change the keyring restore it."""
    path = write_keyring(trusted_path_factory.mktemp("keys") / "keyring",
                         f"1 {KEY1.hex()}\n2 {KEY2.hex()}\n")
    vf_crypto.configure(path)
    KEYRING["path"] = path
    yield path
    vf_crypto.configure(None)


@contextlib.contextmanager
def configured(path):
    vf_crypto.configure(path)
    try:
        yield
    finally:
        vf_crypto.configure(KEYRING["path"])


def through(function, params, direction, data, flow=FLOW, **caps):
    return run_direction(FlowAdapter(function, params, flow), direction, [data], **caps)


# -- keyring --------------------------------------------------------------------------------

def test_load_keyring_good(trusted_path):
    text = (
        "# the keyring\n"
        "\n"
        f"0 {KEY1.hex()}\n"
        f"  255\t{KEY2.hex().upper()}   # uppercase, tabs, a trailing comment\r\n"
        f"007 {'ab' * 32}\n"
        "   # indented comment\n"
    )
    keys = vf_crypto.load_keyring(write_keyring(trusted_path / "k", text))
    assert keys == {0: KEY1, 255: KEY2, 7: bytes([0xAB]) * 32}


@pytest.mark.parametrize("line, message", [
    ("1", "expected 'KEYID HEXKEY'"),
    (f"one {'00' * 32}", "expected 'KEYID HEXKEY'"),
    (f"-1 {'00' * 32}", "expected 'KEYID HEXKEY'"),
    (f"0x1 {'00' * 32}", "expected 'KEYID HEXKEY'"),
    (f"1 {'00' * 32} extra", "expected 'KEYID HEXKEY'"),
    (f"1 {'zz' * 32}", "expected 'KEYID HEXKEY'"),
    (f"{'9' * 5000} {'00' * 32}", "expected 'KEYID HEXKEY'"),
    (f"256 {'00' * 32}", "key id 256 is not in 0..255"),
    (f"1 {'00' * 31}", "has 62 hex digits, not 64"),
    (f"1 {'00' * 33}", "has 66 hex digits, not 64"),
    (f"1 {'0' * 63}", "has 63 hex digits, not 64"),
    ("1 \u00e9" + "0" * 63, "not ASCII"),
])
def test_load_keyring_bad_lines(trusted_path, line, message):
    path = write_keyring(trusted_path / "k", f"# ok\n2 {KEY2.hex()}\n{line}\n")
    with pytest.raises(vf_crypto.KeyringError, match=f"^{re.escape(str(path))}:3: ") as info:
        vf_crypto.load_keyring(path)
    assert message in str(info.value)
    assert "0000000000" not in str(info.value) and "zzzz" not in str(info.value)


def test_load_keyring_duplicate_ids(trusted_path):
    path = write_keyring(trusted_path / "k", f"1 {KEY1.hex()}\n\n1 {KEY2.hex()}\n")
    with pytest.raises(vf_crypto.KeyringError,
                       match=f"^{re.escape(str(path))}:3: key id 1 is already defined on "
                             f"line 1$"):
        vf_crypto.load_keyring(path)


@pytest.mark.parametrize("text", ["", "# nothing\n\n"])
def test_load_keyring_without_keys(trusted_path, text):
    with pytest.raises(vf_crypto.KeyringError, match="no keys"):
        vf_crypto.load_keyring(write_keyring(trusted_path / "k", text))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o601, 0o620, 0o666])
def test_load_keyring_refuses_open_modes(trusted_path, mode):
    path = write_keyring(trusted_path / "k", f"1 {KEY1.hex()}\n", mode)
    with pytest.raises(vf_crypto.KeyringError, match=f"mode {mode:04o}"):
        vf_crypto.load_keyring(path)


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400, 0o440])
def test_load_keyring_accepts_private_modes(trusted_path, mode):
    assert vf_crypto.load_keyring(write_keyring(trusted_path / "k", f"1 {KEY1.hex()}\n", mode))


def test_load_keyring_missing_file(trusted_path):
    with pytest.raises(vf_crypto.KeyringError, match="no such file"):
        vf_crypto.load_keyring(trusted_path / "absent")


def test_configure_failure_keeps_the_previous_keyring(trusted_path):
    bad = write_keyring(trusted_path / "bad", "1 short\n")
    with pytest.raises(vf_crypto.KeyringError):
        vf_crypto.configure(bad)
    assert vf_crypto.stats()["keys"] == 2
    FlowAdapter(ENCRYPT, 1, FLOW).close()        # still usable


# -- spawn ----------------------------------------------------------------------------------

@pytest.mark.parametrize("function", [ENCRYPT, DECRYPT], ids=["encrypt", "decrypt"])
def test_unknown_key_id_resets(function):
    before = vf_crypto.stats()["missing_key"]
    with pytest.raises(ResetFlow, match=f"{function.name}: key id 3 is not in the keyring"):
        FlowAdapter(function, 3, FLOW)
    assert vf_crypto.stats()["missing_key"] == before + 1


@pytest.mark.parametrize("function", [ENCRYPT, DECRYPT], ids=["encrypt", "decrypt"])
def test_no_keyring_resets(function):
    before = vf_crypto.stats()["missing_key"]
    with configured(None):
        assert vf_crypto.stats()["keys"] == 0
        with pytest.raises(ResetFlow, match="no keyring is configured"):
            FlowAdapter(function, 1, FLOW)
    assert vf_crypto.stats()["missing_key"] == before + 1
    FlowAdapter(function, 1, FLOW).close()       # restored


def test_key_id_is_the_low_8_parameter_bits():
    plain = b"parameters"
    cipher = through(ENCRYPT, 0xABC01, UP, plain)
    assert through(DECRYPT, 1, UP, cipher) == plain


def test_function_ids():
    assert (ENCRYPT.id, DECRYPT.id) == (5, 6)


# -- streams --------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(up=st.binary(max_size=20000), down=st.binary(max_size=20000),
       sizes=st.lists(st.integers(1, 5000), max_size=6),
       caps=st.lists(st.integers(16, 4096), min_size=4, max_size=4),
       key_id=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_roundtrip_both_directions(up, down, sizes, caps, key_id, seed):
    """client -> P1 (encrypt) -> P2 (decrypt) -> server and back, each proxy with its own
    buffer sizes and random chunkings; the segment carries salt + ciphertext both ways."""
    rng = random.Random(seed)
    p1 = FlowAdapter(ENCRYPT, key_id, FLOW)
    p2 = FlowAdapter(DECRYPT, key_id, FLOW)
    p1_caps = dict(in_cap=caps[0], out_cap=caps[1])
    p2_caps = dict(in_cap=caps[2], out_cap=caps[3])

    seg_up = DirectionPump(p1, UP, chunked(up, sizes), **p1_caps)
    seg_down = DirectionPump(p2, DOWN, chunked(down, sizes[::-1]), **p2_caps)
    pump_to_end([seg_up, seg_down], rng)
    for segment, plain in ((seg_up.output, up), (seg_down.output, down)):
        assert len(segment) == (len(plain) + 16 if plain else 0)
        if len(plain) >= 8:
            assert plain not in segment

    def shuffled(data):    # the segment's own chunking
        return chunked(bytes(data), [rng.randint(1, 3000) for _ in range(5)])

    server = DirectionPump(p2, UP, shuffled(seg_up.output), **p2_caps)
    client = DirectionPump(p1, DOWN, shuffled(seg_down.output), **p1_caps)
    pump_to_end([server, client], rng)
    assert bytes(server.output) == up
    assert bytes(client.output) == down
    p1.close()
    p2.close()


@pytest.mark.parametrize("sizes", [[1], [3, 5, 7, 1], [15, 1], [16], [17]])
def test_salt_split_across_arrivals(sizes):
    plain = bytes(range(200))
    cipher = through(ENCRYPT, 1, UP, plain)
    adapter = FlowAdapter(DECRYPT, 1, FLOW)
    pump = DirectionPump(adapter, UP, chunked(cipher, sizes), in_cap=64, out_cap=64)
    pump_to_end([pump])
    assert bytes(pump.output) == plain
    # Nothing is consumed before the whole salt is there.
    assert all(c.consumed in (0, c.offered) for c in pump.calls)
    assert pump.calls[0].consumed == (pump.calls[0].offered if sizes[0] >= 16 else 0)


def test_empty_directions_stay_empty():
    assert through(ENCRYPT, 1, UP, b"") == b""
    assert through(DECRYPT, 1, DOWN, b"") == b""
    assert through(DECRYPT, 1, UP, b"") == b""      # an empty ciphertext stream is fine


@pytest.mark.parametrize("length", [1, 15])
def test_ciphertext_ending_inside_the_salt_resets(length):
    cipher = through(ENCRYPT, 1, UP, b"hello")
    before = vf_crypto.stats()["truncated"]
    with pytest.raises(ResetFlow, match="ended inside its 16-byte salt"):
        through(DECRYPT, 1, UP, cipher[:length])
    assert vf_crypto.stats()["truncated"] == before + 1


def test_truncated_ciphertext_is_not_detected():
    """Documented limitation: no integrity. A cut after the salt decrypts to a prefix."""
    plain = b"0123456789" * 10
    cipher = through(ENCRYPT, 1, UP, plain)
    assert through(DECRYPT, 1, UP, cipher[:50]) == plain[:34]
    flipped = bytearray(cipher)
    flipped[20] ^= 0x01
    assert through(DECRYPT, 1, UP, bytes(flipped)) == plain[:4] + bytes([plain[4] ^ 1]) \
        + plain[5:]


def test_two_flows_with_the_same_tuple_differ():
    plain = b"same plaintext, same flow tuple" * 4
    a = through(ENCRYPT, 1, UP, plain)
    b = through(ENCRYPT, 1, UP, plain)
    assert a[:16] != b[:16]                 # fresh random salts
    assert a[16:] != b[16:]
    assert through(DECRYPT, 1, UP, a) == through(DECRYPT, 1, UP, b) == plain


@pytest.mark.parametrize("change", [
    dict(client_port=40001), dict(server_port=81), dict(client="2001:db8:1::11"),
    dict(server="2001:db8:2::21"),
])
def test_ciphertext_is_bound_to_the_flow_tuple(change):
    plain = b"replayed onto another connection " * 8
    cipher = through(ENCRYPT, 1, UP, plain)
    other = make_flow(**change)
    garbage = through(DECRYPT, 1, UP, cipher, flow=other)
    assert len(garbage) == len(plain) and garbage != plain
    # The function address is not bound: each proxy has its own.
    elsewhere = make_flow(function_address="fc00:2::6:0:1")
    assert through(DECRYPT, 1, UP, cipher, flow=elsewhere) == plain


def test_ciphertext_is_bound_to_direction_and_key():
    plain = b"direction and key matter " * 8
    cipher = through(ENCRYPT, 1, UP, plain)
    # The same bytes arriving in the other direction (encrypt decrypts DOWN).
    assert through(ENCRYPT, 1, DOWN, cipher) != plain
    assert through(DECRYPT, 2, UP, cipher) != plain
    assert through(DECRYPT, 1, UP, cipher) == plain


def test_stats_count_flows_and_bytes():
    before = vf_crypto.stats()
    cipher = through(ENCRYPT, 1, UP, b"x" * 100)
    through(DECRYPT, 1, UP, cipher)
    after = vf_crypto.stats()
    assert after["flows"] == before["flows"] + 2
    assert after["bytes_encrypted"] == before["bytes_encrypted"] + 100
    assert after["bytes_decrypted"] == before["bytes_decrypted"] + 100
    assert after["keys"] == 2 and after["keyring"] == str(KEYRING["path"])


def test_wire_format_is_pinned(monkeypatch):
    """Both proxies must agree byte for byte (and across versions): salt || ChaCha20 under
    HKDF-SHA256(key, salt, label | key id | client | port | server | port | direction)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    salt = bytes(range(0xA0, 0xB0))
    monkeypatch.setattr(os, "urandom", lambda n: salt[:n])
    flow = make_flow(client="2001:db8::1", client_port=0x1234, server="2001:db8::2",
                     server_port=443)
    plain = b"pinned wire format"
    info = (b"srv6pipes chacha20 v1\0" + b"\x02"
            + bytes.fromhex("20010db8000000000000000000000001") + b"\x12\x34"
            + bytes.fromhex("20010db8000000000000000000000002") + b"\x01\xbb" + b"\x01")
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=salt, info=info).derive(KEY2)
    expected = Cipher(algorithms.ChaCha20(okm[:32], b"\0" * 4 + okm[32:]), mode=None) \
        .encryptor().update(plain)
    assert through(DECRYPT, 2, DOWN, plain, flow=flow) == salt + expected
