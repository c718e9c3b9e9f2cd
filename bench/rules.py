#!/usr/bin/env python3
"""Rule evaluation cost, capstan beside Prometheus 2.42 on the same data and the
same rule file, and the latency from a condition to Alertmanager's receipt.

Usage: bench/rules.py [--rules 1000] [--series 10000] [--seconds 120]

  cost     a static target serves SERIES series (a counter and a gauge per
           group/instance pair); both scrape it every 5 s and evaluate RULES rules
           (half recording: a rate summed by group; half alerting: a gauge
           threshold by group, never true) in one group every 5 s. Reported after
           SECONDS: each one's last group evaluation time (its own
           *_rule_group_last_duration_seconds) and its process CPU over the
           measured window divided by the evaluations in it.
  notify   a rule with `for: 0` on a gauge the bench flips from 0 to 1; a real
           Alertmanager 0.25 on loopback; reported: from the flip to the alert
           showing in Alertmanager (polled every 50 ms), capstan beside Prometheus
           (both at evaluation interval 1 s, scrape interval 1 s).
"""

import argparse
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPSTAN = os.path.join(ROOT, "target/release/capstan")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Target:
    """Serves the exposition text at /metrics; `flip` sets the alert gauge."""

    def __init__(self, series):
        self.flag = 0
        groups = max(1, series // 200)
        per = max(1, series // (2 * groups))
        self.lines = []
        for g in range(groups):
            for i in range(per):
                self.lines.append(f'bench_requests_total{{group="g{g}",instance="i{i}"}} {{c}}')
                self.lines.append(f'bench_value{{group="g{g}",instance="i{i}"}} {g + i}')
        self.groups = groups
        self.count = 0
        target = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                target.count += 1
                body = "\n".join(line.replace("{c}", str(target.count * 10)) for line in target.lines)
                body += f"\nbench_flag {target.flag}\n"
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def rule_file(rules, groups, interval):
    out = [f"groups:\n  - name: bench\n    interval: {interval}\n    rules:"]
    for r in range(rules):
        g = r % groups
        if r % 2 == 0:
            out.append(f"      - record: bench:rate{r}\n        expr: sum by (group) (rate(bench_requests_total{{group=\"g{g}\"}}[1m]))")
        else:
            out.append(f"      - alert: Bench{r}\n        expr: max by (group) (bench_value{{group=\"g{g}\"}}) > 1e9")
    return "\n".join(out) + "\n"


def start_prometheus(d, target_port, interval, rules_path, am=None):
    port = free_port()
    cfg = os.path.join(d, "prometheus.yml")
    with open(cfg, "w") as f:
        f.write(f"global: {{scrape_interval: {interval}, evaluation_interval: {interval}}}\n")
        f.write(f"rule_files: [{rules_path}]\n")
        if am:
            f.write(f"alerting: {{alertmanagers: [{{static_configs: [{{targets: ['{am}']}}]}}]}}\n")
        f.write(f"scrape_configs: [{{job_name: bench, static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]}}]\n")
    p = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={d}/prom",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, f"http://127.0.0.1:{port}"


def start_capstan(d, target_port, interval, rules_path, am=None):
    stack = os.path.join(d, "capstan.yaml")
    with open(stack, "w") as f:
        f.write("x-capstan:\n")
        f.write(f"  scrape_interval: {interval}\n  evaluation_interval: {interval}\n")
        f.write(f"  rule_files: [{rules_path}]\n")
        if am:
            f.write(f"  alerting: {{alertmanagers: ['http://{am}']}}\n")
        f.write(f"  scrape_configs: [{{job_name: bench, static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]}}]\n")
        f.write("services:\n  idle:\n    command: [sleep, infinity]\n    x-capstan: {metrics: {disable: true}}\n")
    subprocess.run([CAPSTAN, "up", "-d", "--listen", "127.0.0.1:0", "-f", stack], check=True, capture_output=True)
    info = json.load(open(os.path.join(d, ".capstan", "daemon.json")))
    return stack, info["pid"], f"http://{info['addr']}"


def last_duration(base, metric):
    """The metric's value from the process's own /metrics (the first sample)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def cost(rules, series, seconds):
    t = Target(series)
    with tempfile.TemporaryDirectory() as d:
        rp = os.path.join(d, "rules.yml")
        with open(rp, "w") as f:
            f.write(rule_file(rules, t.groups, "5s"))
        prom, pbase = start_prometheus(d, t.port, "5s", rp)
        stack, cpid, cbase = start_capstan(d, t.port, "5s", rp)
        try:
            time.sleep(30)  # both have data and have evaluated a few rounds
            c0, p0 = cpu_secs(cpid), cpu_secs(prom.pid)
            time.sleep(seconds)
            c1, p1 = cpu_secs(cpid), cpu_secs(prom.pid)
            evals = seconds / 5
            cd = last_duration(cbase, "capstan_rule_group_last_duration_seconds")
            pd = last_duration(pbase, "prometheus_rule_group_last_duration_seconds")
            print(f"## cost: {rules} rules over {series} series, scrape and evaluation every 5 s, {seconds} s measured")
            print(f"{'':<12} {'group eval (last)':>18} {'CPU per 5 s round':>18}")
            print(f"{'capstan':<12} {cd * 1e3:>15.1f} ms {(c1 - c0) / evals * 1e3:>15.1f} ms")
            print(f"{'Prometheus':<12} {pd * 1e3:>15.1f} ms {(p1 - p0) / evals * 1e3:>15.1f} ms")
            q = "count(%7B__name__%3D~%22bench%3Arate.%2A%22%7D)"
            for name, base in [("capstan", cbase), ("Prometheus", pbase)]:
                r = get(f"{base}/api/v1/query?query={q}")["data"]["result"]
                print(f"{name}: {r[0]['value'][1] if r else 0} recorded series (expected {rules // 2})")
            print(f"ratio capstan/Prometheus: eval {cd / pd:.2f}x, CPU {(c1 - c0) / max(p1 - p0, 1e-9):.2f}x "
                  "(CPU includes scraping, storage and everything else each process does)")
        finally:
            subprocess.run([CAPSTAN, "down", "-f", stack], capture_output=True)
            prom.terminate()
            prom.wait()


def notify(trials):
    am_port = free_port()
    with tempfile.TemporaryDirectory() as d:
        amc = os.path.join(d, "am.yml")
        with open(amc, "w") as f:
            f.write("route: {receiver: none, group_wait: 0s}\nreceivers: [{name: none}]\n")
        am = subprocess.Popen(
            ["prometheus-alertmanager", f"--config.file={amc}", f"--storage.path={d}/am",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        amurl = f"http://127.0.0.1:{am_port}"
        try:
            for tool in ["capstan", "prometheus"]:
                t = Target(10)
                sub = os.path.join(d, tool)
                os.makedirs(sub)
                rp = os.path.join(sub, "rules.yml")
                with open(rp, "w") as f:
                    f.write(f"groups:\n  - name: n\n    rules:\n      - alert: Flag{tool}\n        expr: bench_flag == 1\n")
                if tool == "capstan":
                    stack, _, _ = start_capstan(sub, t.port, "1s", rp, f"127.0.0.1:{am_port}")
                else:
                    prom, _ = start_prometheus(sub, t.port, "1s", rp, f"127.0.0.1:{am_port}")
                lat = []
                for _ in range(trials):
                    t.flag = 0
                    time.sleep(8)  # resolved, and Alertmanager forgot it
                    while any(a["labels"].get("alertname") == f"Flag{tool}" and a["status"]["state"] == "active"
                              for a in get(f"{amurl}/api/v2/alerts")):
                        time.sleep(0.5)
                    t.flag = 1
                    t0 = time.time()
                    while not any(a["labels"].get("alertname") == f"Flag{tool}"
                                  for a in get(f"{amurl}/api/v2/alerts?active=true")):
                        time.sleep(0.05)
                        if time.time() - t0 > 60:
                            break
                    lat.append(time.time() - t0)
                if tool == "capstan":
                    subprocess.run([CAPSTAN, "down", "-f", stack], capture_output=True)
                else:
                    prom.terminate()
                    prom.wait()
                lat.sort()
                print(f"{tool:<12} condition -> Alertmanager: median {lat[len(lat) // 2]:.2f} s, "
                      f"max {lat[-1]:.2f} s over {trials} flips (scrape and evaluation every 1 s)")
        finally:
            am.terminate()
            am.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rules", type=int, default=1000)
    p.add_argument("--series", type=int, default=10000)
    p.add_argument("--seconds", type=int, default=120)
    p.add_argument("--trials", type=int, default=5)
    a = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capstan"], cwd=ROOT, check=True)
    cost(a.rules, a.series, a.seconds)
    print("## notification latency (for: 0)")
    notify(a.trials)


if __name__ == "__main__":
    sys.exit(main())
