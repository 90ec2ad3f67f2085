#!/usr/bin/env python3
# The load .ci/nodrop-check puts on echo-forkd: N long conversations and a
# loop of short connections, in one thread on epoll (the standard library
# only: it runs from the host's /usr inside the container).
#
# Each conversation connects once (from 127.0.0.1..127.0.0.16, bound before
# connect, so ephemeral ports and TIME_WAIT never run short), then pings:
# a unique 16-byte message (conversation id + sequence), read back exactly,
# every `interval` = max(0.05, N/4000) s from a random start (about 4,000
# pings a second in all, whatever N). Conversations connect at most
# --inflight at a time (connected, first echo not back yet), so the
# daemon's listen backlog (1024) is never overrun. Alongside, the connect
# loop: one short connection at a time (connect, one exchange,
# shutdown(SHUT_WR), EOF), every 10 ms, and the longest time between two
# connects served.
#
# Control: --ready FILE is written once every conversation is established
# (or failed); SIGUSR2 records a mark (the driver sends one when it acts,
# another when it acts again: waits and gaps are reported per phase between
# marks); SIGUSR1 (or --duration after ready) finishes: each conversation,
# at its next turn, does shutdown(SHUT_WR) and must read EOF within
# --eof-timeout. --max-time bounds the whole run whatever happens.
#
# Each conversation ends in exactly one of: whole, cut (EOF or wrong bytes
# before the end), reset, refused, stalled (no echo within --stall), noeof
# (no EOF after our shutdown within --eof-timeout). The JSON written to
# --out has the counts, the longest ping wait and connect gap (overall
# after ready, and per phase), the first failures, and our own CPU use.
import argparse
import errno
import heapq
import json
import os
import random
import resource
import select
import signal
import socket
import sys
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

ap = argparse.ArgumentParser()
ap.add_argument("-n", type=int, default=1000, help="conversations")
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, default=7)
ap.add_argument("--sources", type=int, default=16, help="source addresses 127.0.0.1..N")
ap.add_argument("--interval", type=float, default=None, help="seconds between two pings of one conversation")
ap.add_argument("--inflight", type=int, default=256, help="conversations connecting at once")
ap.add_argument("--stall", type=float, default=5.0, help="an echo later than this is a stall")
ap.add_argument("--ramp-stall", type=float, default=30.0, help="the same for connecting and the first echo")
ap.add_argument("--eof-timeout", type=float, default=5.0)
ap.add_argument("--loop-every", type=float, default=0.01, help="the connect loop's pace")
ap.add_argument("--duration", type=float, default=None, help="finish this long after ready (else on SIGUSR1)")
ap.add_argument("--max-time", type=float, default=600.0, help="hard bound on the whole run")
ap.add_argument("--ready", default=None, help="file written once every conversation is established")
ap.add_argument("--tasks-file", default=None, help="a pids.current to sample (peak reported)")
ap.add_argument("--out", default="-")
ap.add_argument("--max-failures", type=int, default=12)
a = ap.parse_args()

N = a.n
interval = a.interval if a.interval else max(0.05, N / 4000.0)
sources = ["127.0.0.%d" % (1 + i) for i in range(max(1, a.sources))]
target = (a.host, a.port)

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard == resource.RLIM_INFINITY or hard > soft:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
if nofile != resource.RLIM_INFINITY and nofile < N + 64:
    sys.exit("nodrop-load: RLIMIT_NOFILE %d is too low for %d conversations" % (nofile, N))

T0 = time.time()
now = time.monotonic
M0 = now()
marks = []          # monotonic times of SIGUSR2
finishing = [False]


def rel(t):
    return round(t - M0, 3)


def wall(t):
    w = T0 + (t - M0)
    return time.strftime("%H:%M:%S", time.localtime(w)) + ".%03d" % int((w % 1) * 1000)


def on_usr1(sig, frm):
    finishing[0] = True


def on_usr2(sig, frm):
    marks.append(now())


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)

ep = select.epoll()
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLLERR, EPOLLHUP = select.EPOLLERR, select.EPOLLHUP

KINDS = ("whole", "cut", "reset", "refused", "stalled", "noeof")
counts = {k: 0 for k in KINDS}
failures = []
pings = 0
# ping waits: overall after ready, and per phase (index = marks so far)
maxwait = [0.0, None, -1]   # value, monotonic time of the echo, conversation
phase_wait = {}
ramp_first_echo = 0.0
t_ready = None
t_finish = None


def phase():
    return len(marks)


by_kind = {}        # the first few failures of each kind


def fail(cid, kind, seq, what, t):
    counts[kind] += 1
    x = {"id": cid, "kind": kind, "seq": seq, "t": rel(t), "at": wall(t), "what": what}
    if len(failures) < a.max_failures:
        failures.append(x)
    k = by_kind.setdefault(kind, [])
    if len(k) < 3:
        k.append(x)


