#!/usr/bin/env python3
"""Autoscaler benchmarks: reaction to a load step, stability under noisy load,
and cold-start overhead from zero.

Usage: bench/autoscale.py [--trials N] [--stability-seconds S] [--skip PHASE ...]

  reaction   a stack of the demo (cpus 0.5, autoscale cpu 60%, 1..4) idles, then
             `capstan load /work?ms=20 -c 6` starts; reported: step -> first
             `autoscaled` event (decision) and step -> first request answered by
             a new replica (its first access-log line).
  stability  open-loop load at a rate whose random level changes every 2 s by up
             to +-30% around a mean worth ~2.5 replicas, for S seconds (default
             300) with the default behavior (or --scale-down-window W);
             reported: scale events and direction changes.
  coldstart  a stack with min 0 is left to scale to zero; one GET through the
             proxy is timed from the moment it is sent to its answer, against
             the time the demo itself takes from exec to its first answer.

Everything runs on loopback in temporary directories and stops by itself.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPSTAN = os.path.join(ROOT, "target/release/capstan")
DEMO = os.path.join(ROOT, "target/release/capstan-demo")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def now_ms():
    return time.time() * 1000.0


class Stack:
    """A capstan daemon running one stack file in a temporary directory."""

    def __init__(self, yaml):
        self.dir = tempfile.mkdtemp(prefix="capstan-bench-")
        self.file = os.path.join(self.dir, "capstan.yaml")
        with open(self.file, "w") as f:
            f.write(yaml)

    def cli(self, *args, check=True):
        out = subprocess.run(
            [CAPSTAN, *args, "--file", self.file] if args[0] != "load" else [CAPSTAN, *args],
            capture_output=True,
            text=True,
        )
        if check and out.returncode != 0:
            sys.exit(f"capstan {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def __enter__(self):
        self.cli("up", "-d", "--listen", "127.0.0.1:0")
        return self

    def __exit__(self, *exc):
        self.cli("down", check=False)
        subprocess.run(["rm", "-rf", self.dir])

    def events(self, since_ms=0.0):
        out = self.cli("events", "-o", "json")
        return [e for e in map(json.loads, filter(str.strip, out.splitlines())) if e["time_ms"] >= since_ms]

    def ps(self):
        return json.loads(self.cli("ps", "-o", "json"))

    def logs(self, service):
        out = self.cli("logs", service, "-o", "json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_ready(self, service, n, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready = [r for r in self.ps() if r["service"] == service and r.get("health") == "healthy"]
            if len(ready) >= n:
                return
            time.sleep(0.1)
        sys.exit(f"{service}: {n} healthy replicas not reached in {timeout}s")


def stack_yaml(port, autoscale, extra=""):
    return f"""x-capstan: {{scrape_interval: 15s}}
