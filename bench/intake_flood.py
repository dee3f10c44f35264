"""A flood at the [bounces] intake, and what the platform sees meanwhile.

Runs its own SMTP sink (herald's upstream) on SINK_PORT. First the platform
sends one message to three recipients; the sink notes each one's return
path. Then FLOODERS threads, each from its own loopback address
(127.0.0.10, .11, ...), send REPORTS reports of SIZE_MIB MiB of junk in all
to the complaint address, reconnecting when turned away. Meanwhile:
  - a probe sends the platform a small message every 50 ms and times the
    whole transaction (connect to QUIT);
  - herald's RSS is sampled every 100 ms;
  - at a quarter, half and three quarters of the flood, a genuine bounce
    (a real Postfix DSN) for one of the three recipients arrives from
    127.0.0.200.
Then it waits for the three bounces to be applied and prints one RESULT
line: reports accepted / refused, platform p50/p99/max, peak RSS, stored
bytes against max_stored, bounces applied.
usage: intake_flood.py HERALD_BIN CONFIG HERALD_PID SMTP_PORT INTAKE_PORT
       SINK_PORT REPORTS FLOODERS SIZE_MIB DSN_FILE
"""
import json, os, socket, smtplib, subprocess, sys, threading, time

(herald, config, pid, sport, iport, kport, reports, flooders, size_mib, dsn_file) = sys.argv[1:11]
pid, sport, iport, kport = int(pid), int(sport), int(iport), int(kport)
reports, flooders, size_mib = int(reports), int(flooders), int(size_mib)
DOMAIN = "bounces.bench.test"

paths = {}
lock = threading.Lock()


def sink():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", kport))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=sink_session, args=(conn,), daemon=True).start()


def sink_session(conn):
    f = conn.makefile("rb")
    say = lambda s: conn.sendall(s.encode() + b"\r\n")
    say("220 sink")
    frm = None
    while True:
        line = f.readline()
        if not line:
            return
        cmd = line.strip()
        up = cmd.upper()
        if up.startswith(b"EHLO"):
            conn.sendall(b"250-sink\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n")
        elif up.startswith(b"MAIL FROM:"):
            frm = cmd[10:].strip(b"<> ").decode()
            say("250 ok")
        elif up.startswith(b"RCPT TO:"):
            with lock:
                paths[cmd[8:].strip(b"<> ").decode()] = frm
            say("250 ok")
        elif up == b"DATA":
            say("354 go")
            while True:
                l = f.readline()
                if l == b".\r\n" or not l:
                    break
            say("250 ok")
        elif up == b"QUIT":
            say("221 bye")
            return
        else:
            say("250 ok")


def cli(*args):
    out = subprocess.run([herald, "--config", config, *args], capture_output=True, text=True)
    return out.stdout


def status():
    return json.loads(cli("status", "--json"))


def rss_kb(field):
    with open("/proc/%d/status" % pid) as f:
        for l in f:
            if l.startswith(field + ":"):
                return int(l.split()[1])
    return 0


threading.Thread(target=sink, daemon=True).start()
time.sleep(0.2)
GENUINE = ["g1@dest.bench", "g2@dest.bench", "g3@dest.bench"]
with smtplib.SMTP("127.0.0.1", sport) as s:
    s.sendmail("app@platform.bench", GENUINE, "Subject: hello\r\n\r\nhello\r\n")
for _ in range(200):
    with lock:
        if all(g in paths for g in GENUINE):
            break
    time.sleep(0.05)
else:
    sys.exit("the platform's message did not reach the sink")