def classify(e):
    n = e.errno if isinstance(e, OSError) else e
    if n == errno.ECONNREFUSED:
        return "refused"
    if n == errno.ETIMEDOUT:
        return "stalled"
    return "reset"


def new_socket(i):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((sources[i % len(sources)], 0))
    return s


# --- conversations -------------------------------------------------------
CONNECTING, WAIT, IDLE, CLOSING, DONE = range(5)


class Conv:
    __slots__ = ("cid", "s", "fd", "state", "seq", "msg", "got", "sent_at", "deadline", "first", "out")


convs = {}          # fd -> Conv (open ones)
timers = []         # (monotonic due, cid) for IDLE conversations
by_id = [None] * N
next_cid = 0
pending = 0         # connecting, or first echo not back
established = 0
ended = 0           # conversations that reached DONE


def close_conv(c, kind, what, t):
    global ended, pending
    if c.state == DONE:
        return
    if c.first:
        pending -= 1
        c.first = False
    if kind != "whole":
        fail(c.cid, kind, c.seq, what, t)
    else:
        counts["whole"] += 1
    c.state = DONE
    ended += 1
    if c.s is not None:
        try:
            ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        convs.pop(c.fd, None)
        c.s.close()
        c.s = None


def open_conv():
    global next_cid, pending
    cid = next_cid
    next_cid += 1
    c = Conv()
    c.cid, c.seq, c.got, c.first, c.out = cid, 0, b"", True, b""
    by_id[cid] = c
    pending += 1
    t = now()
    try:
        s = new_socket(cid)
    except OSError as e:
        c.s, c.state = None, CONNECTING
        close_conv(c, "reset", "socket/bind: %s" % e, t)
        return
    c.s, c.fd, c.state = s, s.fileno(), CONNECTING
    c.deadline = t + a.ramp_stall
    convs[c.fd] = c
    err = s.connect_ex(target)
    if err not in (0, errno.EINPROGRESS):
        close_conv(c, classify(err), "connect: %s" % os.strerror(err), t)
        return
    ep.register(c.fd, EPOLLOUT | EPOLLIN)


def send_ping(c, t):
    global pending
    c.msg = b"%08d%08d" % (c.cid, c.seq)
    c.got = b""
    c.sent_at = t
    c.state = WAIT
    c.deadline = t + (a.ramp_stall if c.first else a.stall)
    try:
        n = c.s.send(c.msg)
    except BlockingIOError:
        n = 0
    except OSError as e:
        close_conv(c, classify(e), "send: %s" % e, t)
        return
    if n < len(c.msg):
        c.out = c.msg[n:]
        ep.modify(c.fd, EPOLLIN | EPOLLOUT)


def start_close(c, t):
    try:
        c.s.shutdown(socket.SHUT_WR)
    except OSError as e:
        close_conv(c, classify(e), "shutdown: %s" % e, t)
        return
    c.state = CLOSING
    c.deadline = t + a.eof_timeout


def conv_event(c, ev, t):
    global pings, pending, established, ramp_first_echo
    if c.state == CONNECTING:
        err = c.s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            close_conv(c, classify(err), "connect: %s" % os.strerror(err), t)
            return
        if not ev & EPOLLOUT:
            return
        ep.modify(c.fd, EPOLLIN)
        send_ping(c, t)
        return
    if ev & EPOLLOUT and c.out:
        try:
            n = c.s.send(c.out)
            c.out = c.out[n:]
        except BlockingIOError:
            pass
        except OSError as e:
            close_conv(c, classify(e), "send: %s" % e, t)
            return
        if not c.out:
            ep.modify(c.fd, EPOLLIN)
    if not ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
        return
    try:
        data = c.s.recv(4096)
    except BlockingIOError:
        return
    except OSError as e:
        close_conv(c, classify(e), "recv: %s" % e, t)
        return
    if c.state == CLOSING:
        if data:
            close_conv(c, "cut", "bytes after our shutdown: %r" % data[:32], t)
        else:
            close_conv(c, "whole", "", t)
        return
    if not data:
        close_conv(c, "cut", "EOF %s" % ("waiting for an echo" if c.state == WAIT else "between pings"), t)
        return
    if c.state != WAIT:
        close_conv(c, "cut", "unasked bytes %r" % data[:32], t)
        return
    c.got += data
    if not c.msg.startswith(c.got):
        close_conv(c, "cut", "wrong bytes %r for %r" % (c.got[:32], c.msg), t)
        return
    if len(c.got) < len(c.msg):
        return
    # one ping whole
    w = t - c.sent_at
    pings += 1
    if c.first:
        c.first = False
        pending -= 1
        established += 1
        ramp_first_echo = max(ramp_first_echo, w)
        nxt = t + random.uniform(0, interval)
    else:
        if t_ready is not None:
            if w > maxwait[0]:
                maxwait[:] = [w, t, c.cid]
            p = phase()
            if w > phase_wait.get(p, 0.0):
                phase_wait[p] = w
        nxt = max(t, c.sent_at + interval)
    c.seq += 1
    c.state = IDLE
    heapq.heappush(timers, (nxt, c.cid))


