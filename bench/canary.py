#!/usr/bin/env python3
"""Canary analysis benchmarks, on real canaries of the demo through the daemon.

Usage: bench/canary.py [--detect N] [--aa N] [--rate R] [--aa-rate R] [--aa-pause S]

  detect  N canaries of a version that fails 1% of requests (FAIL_RATE=0.01)
          against a stable revision and baseline that fail none, at --rate
          requests/s (default 50), with the default analysis (interval 10s,
          min_requests 50, errors-vs-baseline and latency-vs-baseline) and
          steps [{weight: 50}, {pause: 5m}]. Reported: time from the canary
          getting its share to the rollback (detection), and from the failing
          verdict to the rollback starting.
  aa      N canaries of the same code on both sides (A/A: both fail 1% of
          requests; only an environment variable differs, to make a new
          revision), at --aa-rate requests/s with steps [{weight: 50},
          {pause: S}] and the analysis checked every 2s. Reported: runs that
          ended in a rollback (false alarms) out of N.

One daemon runs all the trials of a phase; everything is on loopback in a
temporary directory and stops by itself.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPSTAN = os.path.join(ROOT, "target/release/capstan")
DEMO = os.path.join(ROOT, "target/release/capstan-demo")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stack_yaml(port, run, fail_rate, rollout):
    return f"""services:
  web:
    command: ["{DEMO}"]
    environment: {{LOG_REQUESTS: "0", RUN: "{run}", FAIL_RATE: "{fail_rate}"}}
    ports: ["127.0.0.1:{port}:http"]
    stop_grace_period: 2s
    deploy:
      replicas: 4
    x-capstan:
      healthcheck: {{http: /healthz, interval: 1s}}
      metrics: {{disable: true}}
      proxy: {{access_log: false, traces: 0}}
      rollout: {rollout}
"""


class Stack:
    def __init__(self, port):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="capstan-canary-")
        self.file = os.path.join(self.dir, "capstan.yaml")
        self.load = None

    def write(self, text):
        with open(self.file, "w") as f:
            f.write(text)

    def cli(self, *args, check=True):
        out = subprocess.run([CAPSTAN, *args, "--file", self.file], capture_output=True, text=True)
        if check and out.returncode != 0:
            sys.exit(f"capstan {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def events(self, since_ms):
        out = self.cli("events", "-o", "json")
        evs = [json.loads(l) for l in out.splitlines() if l.strip()]
        return [e for e in evs if e["service"] == "web" and e["time_ms"] >= since_ms]

    def start_load(self, rate):
        self.load = subprocess.Popen(
            [CAPSTAN, "load", f"http://127.0.0.1:{self.port}/", "--rate", str(rate), "-d", "24h", "-o", "json"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self):
        if self.load:
            self.load.send_signal(signal.SIGINT)
            self.load.communicate()
        self.cli("down", check=False)
        subprocess.run(["rm", "-rf", self.dir])


def run_canary(s, port, run, fail_rate, rollout, timeout_s):
    """Deploys one canary; returns (outcome, events since the deploy)."""
    s.write(stack_yaml(port, run, fail_rate, rollout))
    t0 = time.time() * 1000
    s.cli("deploy")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        evs = s.events(t0)
        kinds = [e["kind"] for e in evs]
        if "rollback" in kinds:
            return "rollback", evs
        if "rolled" in kinds:
            return "promoted", evs
        time.sleep(0.5)
    s.cli("abort", "web", check=False)
    time.sleep(3)
    return "timeout", s.events(t0)


def first(evs, kind, contains=""):
    for e in evs:
        if e["kind"] == kind and contains in e["reason"]:
            return e
    return None


def detect(n, rate):
    print(f"## detect: 1% error-rate regression at {rate} req/s, weight 50 + baseline, interval 10s")
    port = free_port()
    s = Stack(port)
    s.write(stack_yaml(port, 0, 0, "{strategy: rolling}"))
    s.cli("up", "-d", "--listen", "127.0.0.1:0")
    rollout = "{strategy: canary, steps: [{weight: 50}, {pause: 5m}]}"
    s.start_load(rate)
    detections, reactions = [], []
    try:
        for i in range(1, n + 1):
            outcome, evs = run_canary(s, port, i, 0.01, rollout, 330)
            step = first(evs, "canary-step")
            back = first(evs, "rollback")
            verdict = first(evs, "verdict", ": fail")
            if outcome == "rollback" and step and verdict:
                d = (back["time_ms"] - step["time_ms"]) / 1000
                r = back["time_ms"] - verdict["time_ms"]
                detections.append(d)
                reactions.append(r)
                print(f"trial {i}: rolled back {d:.1f}s after the canary got its share; "
                      f"rollback started {r} ms after the failing verdict ({verdict['reason'][:120]}...)")
            else:
                print(f"trial {i}: {outcome} (not detected)")
    finally:
        s.stop()
    if detections:
        print(f"detected {len(detections)}/{n}; detection median {statistics.median(detections):.1f}s, "
              f"max {max(detections):.1f}s; verdict -> rollback median {statistics.median(reactions)} ms, "
              f"max {max(reactions)} ms")


def aa(n, rate, pause):
    print(f"## A/A: same code both sides (1% errors each), {rate} req/s, weight 50 + baseline, "
          f"pause {pause}, analysis every 2s")
    port = free_port()
    s = Stack(port)
    s.write(stack_yaml(port, 0, 0.01, "{strategy: rolling}"))
    s.cli("up", "-d", "--listen", "127.0.0.1:0")
    rollout = (f"{{strategy: canary, steps: [{{weight: 50}}, {{pause: {pause}}}], "
               "analysis: {interval: 2s}}")
    s.start_load(rate)
    alarms, promoted, other = [], 0, 0
    try:
        for i in range(1, n + 1):
            outcome, evs = run_canary(s, port, i, 0.01, rollout, 300)
            if outcome == "rollback":
                back = first(evs, "rollback")
                alarms.append(i)
                print(f"run {i}: false alarm: {back['reason'][:200]}")
            elif outcome == "promoted":
                promoted += 1
            else:
                other += 1
                print(f"run {i}: {outcome}")
            if i % 10 == 0:
                print(f"after {i} runs: {len(alarms)} false alarms, {promoted} promoted, {other} other", flush=True)
    finally:
        s.stop()
    print(f"A/A false alarms: {len(alarms)}/{n} = {100 * len(alarms) / n:.1f}% "
          f"(promoted {promoted}, other {other}); bound α = 1%")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--detect", type=int, default=5)
    p.add_argument("--aa", type=int, default=100)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument("--aa-rate", type=int, default=200)
    p.add_argument("--aa-pause", default="30s")
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capstan", "-p", "capstan-demo"],
                   cwd=ROOT, check=True)
    if a.detect:
        detect(a.detect, a.rate)
    if a.aa:
        aa(a.aa, a.aa_rate, a.aa_pause)


if __name__ == "__main__":
    main()
