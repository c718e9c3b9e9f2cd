#!/usr/bin/env bash
# Append throughput and memory per series: capstan-tsdb beside Prometheus'
# `promtool tsdb bench write`, same label file, same series and scrape counts.
# Usage: bench/tsdb-write.sh [METRICS] [SCRAPES]   (defaults: promtool's 10000 3000)
set -euo pipefail
cd "$(dirname "$0")/.."
metrics=${1:-10000}
scrapes=${2:-3000}
command -v promtool >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; }
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# node_exporter-shaped label sets, as many as asked (hosts × the usual families).
python3 - "$metrics" > "$work/series.json" <<'PY'
import json, sys
want = int(sys.argv[1]); n = 0; host = 0
while n < want:
    base = {"job": "node", "instance": f"host-{host}:9100"}
    rows = []
    for cpu in range(8):
        for mode in ["idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user"]:
            rows.append({"__name__": "node_cpu_seconds_total", "cpu": str(cpu), "mode": mode})
    for dev in range(20):
        for m in ["receive_bytes", "transmit_bytes", "receive_packets", "transmit_packets"]:
            rows.append({"__name__": f"node_network_{m}_total", "device": f"eth{dev}"})
    for fs in range(40):
        for m in ["avail_bytes", "size_bytes", "files_free"]:
            rows.append({"__name__": f"node_filesystem_{m}", "device": f"/dev/vd{fs}", "fstype": "ext4", "mountpoint": f"/srv/{fs}"})
    for h in range(26):
        for le in ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "+Inf"]:
            rows.append({"__name__": "http_request_duration_seconds_bucket", "handler": f"/api/{h}", "le": le})
    for r in rows:
        if n == want: break
        print(json.dumps({**base, **r})); n += 1
    host += 1
PY
cargo build --release -q -p capstan-tsdb --example bench_write
echo "== promtool tsdb bench write --metrics=$metrics --scrapes=$scrapes"
/usr/bin/time -f "max RSS %M KiB, CPU %U s user %S s sys" promtool tsdb bench write --metrics="$metrics" --scrapes="$scrapes" --out="$work/prom" "$work/series.json" > "$work/prom.out" 2> "$work/prom.err"
prom_rate=$(grep -o 'samples/sec: [0-9.e+]*' "$work/prom.out" | awk '{printf "%.0f", $2}')
prom_rss=$(grep -o 'max RSS [0-9]*' "$work/prom.err" | awk '{print $3}')
grep -E 'samples/sec' "$work/prom.out"
grep -E 'max RSS' "$work/prom.err"
# Prometheus' restart: time until /-/ready on the WAL the benchmark left.
printf 'global:\n  scrape_interval: 1h\n' > "$work/prom.yml"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start=$(date +%s%N)
prometheus --config.file="$work/prom.yml" --storage.tsdb.path="$work/prom/storage" --web.listen-address=127.0.0.1:$port > "$work/prom-replay.log" 2>&1 &
prom_pid=$!
for _ in $(seq 1 3000); do curl -sf localhost:$port/-/ready >/dev/null && break; sleep 0.1; done
prom_ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
kill $prom_pid; wait $prom_pid 2>/dev/null || true
echo "Prometheus restart: ready after $prom_ready_ms ms ($(grep -o 'wal_replay_duration=[^ ]*' "$work/prom-replay.log"))"
echo "== capstan-tsdb bench_write $metrics $scrapes"
/usr/bin/time -f "max RSS %M KiB, CPU %U s user %S s sys" target/release/examples/bench_write "$work/series.json" "$metrics" "$scrapes" 2> "$work/cap.err" | tee "$work/cap.out"
cat "$work/cap.err"
cap_rate=$(grep -o '[0-9]* samples/s' "$work/cap.out" | head -1 | awk '{print $1}')
cap_rss=$(grep -o 'max RSS [0-9]*' "$work/cap.err" | awk '{print $3}')
echo "== append throughput: capstan $cap_rate samples/s, Prometheus $prom_rate samples/s, ratio $(awk "BEGIN{printf \"%.2f\", $cap_rate/$prom_rate}")x"
echo "== peak RSS: capstan $cap_rss KiB ($(awk "BEGIN{printf \"%.0f\", $cap_rss*1024/$metrics}") B/series), Prometheus $prom_rss KiB ($(awk "BEGIN{printf \"%.0f\", $prom_rss*1024/$metrics}") B/series)"
echo "== restart to ready: capstan $(grep -o 'samples in [0-9.]*s' "$work/cap.out" | tail -1 | awk '{print $3}') (WAL replay), Prometheus ${prom_ready_ms} ms (process start to /-/ready)"