# --- the connect loop ----------------------------------------------------
class Loop:
    s = None
    fd = -1
    state = None        # None (waiting for its turn), "conn", "echo", "eof"
    due = 0.0
    deadline = 0.0
    msg = b""
    got = b""
    k = 0
    started = 0.0
    last_ok = None      # monotonic time of the last connect served
    events = []         # (rel time, outcome)
    counts = {"ok": 0, "cut": 0, "reset": 0, "refused": 0, "stalled": 0}
    maxgap = [0.0, None]    # after ready: value, monotonic end of the gap
    phase_gap = {}
    phase_counts = {}
    failures = []


L = Loop()


def loop_gap(t):
    if L.last_ok is not None and t_ready is not None:
        g = t - max(L.last_ok, t_ready)
        if g > L.maxgap[0]:
            L.maxgap = [g, t]
        p = phase()
        if g > L.phase_gap.get(p, 0.0):
            L.phase_gap[p] = g


def loop_end(outcome, t, what=""):
    if L.s is not None:
        try:
            ep.unregister(L.fd)
        except (OSError, ValueError):
            pass
        L.s.close()
        L.s = None
    L.counts[outcome] += 1
    pc = L.phase_counts.setdefault(phase(), {})
    pc[outcome] = pc.get(outcome, 0) + 1
    L.events.append((rel(t), outcome))
    if outcome == "ok":
        loop_gap(t)
        L.last_ok = t
    elif len(L.failures) < a.max_failures:
        L.failures.append({"k": L.k, "kind": outcome, "t": rel(t), "at": wall(t), "what": what})
    L.state = None
    L.due = max(t, L.started + a.loop_every)


def loop_start(t):
    L.k += 1
    L.started = t
    L.msg = b"loop%012d" % L.k
    L.got = b""
    try:
        s = new_socket(L.k)
    except OSError as e:
        L.s = None
        loop_end("reset", t, "socket: %s" % e)
        return
    L.s, L.fd, L.state = s, s.fileno(), "conn"
    L.deadline = t + a.stall
    err = s.connect_ex(target)
    if err not in (0, errno.EINPROGRESS):
        loop_end(classify(err), t, "connect: %s" % os.strerror(err))
        return
    ep.register(L.fd, EPOLLOUT | EPOLLIN)


def loop_event(ev, t):
    if L.state == "conn":
        err = L.s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            loop_end(classify(err), t, "connect: %s" % os.strerror(err))
            return
        if not ev & EPOLLOUT:
            return
        ep.modify(L.fd, EPOLLIN)
        try:
            L.s.send(L.msg)
        except OSError as e:
            loop_end(classify(e), t, "send: %s" % e)
            return
        L.state = "echo"
        return
    try:
        data = L.s.recv(4096)
    except BlockingIOError:
        return
    except OSError as e:
        loop_end(classify(e), t, "recv: %s" % e)
        return
    if L.state == "echo":
        if not data:
            loop_end("cut", t, "EOF before the echo")
            return
        L.got += data
        if not L.msg.startswith(L.got):
            loop_end("cut", t, "wrong bytes %r" % L.got[:32])
            return
        if len(L.got) == len(L.msg):
            try:
                L.s.shutdown(socket.SHUT_WR)
            except OSError as e:
                loop_end(classify(e), t, "shutdown: %s" % e)
                return
            L.state = "eof"
        return
    if L.state == "eof":
        if data:
            loop_end("cut", t, "bytes after our shutdown")
        else:
            loop_end("ok", t)


# --- the run -------------------------------------------------------------
tasks_peak = 0
next_tasks = 0.0
next_scan = 0.0
self_lag = [0.0, None]
hard_end = M0 + a.max_time
finish_at = None
timed_out = False

