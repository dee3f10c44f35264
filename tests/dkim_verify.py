"""Independent DKIM check for the tests, with dkimpy (and pynacl for Ed25519).

usage: dkim_verify.py MESSAGE_FILE [MESSAGE_FILE ...] NAME=RECORD [NAME=RECORD ...]
The records are served to dkimpy by a stub instead of DNS. For each message,
in order, prints "pass d=<domain> s=<selector> a=<algorithm>" or "fail";
exits 0 when every message passed, else 1.
"""
import sys

import dkim


def main():
    records = {}
    files = []
    for arg in sys.argv[1:]:
        if "=" in arg:
            name, record = arg.split("=", 1)
            records[name.rstrip(".").lower()] = record.encode()
        else:
            files.append(arg)

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip(".").lower(), b"")

    failed = False
    for path in files:
        with open(path, "rb") as f:
            msg = f.read()
        d = dkim.DKIM(msg)
        if d.verify(dnsfunc=dnsfunc):
            print("pass d=%s s=%s a=%s" % (d.domain.decode(), d.selector.decode(), d.signature_fields[b"a"].decode()))
        else:
            print("fail")
            failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
