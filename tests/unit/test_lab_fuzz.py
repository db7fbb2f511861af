"""The fuzz generators (srv6pipes.lab.fuzz) themselves: a broken generator would make the
chaos test and bench/run_fuzz.py prove nothing."""
import json
import random
import struct
from ipaddress import IPv6Address as A

from srv6pipes.lab import fuzz
from srv6pipes.srh import SRH, SRHError

FUNCTION, SERVER, CLIENT = A("fc00:1::1:0:0"), A("fd00:d::1"), A("fd00:c::1")


def test_control_messages_are_single_lines_and_mostly_not_valid_json_requests():
    rng = random.Random(1)
    messages = [fuzz.control_message(rng) for _ in range(5000)]
    assert all(b"\n" not in m for m in messages)
    valid = sum(m in fuzz.VALID_REQUESTS for m in messages)
    assert 0 < valid < 1000                    # some valid ones among mostly broken ones


def test_malformed_syns_are_whole_ipv6_packets_with_srhs_the_codec_mostly_refuses():
    rng = random.Random(2)
    valid = SRH.from_path([FUNCTION, SERVER]).to_bytes()
    refused = 0
    for _ in range(20_000):
        packet = fuzz.malformed_syn(rng, CLIENT, FUNCTION, SERVER, 80, valid)
        version, payload_length, next_header = struct.unpack_from("!IHB", packet)
        assert version >> 28 == 6 and next_header == 43
        assert payload_length == len(packet) - 40          # reaches the SRH parser
        assert packet[24:40] == FUNCTION.packed
        srh_and_syn = packet[40:]
        try:
            SRH.parse(srh_and_syn[:8 + 8 * srh_and_syn[1]])
        except SRHError:
            refused += 1
    assert refused > 10_000


def ones_complement_sum(data: bytes) -> int:
    """RFC 1071, written here independently of the fuzzer's."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_tcp_syn_checksum_covers_the_final_destination():
    syn = fuzz.tcp_syn(CLIENT, SERVER, 40000, 80, 7)
    pseudo = CLIENT.packed + SERVER.packed + struct.pack("!I3xB", len(syn), 6)
    assert fuzz._checksum(pseudo + syn) == 0
    stored = struct.unpack_from("!H", syn, 16)[0]
    unsummed = syn[:16] + b"\0\0" + syn[18:]
    assert stored != 0 and stored == 0xFFFF - ones_complement_sum(pseudo + unsummed)


def test_paced_yields_every_index():
    assert list(fuzz.paced(50, 1e6)) == list(range(50))


def test_the_valid_requests_are_json_objects_with_a_command():
    assert all("cmd" in json.loads(request) for request in fuzz.VALID_REQUESTS)
