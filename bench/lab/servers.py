"""The servers in s: lighttpd (port 80) with generated files, iperf3 -s (port 5201) and
the blast sink (port 5202, see blast.py).

Started once per testbed, before any mode, and stopped with the testbed; the middlebox
modes change only p1 and the client's route.
"""
import hashlib
import os
import sys

from srv6pipes.lab.apps import Lighttpd, wait_listening

HTTP_PORT = 80
IPERF_PORT = 5201
BLAST_PORT = 5202
BLAST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blast.py")
# The paper's Fig. 6-8 file sizes (run_lab.py uses three of them).
FILES = {"1KB": 1024, "10KB": 10 * 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024,
         "10MB": 10 * 1024 * 1024}

class Servers:
    def __init__(self, tb, workdir, pinning):
        self.tb, self.workdir, self.pinning = tb, workdir, pinning
        self.host = tb.hosts["s"]
        self.root = os.path.join(workdir, "www")
        self.sha256 = {}

    def start(self):
        """Generate the files, start both servers pinned, wait until they listen."""
        os.makedirs(self.root, exist_ok=True)
        for name, size in FILES.items():
            data = os.urandom(size)
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(data)
            self.sha256[name] = hashlib.sha256(data).hexdigest()
        pin = self.pinning.taskset(self.pinning.server_cpus)
        Lighttpd(self.host, self.root, HTTP_PORT, access_log=False, prefix=tuple(pin),
                 workdir=self.workdir)
        self.host.popen([*pin, "iperf3", "-s", "-p", str(IPERF_PORT)],
                        stdout=open(os.path.join(self.workdir, "iperf3-server.log"), "w"),
                        stderr=open(os.path.join(self.workdir, "iperf3-server.err"), "w"))
        self.host.popen([*pin, sys.executable, BLAST, "serve", str(BLAST_PORT)])
        for port in (IPERF_PORT, BLAST_PORT):
            wait_listening(self.host, port)

    def url(self, name):
        return f"http://[{self.host.addr}]:{HTTP_PORT}/{name}"
