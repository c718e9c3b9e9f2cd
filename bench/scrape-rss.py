#!/usr/bin/env python3
"""Daemon memory per active series, scraped through the daemon.

Usage: bench/scrape-rss.py [--targets N] [--series S] [--interval 15s]

N targets (default 100) on loopback, each exposing S series (default 10,000:
node_exporter-like names and labels, values that change every scrape), scraped by
a capstan daemon through `x-capstan.scrape_configs`. The daemon's RSS (from
/proc) is read with its own targets only, then once every series is in the head
(`capstan_tsdb_head_series`) and after three more scrapes; reported: the growth
per active series.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPSTAN = os.path.join(ROOT, "target/release/capstan")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def body(target, series, scrape):
    lines = []
    per_family = 100
    for f in range(series // per_family):
        name = f"bench_metric_{f}_total"
        lines.append(f"# TYPE {name} counter")
        for i in range(per_family):
            lines.append(f'{name}{{cpu="{i % 8}",mode="m{i}",device="dev{f % 13}"}} {scrape * (i + 1) + target}')
    return ("\n".join(lines) + "\n").encode()


def serve(ports, series):
    """One thread with an asyncio loop serving every target; a body is rebuilt
    per target every 15 s (values change) and served as is in between."""
    bodies = {}
    stamp = {}

    async def handle(reader, writer, idx):
        try:
            await reader.readuntil(b"\r\n\r\n")
            now = int(time.time() // 15)
            if stamp.get(idx) != now:
                bodies[idx] = body(idx, series, now)
                stamp[idx] = now
            b = bodies[idx]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(b) + b)
            await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def main():
        for i, p in enumerate(ports):
            await asyncio.start_server(lambda r, w, i=i: handle(r, w, i), "127.0.0.1", p)
        await asyncio.Event().wait()

    asyncio.run(main())


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def query(addr, q):
    url = f"http://{addr}/api/v1/query?query=" + urllib.parse.quote(q)
    with urllib.request.urlopen(url, timeout=30) as r:
        res = json.load(r)["data"]["result"]
    return float(res[0]["value"][1]) if res else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=100)
    ap.add_argument("--series", type=int, default=10_000)
    ap.add_argument("--interval", default="15s")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "capstan"], cwd=ROOT, check=True)
    ports = [free_port() for _ in range(args.targets)]
    threading.Thread(target=serve, args=(ports, args.series), daemon=True).start()
    work = tempfile.mkdtemp(prefix="capstan-rss-")
    stack = os.path.join(work, "capstan.yaml")
    targets = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    with open(stack, "w") as f:
        f.write(f"""x-capstan:
  scrape_interval: {args.interval}
services:
  idle:
    command: [sleep, "100000"]
    x-capstan: {{metrics: {{disable: true}}}}
""")
    subprocess.run([CAPSTAN, "up", "-d", "-f", stack, "--listen", "127.0.0.1:0"], check=True, capture_output=True)
    try:
        info = json.load(open(os.path.join(work, ".capstan", "daemon.json")))
        pid, addr = info["pid"], info["addr"]
        time.sleep(20)
        base_series = query(addr, "capstan_tsdb_head_series")
        base = rss_kib(pid)
        with open(stack, "w") as f:
            f.write(f"""x-capstan:
  scrape_interval: {args.interval}
  scrape_configs:
    - job_name: bench
      static_configs: [{{targets: [{targets}]}}]
services:
  idle:
    command: [sleep, "100000"]
    x-capstan: {{metrics: {{disable: true}}}}
""")
        subprocess.run([CAPSTAN, "up", "-d", "-f", stack], check=True, capture_output=True)
        want = args.targets * args.series
        t0 = time.time()
        while query(addr, "capstan_tsdb_head_series") - base_series < want:
            if time.time() - t0 > 600:
                sys.exit("the series did not all arrive within 10 minutes")
            time.sleep(2)
        arrived = time.time() - t0
        full = rss_kib(pid)
        time.sleep(3 * 15)
        later = rss_kib(pid)
        n = query(addr, "capstan_tsdb_head_series") - base_series
        print(f"capstan {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}, {os.cpu_count()} CPUs; {args.targets} targets x {args.series} series every {args.interval}")
        print(f"daemon RSS: {base / 1024:.1f} MiB with its own targets; {full / 1024:.1f} MiB once all {int(n)} series were in ({arrived:.0f} s); {later / 1024:.1f} MiB three scrapes later")
        print(f"per active series: {(full - base) * 1024 / n:.0f} B when all arrived, {(later - base) * 1024 / n:.0f} B three scrapes later (target <= 600 B)")
    finally:
        subprocess.run([CAPSTAN, "down", "-f", stack], capture_output=True)


if __name__ == "__main__":
    main()
