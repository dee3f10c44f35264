#!/usr/bin/env python3
"""Time from the client's final dot to the relay's reply, per message.

usage: latency.py HOST:PORT MESSAGES SESSIONS [SIZE]

SESSIONS threads each open one SMTP session and send their share of
MESSAGES (SIZE bytes of body, default 4096) one transaction after another.
For each message the clock starts when the last line ("." CRLF) has been
handed to the kernel and stops when the whole reply to it has been read:
the relay's work at the end of DATA (for herald and Postfix alike: the
message on disk, fsynced, before 250). Prints p50, p90, p99 and max in ms,
and the count of replies that were not 250.
"""
import socket
import sys
import threading
import time


def reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), lines


def session(addr, count, body, times, failures, lock):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    reply(f)
    s.sendall(b"EHLO latency.test\r\n")
    reply(f)
    mine = []
    bad = 0
    for _ in range(count):
        s.sendall(b"MAIL FROM:<app@platform.test>\r\nRCPT TO:<to@example.com>\r\nDATA\r\n")
        reply(f)
        reply(f)
        code, _ = reply(f)
        if code != 354:
            bad += 1
            continue
        s.sendall(body)
        t0 = time.perf_counter()
        s.sendall(b".\r\n")
        code, _ = reply(f)
        mine.append(time.perf_counter() - t0)
        if code != 250:
            bad += 1
    s.sendall(b"QUIT\r\n")
    s.close()
    with lock:
        times.extend(mine)
        failures[0] += bad


def main():
    addr, n, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 4096
    line = b"x" * 70 + b"\r\n"
    body = b"From: app@platform.test\r\nTo: to@example.com\r\nSubject: latency\r\n\r\n"
    body += line * max(1, size // len(line))
    times, failures, lock = [], [0], threading.Lock()
    threads = [
        threading.Thread(target=session, args=(addr, n // sessions, body, times, failures, lock))
        for _ in range(sessions)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1000
    print(
        f"messages {len(times)} p50 {pick(0.50):.2f} ms p90 {pick(0.90):.2f} ms "
        f"p99 {pick(0.99):.2f} ms max {times[-1] * 1000:.2f} ms not-250 {failures[0]}"
    )


if __name__ == "__main__":
    main()
