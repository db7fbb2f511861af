# cython: language_level=3
"""Shared-memory SRH table: SYN captures (writers) -> workers (lock-free readers).

The capture process inserts, for every intercepted SYN that carries an SRH, the SRH bytes and
the SYN's original segments-left under the key the worker will see after accept():
(client address, client port, final destination address, destination port). Workers look the
key up right after accept(). Nothing is ever deleted: an entry older than the TTL counts as
empty and its slot is reused.

Segment: POSIX shared memory ``/srv6pipes-<name>-srh``, native byte order (one host).
Layout (C structs and offsets in cext/srhtable_impl.h)::

    header, 256 bytes
        0  u64 magic "SRV6SRHT"      8 u32 version (1)      12 u32 header_size (256)
       16  u32 nslots (power of 2)  20 u32 slot_size (64)   24 u32 srh_max (1024)
       28  u32 probe (8)            32 u32 ttl_ms          36 u32 state (0 live, 1 retired)
       40  u64 hash_seed            48 u64 total_size       56 u32 writer_pid
       64  u64 counters[16], atomic additions by the writers; names and order: COUNTERS
    entries, nslots x 64 bytes, at offset 256
        0  u32 seq (seqlock: odd while being written)
        4  u16 srh_len              6 u8 orig_segments_left
        8  u64 inserted_at_ms (CLOCK_MONOTONIC; 0 = never used)
       16  key: u8 client_addr[16], u8 dest_addr[16], u16 client_port, u16 dest_port
    SRH bytes, nslots x 1024 bytes, at offset 256 + 64 * nslots (slot i at 1024 * i)

Placement: open addressing, seeded 64-bit mixing hash of the key, probe window of 8
consecutive slots. insert() replaces the entry with the same key, else takes the first
never-used or expired slot, else evicts the oldest slot of the window (counted).
lookup() stops at a never-used slot (insert would have placed the key there or before).

Readers write nothing to the segment: attach() maps it read-only, and a process that
inherited the writer's mapping over fork (pipesd's workers) only calls lookup(). They count
their own retries (`lookup_retries`, `lookup_busy`) in the SrhTable object. The capture
processes (one per CPU) insert concurrently: a writer claims the slot it chose with a
compare-and-swap on the slot's sequence and chooses again if another writer got there
first (cext/srhtable_impl.h), and the counters are atomic additions.
When create() replaces a table, it marks the old one retired; attach()ed readers of the old
one move to the new one on their next lookup (`reattaches`).
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.errno cimport errno
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED

import hmac as _hmac
import os
import time

import posix_ipc

from csystem cimport inet_pton, AF_INET6

cdef extern from "srhtable_impl.h" nogil:
    uint64_t SRHT_MAGIC
    enum:
        SRHT_VERSION
        SRHT_HEADER_SIZE
        SRHT_ENTRY_SIZE
        SRHT_SRH_MAX
        SRHT_PROBE
        SRHT_NCOUNTERS
        SRHT_STATE_LIVE
        SRHT_STATE_RETIRED

    struct srht_header:
        uint64_t magic
        uint32_t version
        uint32_t header_size
        uint32_t nslots
        uint32_t slot_size
        uint32_t srh_max
        uint32_t probe
        uint32_t ttl_ms
        uint32_t state
        uint64_t hash_seed
        uint64_t total_size
        uint32_t writer_pid
        uint64_t counters[16]

    struct srht_entry:
        uint32_t seq
        uint16_t srh_len
        uint8_t orig_segments_left
        uint64_t inserted_at_ms
        uint8_t client_addr[16]
        uint8_t dest_addr[16]
        uint16_t client_port
        uint16_t dest_port

    struct srht_key:
        uint8_t client_addr[16]
        uint8_t dest_addr[16]
        uint16_t client_port
        uint16_t dest_port

    uint64_t srht_now_ms()
    uint64_t srht_hash(const srht_key *key, uint64_t seed)
    const void *srht_entry_key(const srht_entry *e)
    uint32_t srht_load_relaxed_u32(const uint32_t *p)
    uint64_t srht_load_acquire_u64(const uint64_t *p)
    uint64_t srht_load_relaxed_u64(const uint64_t *p)
    void srht_store_release_u32(uint32_t *p, uint32_t v)
    void srht_store_release_u64(uint64_t *p, uint64_t v)
    void srht_store_relaxed_u64(uint64_t *p, uint64_t v)
    void srht_counter_add(uint64_t *p, uint64_t n)
    void srht_cpu_relax()
    uint32_t srht_write_seen(const srht_entry *e)
    int srht_write_claim(srht_entry *e, uint32_t seen)
    void srht_write_slot(srht_entry *e, uint32_t seen, uint8_t *srh_area, const srht_key *key,
                         uint8_t orig_segments_left, const uint8_t *srh, uint16_t srh_len,
                         uint64_t now_ms)
    int srht_read_slot(const srht_entry *e, const uint8_t *srh_area, const srht_key *key,
                       srht_entry *out, uint8_t *srh_out, int max_tries, int *retries)


cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)

cdef enum:
    # linux/mman.h (Linux 5.14): fault every page of a mapping in now.
    MADV_POPULATE_READ = 22
    MADV_POPULATE_WRITE = 23

cdef extern from "synparse.h" nogil:
    enum:
        SYN_FAST
    struct syn_info:
        const uint8_t *client
        const uint8_t *destination
        uint16_t client_port
        uint16_t dest_port
        const uint8_t *srh
        uint16_t srh_len
        uint8_t segments_left
    int syn_parse_fast(const uint8_t *p, size_t length, size_t srh_max, syn_info *out)

cdef extern from "synbinding.h" nogil:
    enum:
        SYN_HMAC_TLV_BYTES
    struct syn_binding:
        const uint8_t *client
        uint16_t client_port
        uint16_t dest_port
        const uint8_t *outer
        size_t outer_len
        const uint8_t *inner
        size_t inner_len
        const uint8_t *hmac
    int syn_parse_binding(const uint8_t *p, size_t length, syn_binding *out)
    size_t syn_flatten(const syn_binding *b, uint8_t *buf, size_t cap, int64_t key_id)

# Names of header.counters[i], in order. The table's own (inserts .. rejected) are kept by
# insert(); the capture process adds its per-SYN counters with count().
COUNTERS = (
    "inserts",       # successful insert() calls, replacements included
    "replaced",      # of those, a live entry with the same key was overwritten
    "evictions",     # of those, a live entry with another key was overwritten (window full)
    "rejected",      # insert() refused: SRH longer than SRH_MAX
    "syn_seen",      # capture: TCP SYNs read from the queue
    "no_srh",        # capture: SYNs without an SRH (dropped)
    "malformed",     # capture: SYNs whose IPv6 header chain or SRH did not parse (dropped)
    "not_syn",       # capture: queued packets that were not a TCP SYN (rule too broad)
    "errors",        # capture: unexpected exceptions while handling a packet (accepted)
    "queue_drops",   # capture: the kernel could not deliver queued packets (ENOBUFS): SYNs lost
    "time_wait_retired",  # capture: a proxy-side TIME_WAIT socket blocked the SYN's tuple
    "hmac_refused",  # capture: SRH HMAC missing (--require-hmac), unknown or wrong: dropped
    "stacked",       # capture: a binding's SRH stacked over the client's, flattened
    "verdict_batches",  # capture: batch verdicts sent (each accepts one or more SYNs)
    "insert_busy",   # insert() gave up: other writers kept its window busy (SYN left to the
                     # saved-SYN fallback)
)
COUNTER_INDEX = {counter: index for index, counter in enumerate(COUNTERS)}
cdef enum:
    COUNTER_INSERT_BUSY = 14   # counted in C by _insert
assert COUNTERS[COUNTER_INSERT_BUSY] == "insert_busy"
assert len(COUNTERS) <= SRHT_NCOUNTERS

SRH_MAX = SRHT_SRH_MAX
SLOT_BYTES = SRHT_ENTRY_SIZE + SRHT_SRH_MAX   # shared memory per slot (entry + SRH bytes)
PROBE = SRHT_PROBE
VERSION = SRHT_VERSION
MAX_SLOTS = 1 << 22   # 4 Mi slots = 4.25 GiB of (sparse) shared memory
DEFAULT_SLOTS = 65536
DEFAULT_TTL_MS = 30000

cdef enum:
    # A reader gives a slot up (treats it as a miss) after this many torn or busy reads. The
    # writer holds a slot for well under a microsecond, so hitting it means the writer died
    # mid-write or was descheduled; the worker then falls back to TCP_SAVED_SYN.
    MAX_READ_TRIES = 256
    # A reader whose table was retired (the capture process restarted and created a new
    # one) tries to attach the new table at most this often.
    REATTACH_INTERVAL_MS = 100


class SrhTableError(Exception):
    """The table cannot be created or attached (missing, not a table, wrong version)."""


def segment_name(name):
    """POSIX shared memory name of the SRH table of pipesd instance `name`."""
    if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
        raise ValueError(f"invalid SRH table name {name!r}")
    return f"/srv6pipes-{name}-srh"


def unlink(name):
    """Removes the segment of instance `name`; a missing segment is not an error."""
    try:
        posix_ipc.unlink_shared_memory(segment_name(name))
    except posix_ipc.ExistentialError:
        pass


def now_ms():
    """The table's clock: CLOCK_MONOTONIC in milliseconds (what inserted_at_ms holds)."""
    return srht_now_ms()


