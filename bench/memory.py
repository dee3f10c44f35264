"""Peak memory of herald while N sessions each send a large message at once.

Runs its own sink (upstream) on SINK_PORT, sends N messages of SIZE bytes to
herald at HERALD_PORT from N threads released together, waits until the sink
has every message, checks each body is intact (SHA-256 of the body as
sent), and prints herald's peak RSS (VmHWM) and its RSS afterwards.
usage: memory.py HERALD_PID HERALD_PORT SINK_PORT N SIZE_MIB
"""
import base64, hashlib, os, smtplib, socket, sys, threading, time

pid, hport, sport, n, size_mib = (int(a) for a in sys.argv[1:6])
size = size_mib * 1024 * 1024

received = {}
lock = threading.Lock()

def sink_session(conn):
    f = conn.makefile("rb")
    def say(s):
        conn.sendall(s.encode() + b"\r\n")
    say("220 sink")
    while True:
        line = f.readline()
        if not line:
            return
        cmd = line.strip().upper()
        if cmd.startswith(b"EHLO"):
            conn.sendall(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
        elif cmd == b"DATA":
            say("354 go")
            h = hashlib.sha256()
            in_body = False
            subject = None
            while True:
                l = f.readline()
                if l == b".\r\n" or not l:
                    break
                if l.startswith(b"."):
                    l = l[1:]
                if in_body:
                    h.update(l)
                elif l == b"\r\n":
                    in_body = True
                elif l.lower().startswith(b"subject:"):
                    subject = l.split(b":", 1)[1].strip().decode()
            with lock:
                received.setdefault(subject, []).append(h.hexdigest())
            say("250 ok")
        elif cmd == b"QUIT":
            say("221 bye")
            return
        else:
            say("250 ok")

def sink():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", sport))
    srv.listen(64)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=sink_session, args=(c,), daemon=True).start()

threading.Thread(target=sink, daemon=True).start()

def body(i):
    # Lines of 76 characters, distinct per message, built once.
    seed = hashlib.sha256(str(i).encode()).digest()
    line = base64.b64encode(seed * 2)[:76] + b"\r\n"
    return line * (size // len(line))

bodies = [body(i) for i in range(n)]
want = {f"m{i}": hashlib.sha256(bodies[i]).hexdigest() for i in range(n)}
start = threading.Barrier(n)
errors = []

def send(i):
    msg = f"From: app@platform.test\r\nTo: u{i}@dest.test\r\nSubject: m{i}\r\n\r\n".encode() + bodies[i]
    start.wait()
    try:
        with smtplib.SMTP("127.0.0.1", hport, timeout=600) as s:
            s.sendmail("app@platform.test", [f"u{i}@dest.test"], msg)
    except Exception as e:
        errors.append((i, repr(e)))

def status(field):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith(field):
                return int(l.split()[1]) // 1024
    return -1

before = status("VmRSS")
t0 = time.time()
threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
accepted = time.time() - t0
accept_only = os.environ.get("ACCEPT_ONLY") == "1"
if accept_only:
    print(f"ACCEPTED peak_rss_mb={status('VmHWM')} rss_mb={status('VmRSS')} errors={errors[:3]}")
    sys.exit(0)
while len(received) < n and time.time() - t0 < 600:
    time.sleep(0.2)
delivered = time.time() - t0
time.sleep(2)
intact = sum(1 for k, v in want.items() if received.get(k, [None])[0] == v)
dups = sum(len(v) - 1 for v in received.values())
print(f"RESULT sessions={n} size_mib={size_mib} accepted_s={accepted:.1f} delivered_s={delivered:.1f} "
      f"intact={intact}/{n} duplicates={dups} errors={len(errors)} rss_before_mb={before} "
      f"peak_rss_mb={status('VmHWM')} rss_after_mb={status('VmRSS')}")
for e in errors[:5]:
    print("error", e)
sys.exit(0 if intact == n and not errors else 1)