while True:
    t = now()
    if t >= hard_end:
        timed_out = True
        break
    # open conversations while few are connecting
    if next_cid < N and pending < a.inflight:
        for _ in range(min(a.inflight - pending, 64, N - next_cid)):
            open_conv()
    if t_ready is None and next_cid >= N and pending == 0:
        t_ready = now()
        if a.ready:
            with open(a.ready + ".tmp", "w") as f:
                f.write("%.3f\n" % (t_ready - M0))
            os.rename(a.ready + ".tmp", a.ready)
        if a.duration is not None:
            finish_at = t_ready + a.duration
    if finish_at is not None and t >= finish_at:
        finishing[0] = True
    if finishing[0] and t_finish is None:
        t_finish = t
        # a gap still open when we finish counts too
        loop_gap(t)
    # the connect loop
    if L.state is None and t >= L.due and t_finish is None:
        loop_start(t)
    # conversations whose turn it is
    while timers and timers[0][0] <= t:
        _, cid = heapq.heappop(timers)
        c = by_id[cid]
        if c.state != IDLE:
            continue
        if t_finish is not None:
            start_close(c, t)
        else:
            send_ping(c, t)
    # timeouts, four times a second
    if t >= next_scan:
        next_scan = t + 0.25
        for c in list(convs.values()):
            if c.state in (CONNECTING, WAIT, CLOSING) and t > c.deadline:
                if c.state == CLOSING:
                    close_conv(c, "noeof", "no EOF %.1f s after our shutdown" % a.eof_timeout, t)
                elif c.state == CONNECTING:
                    close_conv(c, "stalled", "connect not done after %.1f s" % (t - c.deadline + a.ramp_stall), t)
                else:
                    close_conv(c, "stalled", "no echo after %.1f s (%d of 16 bytes)" % (t - c.sent_at, len(c.got)), t)
        if L.state is not None and t > L.deadline:
            loop_end("stalled", t, "%s not done after %.1f s" % (L.state, a.stall))
    if a.tasks_file and t >= next_tasks:
        # reopened each time: a restart may remove and recreate the cgroup
        next_tasks = t + 0.1
        try:
            with open(a.tasks_file) as f:
                tasks_peak = max(tasks_peak, int(f.read().strip() or 0))
        except (OSError, ValueError):
            pass
    if ended >= N and (t_finish is not None or N == 0) and L.state is None:
        break
    # sleep until the next thing to do
    wake = t + 0.25
    if timers:
        wake = min(wake, timers[0][0])
    if L.state is None and t_finish is None:
        wake = min(wake, L.due)
    if next_cid < N and pending < a.inflight:
        wake = t
    before = now()
    # our own lag: how long this turn took (a slow turn delays every echo
    # we see)
    lag = before - t
    timeout = max(0.0, wake - before)
    try:
        evs = ep.poll(timeout, 1024)
    except InterruptedError:
        continue
    t = now()
    if not evs:
        # and how late the kernel woke us
        lag = max(lag, t - (before + timeout))
    if lag > self_lag[0]:
        self_lag[:] = [lag, t]
    for fd, ev in evs:
        c = convs.get(fd)
        if c is not None:
            conv_event(c, ev, t)
        elif fd == L.fd and L.s is not None:
            loop_event(ev, t)

t_end = now()
if timed_out:
    for c in list(convs.values()):
        what = {CONNECTING: "still connecting", WAIT: "no echo", IDLE: "never finished",
                CLOSING: "no EOF"}.get(c.state, "?")
        close_conv(c, "noeof" if c.state == CLOSING else "stalled",
                   "%s at the run's hard end (%.0f s)" % (what, a.max_time), t_end)
    if L.state is not None:
        loop_end("stalled", t_end, "at the run's hard end")

ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime
span = t_end - M0
result = {
    "n": N,
    "interval": interval,
    "started": wall(M0),
    "ramp": round((t_ready - M0) if t_ready else -1, 3),
    "ramp_first_echo": round(ramp_first_echo, 3),
    "ready_at": rel(t_ready) if t_ready else None,
    "marks": [rel(m) for m in marks],
    "finish_at": rel(t_finish) if t_finish else None,
    "end_at": rel(t_end),
    "timed_out": timed_out,
    "conv": dict(counts, pings=pings, established=established),
    "maxwait": round(maxwait[0], 3),
    "maxwait_at": rel(maxwait[1]) if maxwait[1] else None,
    "maxwait_id": maxwait[2],
    "phase_wait": {str(k): round(v, 3) for k, v in sorted(phase_wait.items())},
    "loop": dict(L.counts, maxgap=round(L.maxgap[0], 3),
                 maxgap_end=rel(L.maxgap[1]) if L.maxgap[1] else None),
    "loop_phase_gap": {str(k): round(v, 3) for k, v in sorted(L.phase_gap.items())},
    "loop_phase_counts": {str(k): v for k, v in sorted(L.phase_counts.items())},
    "failures": failures,
    "failures_by_kind": by_kind,
    "self_lag": round(self_lag[0], 3),
    "self_lag_at": rel(self_lag[1]) if self_lag[1] else None,
    "loop_failures": L.failures,
    "tasks_peak": tasks_peak,
    "cpu": round(cpu, 2),
    "cpu_frac": round(cpu / span, 3) if span > 0 else 0,
    "nofile": nofile,
}
text = json.dumps(result, indent=1)
if a.out == "-":
    print(text)
else:
    with open(a.out + ".tmp", "w") as f:
        f.write(text)
    os.rename(a.out + ".tmp", a.out)
