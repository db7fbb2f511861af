#!/usr/bin/env python3
"""A payload-agnostic bulk TCP sender and sink, for functions that change the bytes.

iperf3 cannot cross a function that rewrites the stream: every connection starts with a
cookie (and the control connection with JSON) that the server checks. This tool never
looks at the payload: the sink reads until EOF and closes; the sender writes for the given
time, half-closes, waits for the sink's EOF (so every byte was delivered) and prints JSON.

    blast.py serve PORT
    blast.py send HOST PORT SECONDS STREAMS

Python is not in the way: each call moves up to 1 MiB and releases the GIL in the kernel.
"""
import json
import socket
import sys
import threading
import time

CHUNK = 1 << 20


def serve(port):
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", port))
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=sink, args=(conn,), daemon=True).start()


def sink(conn):
    buf = bytearray(CHUNK)
    with conn:
        while conn.recv_into(buf):
            pass


def send(host, port, seconds, streams):
    payload = bytes(range(256)) * (CHUNK // 256)
    sent = [0] * streams
    errors = []
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(streams)]
    start = time.monotonic()
    deadline = start + seconds

    def pump(i, sock):
        try:
            while time.monotonic() < deadline:
                sock.sendall(payload)
                sent[i] += len(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            while sock.recv(65536):     # the sink sends nothing: this waits for its EOF
                pass
        except OSError as exc:
            errors.append(str(exc))
        finally:
            sock.close()

    threads = [threading.Thread(target=pump, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    print(json.dumps({"bytes": sum(sent), "seconds": elapsed,
                      "bits_per_second": sum(sent) * 8 / elapsed, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        sys.exit(send(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