junk_line = b"x" * 76 + b"\r\n"
JUNK = b"Subject: junk\r\n\r\n" + junk_line * (size_mib * 1024 * 1024 // len(junk_line))
DSN = open(dsn_file, "rb").read()
codes = {}
done = [0]
stop = threading.Event()


class Raw:
    """A bare SMTP client: the flood's bytes cost its sender as little CPU
    as possible (a real flood comes from elsewhere)."""

    def __init__(self, src):
        self.s = socket.create_connection(("127.0.0.1", iport), timeout=60, source_address=(src, 0))
        self.f = self.s.makefile("rb")
        self.reply()
        self.cmd(b"EHLO flood.bench")

    def reply(self):
        while True:
            l = self.f.readline()
            if not l:
                raise OSError("closed")
            if l[3:4] != b"-":
                return int(l[:3])

    def cmd(self, line):
        self.s.sendall(line + b"\r\n")
        return self.reply()

    def report(self, to, body):
        c = self.cmd(b"MAIL FROM:<>")
        if c != 250:
            return c
        c = self.cmd(b"RCPT TO:<" + to.encode() + b">")
        if c != 250:
            self.cmd(b"RSET")
            return c
        c = self.cmd(b"DATA")
        if c != 354:
            return c
        self.s.sendall(body + b".\r\n")
        return self.reply()


def flood(i):
    src = "127.0.0.%d" % (10 + i)
    share = reports // flooders + (1 if i < reports % flooders else 0)
    sent = 0
    c = None
    while sent < share:
        try:
            if c is None:
                c = Raw(src)
            code = c.report("fbl@" + DOMAIN, JUNK)
        except OSError:
            code = "disconnected"
            c = None
            time.sleep(0.05)
        if code == 421:
            c = None
        with lock:
            codes[code] = codes.get(code, 0) + 1
            done[0] += 1
        sent += 1


latencies = []


def probe():
    n = 0
    while not stop.is_set():
        t = time.monotonic()
        with smtplib.SMTP("127.0.0.1", sport, timeout=30) as s:
            s.sendmail("app@platform.bench", ["p%d@dest.bench" % n], "Subject: probe\r\n\r\nprobe\r\n")
        latencies.append(time.monotonic() - t)
        n += 1
        time.sleep(0.05)


peak = [0]


def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kb("VmRSS"))
        time.sleep(0.1)


genuine_codes = []


def genuine():
    for k, g in enumerate(GENUINE):
        while done[0] < reports * (k + 1) // 4 and not stop.is_set():
            time.sleep(0.05)
        for _ in range(100):
            try:
                with smtplib.SMTP("127.0.0.1", iport, source_address=("127.0.0.200", 0), timeout=60) as s:
                    s.sendmail("", [paths[g]], DSN)
                genuine_codes.append(250)
                break
            except smtplib.SMTPResponseException as e:
                genuine_codes.append(e.smtp_code)
                time.sleep(1)


# The platform's latency with no flood, for comparison.
baseline = []
for n in range(40):
    t = time.monotonic()
    with smtplib.SMTP("127.0.0.1", sport, timeout=30) as s:
        s.sendmail("app@platform.bench", ["b%d@dest.bench" % n], "Subject: probe\r\n\r\nprobe\r\n")
    baseline.append(time.monotonic() - t)
    time.sleep(0.05)
baseline.sort()
base_rss = rss_kb("VmRSS")
started = time.monotonic()
aux = [threading.Thread(target=f, daemon=True) for f in (probe, sample, genuine)]
for t in aux:
    t.start()
workers = [threading.Thread(target=flood, args=(i,)) for i in range(flooders)]
for t in workers:
    t.start()
for t in workers:
    t.join()
flood_s = time.monotonic() - started
aux[2].join(timeout=120)
# The three bounces applied (counted since start).
applied = 0
for _ in range(600):
    applied = status()["reports"]["since_start"].get("bounced", 0)
    if applied >= 3:
        break
    time.sleep(0.1)
stop.set()
time.sleep(0.3)
st = status()["reports"]
lat = sorted(latencies)
pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print("RESULT no flood: p50_ms=%.1f p99_ms=%.1f" % (baseline[len(baseline) // 2] * 1000, baseline[-1] * 1000))
print("RESULT reports=%d flood_s=%.1f codes=%s probes=%d p50_ms=%.1f p99_ms=%.1f max_ms=%.1f "
      "rss_before_mb=%.0f peak_rss_mb=%.0f hwm_mb=%.0f stored_mb=%.1f max_stored_mb=%.1f "
      "genuine_bounces_applied=%d/3 genuine_replies=%s"
      % (reports, flood_s, json.dumps(codes, sort_keys=True, default=str), len(lat), pct(0.5), pct(0.99),
         lat[-1] * 1000, base_rss / 1024, peak[0] / 1024, rss_kb("VmHWM") / 1024,
         st["stored_bytes"] / 1048576, st["max_stored"] / 1048576, applied, genuine_codes))
