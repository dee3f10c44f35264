"""Independent DKIM check for the tests, with dkimpy (and pynacl for Ed25519).

usage: dkim_verify.py MESSAGE_FILE NAME=RECORD [NAME=RECORD ...]
The records are served to dkimpy by a stub instead of DNS. Prints
"pass d=<domain> s=<selector> a=<algorithm>" and exits 0, or prints why and
exits 1.
"""
import sys

import dkim


def main():
    with open(sys.argv[1], "rb") as f:
        msg = f.read()
    records = {}
    for arg in sys.argv[2:]:
        name, record = arg.split("=", 1)
        records[name.rstrip(".").lower()] = record.encode()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip(".").lower(), b"")

    d = dkim.DKIM(msg)
    ok = d.verify(dnsfunc=dnsfunc)
    if ok:
        print("pass d=%s s=%s a=%s" % (d.domain.decode(), d.selector.decode(), d.signature_fields[b"a"].decode()))
        sys.exit(0)
    print("fail", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
