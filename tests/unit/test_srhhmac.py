"""SRH HMAC as Linux computes it (pipes/srhhmac.py): a vector signed by this kernel's
End.B6, sign/verify round trips, and every refusal."""
import dataclasses
import ipaddress

import pytest
from hypothesis import given, strategies as st

from srv6pipes import srhhmac
from srv6pipes.srh import SRH, TLV
from srv6pipes.srhhmac import HmacError, HmacKeyring, HmacRefused

A = ipaddress.IPv6Address
KEYRING = HmacKeyring({7: b"secretsecret", 8: b"another-secret"})


def test_linux_vector():
    """Captured at the proxy of the access-router experiment: End.B6 with `hmac 7`, key
    `ip sr hmac set 7 sha256` = secretsecret, client fd00:c::1, policy [fc00:2::]."""
    value = bytes.fromhex("0000" "00000007" "74314ae46c389559507c2377e0c05e9e"
                          "f08fa4ce28ec57120fdcf295dcddcea2")
    srh = SRH((A("fd00:1:1::b:1"), A("fc00:2::")), 1, flags=8, tlvs=(TLV(5, value),))
    assert srhhmac.verify(srh, A("fd00:c::1").packed, KEYRING) == 7
    resigned = srhhmac.sign(dataclasses.replace(srh, flags=0, tlvs=()), A("fd00:c::1").packed,
                            7, b"secretsecret")
    assert resigned == srh
    # The HMAC TLV is the header's last 40 bytes, where Linux looks for it.
    assert resigned.to_bytes()[-40:] == bytes([5, 38]) + value


addresses = st.integers(0, 2**128 - 1).map(A)


@given(segments=st.lists(addresses, min_size=1, max_size=8), source=addresses,
       key_id=st.sampled_from([7, 8]), moved=st.integers(0, 7), flags=st.integers(0, 255))
def test_sign_verify_round_trip_and_segments_left_is_not_covered(segments, source, key_id,
                                                                 moved, flags):
    srh = SRH(tuple(segments), flags=flags)
    signed = srhhmac.sign(srh, source.packed, key_id, KEYRING.secret(key_id))
    assert signed.flags & srhhmac.HMAC_FLAG
    assert srhhmac.verify(signed, source.packed, KEYRING) == key_id
    # A proxy forwards it with segments-left decremented: still valid.
    onward = dataclasses.replace(signed, segments_left=min(moved, signed.last_entry))
    assert srhhmac.verify(SRH.parse(onward.to_bytes()), source.packed, KEYRING) == key_id


@given(segments=st.lists(addresses, min_size=2, max_size=6), source=addresses,
       index=st.integers(0, 5), bit=st.integers(0, 127))
def test_any_changed_segment_or_source_is_refused(segments, source, index, bit):
    signed = srhhmac.sign(SRH(tuple(segments)), source.packed, 7, KEYRING.secret(7))
    index %= len(segments)
    changed = list(signed.segments)
    changed[index] = A(int(changed[index]) ^ (1 << bit))
    with pytest.raises(HmacRefused) as refused:
        srhhmac.verify(dataclasses.replace(signed, segments=tuple(changed)), source.packed, KEYRING)
    assert refused.value.reason == "mismatch"
    with pytest.raises(HmacRefused):
        srhhmac.verify(signed, A(int(source) ^ (1 << bit)).packed, KEYRING)


def test_refusals_name_their_reason():
    source = A("fd00:c::1").packed
    plain = SRH((A("fd00:d::1"), A("fc00:1::5")))
    with pytest.raises(HmacRefused) as refused:
        srhhmac.verify(plain, source, KEYRING)
    assert refused.value.reason == "missing"
    foreign = srhhmac.sign(plain, source, 9, b"not-in-the-keyring")
    with pytest.raises(HmacRefused) as refused:
        srhhmac.verify(foreign, source, KEYRING)
    assert refused.value.reason == "unknown_key"
    forged = srhhmac.sign(plain, source, 7, b"guessed")
    with pytest.raises(HmacRefused) as refused:
        srhhmac.verify(forged, source, KEYRING)
    assert refused.value.reason == "mismatch"
    unflagged = dataclasses.replace(srhhmac.sign(plain, source, 7, b"secretsecret"), flags=0)
    with pytest.raises(HmacRefused):  # the flag is authenticated
        srhhmac.verify(unflagged, source, KEYRING)
    for value in (bytes(37), bytes(39)):
        with pytest.raises(HmacRefused) as refused:
            srhhmac.verify(dataclasses.replace(plain, tlvs=(TLV(5, value),)), source, KEYRING)
        assert refused.value.reason == "malformed"
    twice = dataclasses.replace(forged, tlvs=forged.tlvs * 2)
    with pytest.raises(HmacRefused, match="2 HMAC TLVs"):
        srhhmac.verify(twice, source, KEYRING)


def test_sign_keeps_other_tlvs_and_puts_the_hmac_last():
    other = TLV(124, A("fc00:1::").packed)
    srh = SRH((A("fd00:d::1"), A("fc00:1::5")), tlvs=(other,))
    signed = srhhmac.sign(srhhmac.sign(srh, bytes(16), 7, b"k"), bytes(16), 8, b"k2")
    assert [tlv.type for tlv in signed.tlvs] == [124, 5]
    assert srhhmac.hmac_field(signed).key_id == 8


def test_keyring_file(trusted_path, tmp_path):
    path = trusted_path / "keys"
    path.write_text("# access routers\n7 secretsecret\n0x10 " + "x" * 64 + "  # longest\n")
    path.chmod(0o600)
    keyring = HmacKeyring.load(path)
    assert keyring.keys == {7: b"secretsecret", 16: b"x" * 64}
    path.chmod(0o644)
    with pytest.raises(HmacError, match="readable by others"):
        HmacKeyring.load(path)
    swappable = tmp_path / "keys"         # in /tmp: others could put their own there
    swappable.write_text("7 secretsecret\n")
    swappable.chmod(0o600)
    with pytest.raises(HmacError, match="writable by group or others"):
        HmacKeyring.load(swappable)


@pytest.mark.parametrize("text, message", [
    ("7\n", r"line 1: expected 'KEYID SECRET', got 1 words"),
    ("seven secret\n", r"line 1: key id 'seven' is not a number"),
    ("0 secret\n", r"line 1: key id must be in 1..4294967295"),
    ("4294967296 s\n", r"key id must be in 1\.\.4294967295"),
    ("7 " + "x" * 65 + "\n", r"the secret must be 1..64 bytes"),
    ("7 s\n7 t\n", r"line 2: key id 7 given twice"),
    ("7 s\u00e9\n", r"printable ASCII"),
])
def test_keyring_errors(text, message):
    with pytest.raises(HmacError, match=message):
        HmacKeyring.parse(text)
