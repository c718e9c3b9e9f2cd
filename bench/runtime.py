#!/usr/bin/env python3
"""Runtime-core benchmarks, two capstan binaries side by side in one run.

Usage: bench/runtime.py --before PATH [--after PATH] [--seconds S]

  up        `capstan up -d` of 20 replicas of the demo (health-checked), from
            the command to every replica healthy (the command waits for that).
  idle      the daemon's CPU while those 20 replicas idle: its utime+stime
            over S seconds (default 30), as a percentage of one CPU.
  scrape    100 static targets x 1,000 series (one Python server on 100
            loopback ports), scraped every second: the daemon's CPU time per
            1,000 samples scraped, over S seconds.

`--before` is the binary to compare against (a build of an earlier commit),
`--after` defaults to target/release/capstan. The demo is
target/release/capstan-demo. Everything listens on loopback, in temporary
directories, and stops by itself.
"""

import argparse
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "target/release/capstan-demo")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def daemon(dir_):
    with open(os.path.join(dir_, ".capstan", "daemon.json")) as f:
        return json.load(f)


def metric(addr, name, labels=""):
    req = urllib.request.Request(f"http://{addr}/metrics", headers={"Host": "localhost"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    want = name + (("{" + labels + "}") if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def run(binary, dir_, *args, check=True):
    out = subprocess.run([binary, *args], cwd=dir_, capture_output=True, text=True,
                         env={**os.environ, "NO_COLOR": "1"})
    if check and out.returncode != 0:
        sys.exit(f"{binary} {' '.join(args)} failed: {out.stderr}{out.stdout}")
    return out


def up_and_idle(binary, seconds):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "capstan.yaml"), "w") as f:
            f.write(f"""services:
  web:
    command: ["{DEMO}"]
    environment: {{LOG_REQUESTS: "0"}}
    x-capstan:
      healthcheck: {{http: /healthz, interval: 5s}}
    deploy: {{replicas: 20}}
""")
        t = time.monotonic()
        run(binary, d, "up", "-d", "--listen", "127.0.0.1:0", "--wait-timeout", "120s")
        up = time.monotonic() - t
        pid = daemon(d)["pid"]
        time.sleep(5)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        idle = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100
        run(binary, d, "down", check=False)
        return up, idle


class Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def targets(n_targets, n_series):
    lines = ["# TYPE bench_value gauge"]
    for i in range(n_series):
        lines.append(f'bench_value{{series="{i}",group="{i % 10}"}} {i}.5')
    Metrics.body = ("\n".join(lines) + "\n").encode()
    servers, ports = [], []
    for _ in range(n_targets):
        s = Server(("127.0.0.1", 0), Metrics)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
        ports.append(s.server_address[1])
    return servers, ports


def scrape(binary, ports, seconds):
    with tempfile.TemporaryDirectory() as d:
        static = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
        with open(os.path.join(d, "capstan.yaml"), "w") as f:
            f.write(f"""x-capstan:
  scrape_interval: 1s
  scrape_configs:
    - job_name: bench
      static_configs: [{{targets: [{static}]}}]
services:
  idle:
    command: ["sleep", "3600"]
""")
        run(binary, d, "up", "-d", "--listen", "127.0.0.1:0", "--wait-timeout", "60s")
        info = daemon(d)
        pid, addr = info["pid"], info["addr"]
        # Series are created in the first scrapes: measure the steady state.
        time.sleep(8)
        s0 = metric(addr, "capstan_tsdb_samples_appended_total")
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(pid), time.monotonic()
        s1 = metric(addr, "capstan_tsdb_samples_appended_total")
        run(binary, d, "down", check=False)
        samples = s1 - s0
        return (c1 - c0) / max(samples, 1) * 1000 * 1e6, samples / (t1 - t0), (c1 - c0) / (t1 - t0) * 100


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=os.path.join(ROOT, "target/release/capstan"))
    ap.add_argument("--seconds", type=float, default=30)
    a = ap.parse_args()
    rows = []
    res = {}
    for name, b in (("before", a.before), ("after", a.after)):
        up, idle = up_and_idle(b, a.seconds)
        res[name] = {"up": up, "idle": idle}
        print(f"{name}: up -d of 20 replicas {up:.2f} s, idle daemon CPU {idle:.2f} %", flush=True)
    servers, ports = targets(100, 1000)
    for name, b in (("before", a.before), ("after", a.after)):
        us, rate, cpu = scrape(b, ports, a.seconds)
        res[name].update({"scrape_us": us, "scrape_rate": rate, "scrape_cpu": cpu})
        print(f"{name}: scrape {us:.0f} CPU-us per 1,000 samples ({rate:.0f} samples/s, daemon {cpu:.1f} % CPU)", flush=True)
    for s in servers:
        s.shutdown()
    bf, af = res["before"], res["after"]
    rows = [
        ("up -d, 20 replicas (s)", bf["up"], af["up"]),
        ("idle daemon CPU, 20 replicas (% of a CPU)", bf["idle"], af["idle"]),
        ("scrape CPU per 1,000 samples (us)", bf["scrape_us"], af["scrape_us"]),
        ("samples scraped per second", bf["scrape_rate"], af["scrape_rate"]),
    ]
    print()
    print(f"| {'measure':44} | {'before':>9} | {'after':>9} | after/before |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|{'-' * 14}|")
    for name, x, y in rows:
        print(f"| {name:44} | {x:9.2f} | {y:9.2f} | {y / x if x else float('nan'):12.2f} |")


if __name__ == "__main__":
    main()