cdef inline size_t _total_size(uint32_t nslots):
    return SRHT_HEADER_SIZE + <size_t>nslots * (SRHT_ENTRY_SIZE + SRHT_SRH_MAX)


def table_size(nslots):
    """Bytes of shared memory a table of `nslots` slots commits."""
    return _total_size(nslots)


cdef int _addr16(object addr, uint8_t *out) except -1:
    """Copies a 16-byte IPv6 address given as bytes, str, ipaddress.IPv6Address or any
    16-byte buffer into out."""
    cdef bytes raw
    if type(addr) is bytes:
        raw = <bytes>addr
    elif isinstance(addr, str):
        encoded = (<str>addr).encode("ascii", "replace")
        if inet_pton(AF_INET6, encoded, out) != 1:
            raise ValueError(f"not an IPv6 address: {addr!r}")
        return 0
    elif hasattr(addr, "packed"):
        raw = addr.packed
    else:
        raw = bytes(addr)
    if PyBytes_GET_SIZE(raw) != 16:
        raise ValueError(f"an IPv6 address is 16 bytes, got {PyBytes_GET_SIZE(raw)}")
    memcpy(out, PyBytes_AS_STRING(raw), 16)
    return 0


cdef int _make_key(srht_key *key, object client_addr, object client_port,
                   object dest_addr, object dest_port) except -1:
    cdef long cport = client_port
    cdef long dport = dest_port
    if not 0 <= cport <= 65535 or not 0 <= dport <= 65535:
        raise ValueError(f"ports must be 0-65535, got {client_port!r} and {dest_port!r}")
    _addr16(client_addr, key.client_addr)
    _addr16(dest_addr, key.dest_addr)
    key.client_port = <uint16_t>cport
    key.dest_port = <uint16_t>dport
    return 0