services:
  web:
    command: ["{DEMO}"]
    environment: {{LOG_REQUESTS: "0"}}
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 2s
    deploy:
      replicas: 1
      resources: {{limits: {{cpus: "0.5", memory: 128m}}}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      metrics: {{disable: true}}
{extra}      autoscale:
{autoscale}
"""


def reaction(trials):
    print("## reaction: load step on /work?ms=20 -c 6 (cpu target 60% of 0.5 CPU, 1..4 replicas)")
    decisions, servings = [], []
    for trial in range(trials):
        port = free_port()
        auto = """        min: 1
        max: 4
        metrics: [{cpu: 60%}]"""
        with Stack(stack_yaml(port, auto)) as st:
            st.wait_ready("web", 1)
            # An idle baseline, then the step at a random phase of the autoscaler's
            # 2 s evaluation period.
            time.sleep(4 + random.uniform(0, 2))
            step = now_ms()
            load = subprocess.Popen(
                [CAPSTAN, "load", f"http://127.0.0.1:{port}/work?ms=20", "-c", "6", "-d", "12s", "-o", "json"],
                stdout=subprocess.PIPE,
                text=True,
            )
            decision = serving = None
            deadline = time.time() + 12
            while time.time() < deadline and (decision is None or serving is None):
                time.sleep(0.2)
                if decision is None:
                    ev = [e for e in st.events(step) if e["kind"] == "autoscaled"]
                    if ev:
                        decision = ev[0]["time_ms"] - step
                if decision is not None and serving is None:
                    lines = [
                        r
                        for r in st.logs("web")
                        if r["replica"] >= 1 and r["stream"] == "proxy" and r["ts_ns"] / 1e6 >= step
                    ]
                    if lines:
                        serving = min(r["ts_ns"] for r in lines) / 1e6 - step
            summary = json.loads(load.communicate()[0])
            ev = [e for e in st.events(step) if e["kind"] == "autoscaled"]
            first = ev[0]["reason"] if ev else "no decision"
        print(
            f"trial {trial + 1}: decision {fmt_s(decision)}, new replica serving {fmt_s(serving)}"
            f"  ({first}; {summary['requests']} requests, {sum(v for k, v in summary['status'].items() if not k.startswith('2'))} non-2xx)"
        )
        if decision is not None:
            decisions.append(decision / 1000)
        if serving is not None:
            servings.append(serving / 1000)
    if decisions and servings:
        print(
            f"decision: median {statistics.median(decisions):.2f} s, worst {max(decisions):.2f} s (target <= 2 s); "
            f"new replica serving: median {statistics.median(servings):.2f} s, worst {max(servings):.2f} s (target <= 3 s)"
        )
    else:
        print("reaction: MISSING measurements")


def fmt_s(ms):
    return "none" if ms is None else f"{ms / 1000:.2f} s"


def stability(seconds, window):
    mean = 75  # requests/s of /work?ms=10: ~0.75 CPU, ~2.5 replicas at 60% of 0.5
    behavior = "" if window is None else f"\n        behavior: {{scaleDown: {{stabilizationWindowSeconds: {window}}}}}"
    print(
        f"## stability: open-loop /work?ms=10 at {mean}/s +-30% (new level every 2 s) for {seconds} s, "
        f"scale-down window {'300 s (default)' if window is None else f'{window} s'}"
    )
    port = free_port()
    auto = f"""        min: 1
        max: 6
        metrics: [{{cpu: 60%}}]{behavior}"""
    rng = random.Random(7)
    with Stack(stack_yaml(port, auto)) as st:
        st.wait_ready("web", 1)
        start = now_ms()
        end = time.time() + seconds
        sent = failed = 0
        while time.time() < end:
            rate = int(mean * rng.uniform(0.7, 1.3))
            out = subprocess.run(
                [CAPSTAN, "load", f"http://127.0.0.1:{port}/work?ms=10", "--rate", str(rate), "-c", "64", "-d", "2s", "-o", "json"],
                capture_output=True,
                text=True,
            )
            s = json.loads(out.stdout)
            sent += s["requests"]
            failed += sum(v for k, v in s["status"].items() if not k.startswith("2")) + s["errors"]
        events = [e for e in st.events(start) if e["kind"] == "autoscaled"]
    counts = []
    changes = 0
    last_dir = 0
    for e in events:
        a, b = e["reason"].split(" replicas")[0].split(" → ")
        a, b = int(a), int(b)
        d = 1 if b > a else -1
        if last_dir and d != last_dir:
            changes += 1
        last_dir = d
        counts.append(f"{(e['time_ms'] - start) / 1000:.0f}s:{a}→{b}")
    print(f"{sent} requests, {failed} failed; scale events: {' '.join(counts) or 'none'}")
    print(f"direction changes: {changes} (target: 0 after the first adjustment)")


def demo_start_ms():
    """Exec of the demo to its first answered GET, polled like a client would."""
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen([DEMO], env={**os.environ, "PORT": str(port), "LOG_REQUESTS": "0"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                return (time.perf_counter() - t0) * 1000
            except OSError:
                time.sleep(0.0005)
    finally:
        p.kill()
        p.wait()


def coldstart(trials):
    print("## cold start: first GET through the proxy with zero replicas, vs the demo's own start")
    # The two alternate, so both see the same machine (this VM's speed drifts).
    own = []
    port = free_port()
    auto = """        min: 0
        max: 2
        idle_after: 2s
        metrics: [{cpu: 60%}]"""
    cold = []
    with Stack(stack_yaml(port, auto)) as st:
        for _ in range(trials):
            deadline = time.time() + 30
            while any(r["service"] == "web" for r in st.ps()):
                if time.time() > deadline:
                    sys.exit("web did not scale to zero")
                time.sleep(0.2)
            own.append(demo_start_ms())
            time.sleep(0.5)
            w0 = now_ms()
            t0 = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read()
            cold.append((time.perf_counter() - t0) * 1000)
            # Where the time went, from the daemon's events (ms after sending).
            marks = {}
            for e in st.events(w0 - 5):
                if e.get("service") == "web" and e["kind"] in ("waking", "started", "healthy"):
                    marks.setdefault(e["kind"], e["time_ms"] - w0)
            print(f"  {cold[-1]:.1f} ms: " + ", ".join(f"{k} at {v:.0f} ms" for k, v in marks.items()), flush=True)
    o, c = statistics.median(own), statistics.median(cold)
    print(f"demo's own start (exec -> first answer): {' '.join(f'{x:.1f}' for x in own)} ms; median {o:.1f} ms")
    print(f"first answer from zero through capstan:  {' '.join(f'{x:.1f}' for x in cold)} ms; median {c:.1f} ms")
    paired = statistics.median(x - y for x, y in zip(cold, own))
    print(f"cold-start overhead: median {c - o:+.1f} ms (of trial pairs: {paired:+.1f} ms), worst {max(cold) - o:+.1f} ms (target <= 10 ms)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--stability-seconds", type=int, default=300)
    ap.add_argument("--scale-down-window", type=int, help="stability: behavior.scaleDown.stabilizationWindowSeconds (default: the HPA's 300)")
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capstan", "-p", "capstan-demo"], cwd=ROOT, check=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"capstan {rev}, {os.cpu_count()} CPUs")
    if "reaction" not in args.skip:
        reaction(args.trials)
    if "coldstart" not in args.skip:
        coldstart(args.trials)
    if "stability" not in args.skip:
        stability(args.stability_seconds, args.scale_down_window)


if __name__ == "__main__":
    main()
