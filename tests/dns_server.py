"""A tiny authoritative DNS server for tests, on 127.0.0.1 (UDP and TCP).

usage: dns_server.py PORT ZONE.json
ZONE.json is a list of [name, type, value]: type A, AAAA, MX ("10 host."),
or TXT (the whole string; split into 255-byte strings on the wire).
Names not in the zone get NXDOMAIN. Exits when its stdin closes, so the test
that started it stops it just by dropping the handle.
"""
import json
import sys

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A
from dnslib.server import BaseResolver, DNSServer


def norm(name):
    return name.lower().rstrip(".") + "."


class ZoneResolver(BaseResolver):
    def __init__(self, zone):
        self.zone = [(norm(n), t.upper(), v) for n, t, v in zone]

    def resolve(self, request, handler):
        reply = request.reply()
        qname = norm(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        known = False
        for name, typ, val in self.zone:
            if name != qname:
                continue
            known = True
            if typ != qtype:
                continue
            if typ == "A":
                rdata = A(val)
            elif typ == "AAAA":
                rdata = AAAA(val)
            elif typ == "MX":
                pref, host = val.split()
                rdata = MX(host, int(pref))
            elif typ == "TXT":
                raw = val.encode()
                rdata = TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
            else:
                continue
            reply.add_answer(RR(qname, getattr(QTYPE, typ), rdata=rdata, ttl=60))
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


def main():
    port = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        zone = json.load(f)
    resolver = ZoneResolver(zone)
    servers = [DNSServer(resolver, port=port, address="127.0.0.1", tcp=tcp) for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    print("ready", flush=True)
    sys.stdin.read()
    for s in servers:
        s.stop()


if __name__ == "__main__":
    main()
