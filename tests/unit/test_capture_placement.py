"""capture.capture_placement: which CPU each capture runs on and which queue it reads."""
from hypothesis import given
from hypothesis import strategies as st

from srv6pipes.capture import capture_placement


def test_one_capture_reads_the_first_queue_on_the_first_cpu():
    assert capture_placement([1], 1) == [(1, 0)]
    assert capture_placement([0, 1], 1) == [(0, 0)]


def test_each_capture_reads_the_queue_its_cpu_fans_out_to():
    # --queue-cpu-fanout: a SYN received on CPU c goes to offset c % count.
    assert capture_placement([0, 1], 2) == [(0, 0), (1, 1)]
    assert capture_placement([2, 3], 2) == [(2, 0), (3, 1)]
    assert capture_placement([1, 2, 3], 3) == [(1, 1), (2, 2), (3, 0)]


def test_cpus_that_share_an_offset_fall_back_to_queues_in_order():
    assert capture_placement([0, 2], 2) == [(0, 0), (2, 1)]
    # More captures than CPUs: they share CPUs, every queue still has its reader.
    assert capture_placement([5], 3) == [(5, 0), (5, 1), (5, 2)]


@given(cpus=st.lists(st.integers(0, 255), min_size=1, max_size=16, unique=True),
       count=st.integers(1, 16))
def test_every_queue_has_exactly_one_reader(cpus, count):
    placement = capture_placement(sorted(cpus), count)
    assert sorted(offset for _, offset in placement) == list(range(count))
    assert all(cpu in cpus for cpu, _ in placement)
