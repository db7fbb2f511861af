"""pipes-run's pure parts: which names a command line steers, the file the library reads."""
import ipaddress
import os
import subprocess
import sys

from srv6pipes import client, preload
from srv6pipes.controller.dnsquery import Answer


def test_hosts_in_takes_url_host_names_once_and_skips_addresses():
    command = ["curl", "-H", "Host: x", "http://www.campus.lab/a", "https://user@api.lab:8443/b",
               "http://www.campus.lab/c", "http://10.0.0.1/", "http://[fd00::1]:80/", "ftp.lab"]
    assert preload.hosts_in(command) == ["www.campus.lab", "api.lab"]


def test_routes_text_has_name_address_srh_and_mss_per_line():
    answer = Answer(server=ipaddress.IPv6Address("fd00:d::1"), bsid=ipaddress.IPv6Address(
        "fd00:a1::b:1"), chain=("encrypt", "decrypt"), lifetime=60, overhead=40)
    res = client.Resolution(answer, ttl=30, expires_at=0.0)
    name, address, srh, mss = preload.routes_text({"www.campus.lab": res}, 1500).split()
    assert (name, address) == ("www.campus.lab", "fd00:d::1")
    assert bytes.fromhex(srh) == res.srh_bytes()
    assert int(mss) == 1500 - 40 - 20 - len(res.srh_bytes()) - 40


def test_the_library_answers_a_listed_name_for_ipv6_only(tmp_path):
    """The library gives a listed name the controller's address, and nothing at all when
    IPv4 is asked for (fail closed: the resolver's IPv4 address would skip the chain).
    localhost is listed, so the real resolver would have an IPv4 answer."""
    routes = tmp_path / "routes"
    routes.write_text("localhost fd00:d::1 " + bytes(24).hex() + " 1400\n")
    probe = ("import socket\n"
             "print(socket.getaddrinfo('localhost', 80, socket.AF_INET6)[0][4][0])\n"
             "try:\n"
             "    print(socket.getaddrinfo('localhost', 80, socket.AF_INET))\n"
             "except socket.gaierror as exc:\n"
             "    print('refused', exc.errno == socket.EAI_NONAME)\n")
    env = dict(os.environ, SRV6PIPES_ROUTES=str(routes), LD_PRELOAD=preload.LIBRARY)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[:2] == ["fd00:d::1", "refused True"], out