cdef class SrhTable:
    """A mapping of the table. `SrhTable.create()` in the writer, `SrhTable.attach()` in
    readers; do not instantiate directly. Not thread-safe; a forked child must attach its
    own mapping (a mapping inherited over fork works but shares nothing Python-side)."""

    cdef uint8_t *base
    cdef size_t size
    cdef srht_header *hdr
    cdef srht_entry *entries
    cdef uint8_t *srh_area
    cdef uint32_t mask
    cdef uint64_t ttl
    cdef uint64_t seed
    cdef readonly bint writable
    cdef readonly str name
    cdef readonly uint64_t lookup_retries   # torn or busy slot reads that were retried
    cdef readonly uint64_t lookup_busy      # slots given up on after MAX_READ_TRIES
    cdef readonly uint64_t reattaches       # times a retired table was replaced by the new one
    cdef uint64_t next_reattach_ms
    # SRH HMAC (writer only, set_hmac): key id -> secret, and whether an HMAC is required.
    cdef dict hmac_keys
    cdef bint require_hmac

    def __cinit__(self):
        self.base = NULL
        self.size = 0
        self.hdr = NULL
        self.name = None

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def create(cls, name, nslots=DEFAULT_SLOTS, ttl_ms=DEFAULT_TTL_MS, mode=0o600):
        """Creates the table of instance `name` and maps it read-write (the writer).

        nslots is rounded up to a power of two (at least PROBE). A segment left by an earlier
        writer is marked retired (its readers move to the new one) and unlinked first.
        """
        cdef SrhTable table
        cdef uint32_t slots = PROBE
        segment = segment_name(name)
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be 1-{MAX_SLOTS}, got {nslots!r}")
        if not 1 <= ttl_ms <= 0xFFFFFFFF:
            raise ValueError(f"ttl_ms must be a positive 32-bit number of ms, got {ttl_ms!r}")
        while slots < nslots:
            slots <<= 1
        _retire(name)
        total = _total_size(slots)
        try:
            shm = posix_ipc.SharedMemory(segment, posix_ipc.O_CREX, mode=mode, size=total)
        except posix_ipc.ExistentialError as exc:
            raise SrhTableError(f"SRH table {segment} was created concurrently by another "
                                "writer") from exc
        try:
            table = cls._map(name, shm.fd, total, True)
        except BaseException:
            unlink(name)
            raise
        finally:
            shm.close_fd()
        hdr = table.hdr
        # ftruncate gave zeroes: every slot is never-used, every counter 0.
        hdr.version = SRHT_VERSION
        hdr.header_size = SRHT_HEADER_SIZE
        hdr.nslots = slots
        hdr.slot_size = SRHT_ENTRY_SIZE
        hdr.srh_max = SRHT_SRH_MAX
        hdr.probe = SRHT_PROBE
        hdr.ttl_ms = ttl_ms
        hdr.state = SRHT_STATE_LIVE
        hdr.hash_seed = int.from_bytes(os.urandom(8), "little")
        hdr.total_size = total
        hdr.writer_pid = os.getpid()
        srht_store_release_u64(&hdr.magic, SRHT_MAGIC)  # readers accept the table from now on
        table._bind_header()
        return table

    @classmethod
    def attach(cls, name, timeout=0.0):
        """Maps the table of instance `name` read-only (a reader).

        Raises SrhTableError when it is missing, not an SRH table or of another version;
        with timeout > 0, keeps retrying that long (for a reader started with the writer).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls._attach_once(name)
            except SrhTableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    @classmethod
    def _attach_once(cls, name):
        cdef SrhTable table
        segment = segment_name(name)
        try:
            shm = posix_ipc.SharedMemory(segment, 0, read_only=True)
        except posix_ipc.ExistentialError as exc:
            raise SrhTableError(f"SRH table {segment} does not exist: is the SYN capture "
                                "process of this instance running?") from exc
        try:
            size = shm.size
            if size < SRHT_HEADER_SIZE:
                raise SrhTableError(f"{segment} is not an SRH table ({size} bytes)")
            table = cls._map(name, shm.fd, SRHT_HEADER_SIZE, False)
            table._check_header(segment, size)
            total = table.hdr.total_size
            munmap(table.base, table.size)
            table.base = NULL
            table.hdr = NULL
            table = cls._map(name, shm.fd, total, False)
            table._check_header(segment, size)
        finally:
            shm.close_fd()
        table._bind_header()
        return table

    @staticmethod
    def _map(name, int fd, size_t size, bint writable):
        cdef SrhTable table = SrhTable.__new__(SrhTable)
        cdef int prot = PROT_READ | PROT_WRITE if writable else PROT_READ
        cdef void *addr = mmap(NULL, size, prot, MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            raise OSError(errno, f"mmap of SRH table {segment_name(name)} ({size} bytes) failed")
        table.base = <uint8_t *>addr
        table.size = size
        table.hdr = <srht_header *>addr
        table.writable = writable
        table.name = name
        return table

    cdef _check_header(self, str segment, size_t shm_size):
        cdef srht_header *hdr = self.hdr
        cdef uint64_t magic = srht_load_acquire_u64(&hdr.magic)
        if magic == 0:
            raise SrhTableError(f"SRH table {segment} is not initialised yet (or not a table)")
        if magic != SRHT_MAGIC:
            raise SrhTableError(f"{segment} is not an SRH table (bad magic {magic:#x})")
        if hdr.version != SRHT_VERSION:
            raise SrhTableError(f"SRH table {segment} has layout version {hdr.version}, this "
                                f"build reads version {SRHT_VERSION}: restart the daemon")
        if (hdr.header_size != SRHT_HEADER_SIZE or hdr.slot_size != SRHT_ENTRY_SIZE
                or hdr.srh_max != SRHT_SRH_MAX or hdr.probe != SRHT_PROBE
                or hdr.nslots < SRHT_PROBE or hdr.nslots & (hdr.nslots - 1)
                or hdr.total_size != _total_size(hdr.nslots) or hdr.total_size > shm_size
                or hdr.ttl_ms == 0):
            raise SrhTableError(f"SRH table {segment} has an inconsistent header")

    cdef _bind_header(self):
        cdef srht_header *hdr = self.hdr
        self.entries = <srht_entry *>(self.base + SRHT_HEADER_SIZE)
        self.srh_area = self.base + SRHT_HEADER_SIZE + <size_t>hdr.nslots * SRHT_ENTRY_SIZE
        self.mask = hdr.nslots - 1
        self.ttl = hdr.ttl_ms
        self.seed = hdr.hash_seed

    cdef inline int _check_open(self) except -1:
        if self.base == NULL:
            raise ValueError("SRH table is closed")
        return 0

    cdef inline int _check_writable(self) except -1:
        self._check_open()
        if not self.writable:
            raise SrhTableError("SRH table is attached read-only: only the writer changes it")
        return 0

    # ---- writer ----------------------------------------------------------------------

    def insert(self, client_addr, client_port, dest_addr, dest_port, orig_segments_left, srh):
        """Stores `srh` (the raw SRH bytes) and the SYN's original segments-left under the key.

        Addresses: 16 bytes, str or ipaddress.IPv6Address. Returns False (and counts
        `rejected`) when the SRH is longer than SRH_MAX, True otherwise.
        """
        cdef srht_key key
        cdef const uint8_t[::1] view
        cdef bytes data
        cdef long sl = orig_segments_left
        self._check_writable()
        if not 0 <= sl <= 255:
            raise ValueError(f"segments-left is 0-255, got {orig_segments_left!r}")
        _make_key(&key, client_addr, client_port, dest_addr, dest_port)
        data = srh if type(srh) is bytes else bytes(srh)
        if PyBytes_GET_SIZE(data) > SRHT_SRH_MAX:
            srht_counter_add(&self.hdr.counters[3], 1)
            return False
        self._insert(&key, <uint8_t>sl, <const uint8_t *>PyBytes_AS_STRING(data),
                     <uint16_t>PyBytes_GET_SIZE(data))
        return True

    cdef bint _insert(self, const srht_key *key, uint8_t sl, const uint8_t *srh,
                      uint16_t srh_len) noexcept nogil:
        """Writes the entry; 0 (counted as insert_busy) when other writers kept every
        usable slot of the window busy for MAX_READ_TRIES choices (the worker then falls
        back to the saved SYN)."""
        cdef uint64_t now = srht_now_ms()
        cdef uint32_t base = <uint32_t>(srht_hash(key, self.seed) & self.mask)
        cdef uint32_t i, idx, target_seen = 0
        cdef long target = -1, free, oldest
        cdef uint64_t oldest_at, at
        cdef bint refreshed = False, evicted = False
        cdef int attempt
        cdef srht_entry *e
        cdef uint32_t seqs[SRHT_PROBE]
        for attempt in range(MAX_READ_TRIES):
            # Choose a slot. Other writers may change slots meanwhile: what is read here is
            # only a choice, made safe by the claim below (its sequence must not have moved).
            # A slot being written (odd sequence) is no choice: its writer may also have
            # died mid-write, leaving it odd for good.
            target = free = oldest = -1
            oldest_at = 0xFFFFFFFFFFFFFFFF
            refreshed = False
            for i in range(<uint32_t>SRHT_PROBE):
                idx = (base + i) & self.mask
                e = &self.entries[idx]
                seqs[i] = srht_write_seen(e)
                if seqs[i] & 1u:
                    continue
                at = srht_load_relaxed_u64(&e.inserted_at_ms)
                if at == 0:
                    if free < 0:
                        free = idx
                    break  # never used: the key cannot be further on
                if memcmp(srht_entry_key(e), key, sizeof(srht_key)) == 0:
                    target = idx
                    # Another capture's clock read may be later than ours: at > now is live.
                    refreshed = at >= now or now - at < self.ttl
                    break
                if at < now and now - at >= self.ttl:
                    if free < 0:
                        free = idx
                elif at < oldest_at:
                    oldest_at = at
                    oldest = idx
            evicted = False
            if target < 0:
                if free >= 0:
                    target = free
                else:
                    target = oldest
                    evicted = True
            if target >= 0:
                target_seen = seqs[(<uint32_t>target - base) & self.mask]
                if srht_write_claim(&self.entries[target], target_seen):
                    break
            target = -1
            srht_cpu_relax()  # another capture wrote or is writing that slot: choose again
        if target < 0:
            srht_counter_add(&self.hdr.counters[COUNTER_INSERT_BUSY], 1)
            return False
        if refreshed:
            srht_counter_add(&self.hdr.counters[1], 1)
        elif evicted:
            srht_counter_add(&self.hdr.counters[2], 1)
        srht_write_slot(&self.entries[target], target_seen,
                        self.srh_area + <size_t>target * SRHT_SRH_MAX, key, sl, srh, srh_len, now)
        srht_counter_add(&self.hdr.counters[0], 1)
        return True

    def set_hmac(self, keys, bint require):
        """SRH HMAC for record_syn (the capture calls it once): ``keys`` maps key ids to
        secrets (None: no keyring, HMACs are not checked); ``require`` refuses SYNs
        without a valid one. Same rules as srhstack.syn_route."""
        self._check_writable()
        self.hmac_keys = dict(keys) if keys is not None else None
        self.require_hmac = require

    def record_syn(self, bytes packet):
        """The capture's per-SYN fast path (cext/synparse.h, cext/synbinding.h): parses a
        queued packet of a common shape in C, counts `syn_seen`, inserts the SRH this
        proxy acts on and returns the connection's (client address, client port, final
        destination, destination port), addresses as 16 bytes. Returns "hmac_refused"
        (counted) for a SYN whose HMAC is missing under --require-hmac, unknown or wrong:
        the capture drops it. Returns None, having counted nothing, for any other packet:
        the capture's Python path (capture.SynCapture.handle_payload) then decides."""
        cdef syn_info info
        cdef srht_key key
        self._check_writable()
        if syn_parse_fast(<const uint8_t *>PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet),
                          SRHT_SRH_MAX, &info) != SYN_FAST:
            return self._record_binding_syn(packet)
        if self.require_hmac:
            srht_counter_add(&self.hdr.counters[4], 1)  # syn_seen
            self.count("hmac_refused")
            return "hmac_refused"
        memcpy(key.client_addr, info.client, 16)
        memcpy(key.dest_addr, info.destination, 16)
        key.client_port = info.client_port
        key.dest_port = info.dest_port
        srht_counter_add(&self.hdr.counters[4], 1)  # syn_seen
        self._insert(&key, info.segments_left, info.srh, info.srh_len)
        return (PyBytes_FromStringAndSize(<char *>info.client, 16), info.client_port,
                PyBytes_FromStringAndSize(<char *>info.destination, 16), info.dest_port)

    cdef object _record_binding_syn(self, bytes packet):
        """record_syn for the shapes of synbinding.h: an HMAC'd SRH, or a binding's stacked
        pair, flattened (and signed again) here. The HMACs are Python's hmac.digest."""
        cdef syn_binding b
        cdef srht_key key
        cdef uint8_t flat[SRHT_SRH_MAX]
        cdef size_t flat_len, count
        cdef int64_t key_id = -1
        cdef const uint8_t *srh
        cdef uint16_t srh_len
        cdef uint8_t segments_left
        if syn_parse_binding(<const uint8_t *>PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet),
                             &b) != SYN_FAST:
            return None
        client = PyBytes_FromStringAndSize(<char *>b.client, 16)
        if b.hmac != NULL and self.hmac_keys is not None:
            key_id = (<int64_t>b.hmac[4] << 24) | (b.hmac[5] << 16) | (b.hmac[6] << 8) | b.hmac[7]
            secret = self.hmac_keys.get(key_id)
            count = <size_t>b.outer[4] + 1
            if secret is None or not _hmac.compare_digest(
                    _hmac.digest(secret, client + PyBytes_FromStringAndSize(<char *>b.outer + 4, 2)
                                 + PyBytes_FromStringAndSize(<char *>b.hmac + 4, 4)
                                 + PyBytes_FromStringAndSize(<char *>b.outer + 8, 16 * count),
                                 "sha256"),
                    PyBytes_FromStringAndSize(<char *>b.hmac + 8, 32)):
                return self._refuse()
        elif self.require_hmac:
            return self._refuse()
        if b.inner == NULL:
            if b.outer_len > SRHT_SRH_MAX:
                return None
            srh, srh_len, segments_left = b.outer, <uint16_t>b.outer_len, b.outer[3]
            destination = PyBytes_FromStringAndSize(<char *>b.outer + 8, 16)
        else:
            flat_len = syn_flatten(&b, flat, SRHT_SRH_MAX, key_id)
            if flat_len == 0:
                return None
            if key_id >= 0:
                count = <size_t>flat[4] + 1
                digest = _hmac.digest(self.hmac_keys[key_id],
                                      client + PyBytes_FromStringAndSize(<char *>flat + 4, 2)
                                      + PyBytes_FromStringAndSize(<char *>b.hmac + 4, 4)
                                      + PyBytes_FromStringAndSize(<char *>flat + 8, 16 * count),
                                      "sha256")
                memcpy(flat + flat_len - 32, PyBytes_AS_STRING(digest), 32)
            srh, srh_len, segments_left = flat, <uint16_t>flat_len, flat[3]
            destination = PyBytes_FromStringAndSize(<char *>flat + 8, 16)
            self.count("stacked")
        memcpy(key.client_addr, b.client, 16)
        memcpy(key.dest_addr, PyBytes_AS_STRING(destination), 16)
        key.client_port = b.client_port
        key.dest_port = b.dest_port
        srht_counter_add(&self.hdr.counters[4], 1)  # syn_seen
        self._insert(&key, segments_left, srh, srh_len)
        return (client, b.client_port, destination, b.dest_port)

    cdef object _refuse(self):
        srht_counter_add(&self.hdr.counters[4], 1)  # syn_seen
        self.count("hmac_refused")
        return "hmac_refused"

    def count(self, counter, n=1):
        """Adds n to writer counter `counter` (one of COUNTERS); the capture process's
        per-SYN counters live here so every reader sees them."""
        self._check_writable()
        index = COUNTER_INDEX.get(counter)
        if index is None:
            raise KeyError(f"unknown SRH table counter {counter!r}; known: {', '.join(COUNTERS)}")
        srht_counter_add(&self.hdr.counters[<int>index], <uint64_t>n)

    # ---- readers (and the writer) ----------------------------------------------------

    def lookup(self, client_addr, client_port, dest_addr, dest_port):
        """Returns (orig_segments_left, srh_bytes) for the key, or None when it is absent,
        expired or its slot stayed busy (see lookup_busy). Never blocks."""
        cdef srht_key key
        cdef srht_entry meta
        cdef uint8_t buf[SRHT_SRH_MAX]
        cdef int found
        self._check_open()
        _make_key(&key, client_addr, client_port, dest_addr, dest_port)
        if srht_load_relaxed_u32(&self.hdr.state) != SRHT_STATE_LIVE and not self.writable:
            self._maybe_reattach()
        # The GIL stays held: a lookup is a few hundred ns, and a close() from another
        # thread must not unmap the table under it.
        found = self._lookup(&key, &meta, buf)
        if found != 1:
            return None
        return (meta.orig_segments_left, PyBytes_FromStringAndSize(<char *>buf, meta.srh_len))

    cdef int _lookup(self, const srht_key *key, srht_entry *meta, uint8_t *buf) noexcept nogil:
        cdef uint64_t now = srht_now_ms()
        cdef uint32_t base = <uint32_t>(srht_hash(key, self.seed) & self.mask)
        cdef uint32_t i, idx
        cdef int found, retries = 0
        for i in range(<uint32_t>SRHT_PROBE):
            idx = (base + i) & self.mask
            found = srht_read_slot(&self.entries[idx], self.srh_area + <size_t>idx * SRHT_SRH_MAX,
                                   key, meta, buf, MAX_READ_TRIES, &retries)
            if found < 0:
                self.lookup_busy += 1
                continue
            if found == 1:
                self.lookup_retries += retries
                # The writer's clock reading may be a hair ahead of ours on another CPU.
                if now > meta.inserted_at_ms and now - meta.inserted_at_ms >= self.ttl:
                    return 0
                return 1
            if meta.inserted_at_ms == 0:
                break
        self.lookup_retries += retries
        return 0

    cdef _maybe_reattach(self):
        """The capture process restarted and retired this table: move to the new one."""
        cdef SrhTable fresh
        cdef uint64_t now = srht_now_ms()
        if now < self.next_reattach_ms:
            return
        self.next_reattach_ms = now + REATTACH_INTERVAL_MS
        try:
            fresh = SrhTable._attach_once(self.name)
        except SrhTableError:
            return  # not created yet: keep answering from the old one until it is
        munmap(self.base, self.size)
        self.base, self.size, self.hdr = fresh.base, fresh.size, fresh.hdr
        fresh.base = NULL
        fresh.hdr = NULL
        self._bind_header()
        self.reattaches += 1

    @property
    def stale(self):
        """True when a newer table of the same name retired this one."""
        self._check_open()
        return srht_load_relaxed_u32(&self.hdr.state) != SRHT_STATE_LIVE

    @property
    def nslots(self):
        self._check_open()
        return self.hdr.nslots

    @property
    def ttl_ms(self):
        self._check_open()
        return self.hdr.ttl_ms

    @property
    def writer_pid(self):
        self._check_open()
        return self.hdr.writer_pid

    @property
    def segment(self):
        return segment_name(self.name)

    def used(self):
        """Slots holding a live (unexpired) entry: a scan of the metadata (nslots x 64 B)."""
        cdef uint64_t now = srht_now_ms()
        cdef uint64_t at, n = 0
        cdef uint32_t i
        self._check_open()
        for i in range(self.mask + 1):
            at = srht_load_relaxed_u64(&self.entries[i].inserted_at_ms)
            if at != 0 and (now <= at or now - at < self.ttl):
                n += 1
        return n

    def counters(self):
        """Writer counters (COUNTERS) plus nslots, used (live entries) and ttl_ms. Works
        for readers too: this is how the master shows the capture process's counters."""
        self._check_open()
        result = {counter: srht_load_relaxed_u64(&self.hdr.counters[index])
                  for index, counter in enumerate(COUNTERS)}
        result["nslots"] = self.hdr.nslots
        result["used"] = self.used()
        result["ttl_ms"] = self.hdr.ttl_ms
        return result

    # ---- teardown --------------------------------------------------------------------

    def prefault(self):
        """Maps every page of the table into this process now (MADV_POPULATE_*), so that no
        insert or lookup takes a page fault later. Call it in each process after fork():
        a child does not inherit the page tables of a shared mapping, and a table slot
        first touched by a SYN otherwise costs that SYN a fault per process (the capture
        and every worker). Also commits the table's memory up front. Returns False on a
        kernel without MADV_POPULATE (the pages then fault in as used)."""
        self._check_open()
        if madvise(self.base, self.size,
                   MADV_POPULATE_WRITE if self.writable else MADV_POPULATE_READ) == 0:
            return True
        if errno == 22:  # EINVAL: the kernel predates MADV_POPULATE
            return False
        raise OSError(errno, f"cannot prefault the SRH table: {os.strerror(errno)}")

    def close(self):
        """Unmaps the table (idempotent). The segment stays until unlink()."""
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
            self.hdr = NULL

    def unlink(self):
        """Writer: marks the table retired (readers stop using it) and removes its name."""
        if self.base != NULL and self.writable:
            srht_store_release_u32(&self.hdr.state, SRHT_STATE_RETIRED)
        unlink(self.name)

    @property
    def closed(self):
        return self.base == NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        if self.base == NULL:
            return f"<SrhTable {self.name!r} closed>"
        role = "writer" if self.writable else "reader"
        return f"<SrhTable {self.name!r} {role} nslots={self.hdr.nslots} ttl_ms={self.hdr.ttl_ms}>"


cdef _retire(name):
    """Marks an existing segment of this name retired, then unlinks it; readers still mapping
    it notice and attach the table that replaces it."""
    cdef srht_header *hdr
    cdef void *addr
    segment = segment_name(name)
    try:
        shm = posix_ipc.SharedMemory(segment, 0)
    except posix_ipc.ExistentialError:
        return
    try:
        if shm.size >= SRHT_HEADER_SIZE:
            addr = mmap(NULL, SRHT_HEADER_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, shm.fd, 0)
            if addr != MAP_FAILED:
                hdr = <srht_header *>addr
                if srht_load_acquire_u64(&hdr.magic) == SRHT_MAGIC:
                    srht_store_release_u32(&hdr.state, SRHT_STATE_RETIRED)
                munmap(addr, SRHT_HEADER_SIZE)
    finally:
        shm.close_fd()
    unlink(name)
