#!/usr/bin/env bash
# Bytes per sample on disk: capstan beside Prometheus 2.42 and VictoriaMetrics on
# the same samples — recorded scrapes of a real node_exporter, stamped 15 s apart.
# Usage: bench/compare-prometheus.sh [SCRAPES_DIR]
#   without SCRAPES_DIR, records 480 scrapes (0.5 s apart) of a node_exporter it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v promtool >/dev/null || need+=(prometheus)
[ -x /usr/bin/prometheus-node-exporter ] || need+=(prometheus-node-exporter)
[ -x /usr/bin/victoria-metrics ] || need+=(victoria-metrics)
if ((${#need[@]})); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"; fi
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

scrapes=${1:-}
if [ -z "$scrapes" ]; then
  scrapes="$work/scrapes"; mkdir -p "$scrapes"
  ne=$(free_port)
  /usr/bin/prometheus-node-exporter --web.listen-address=127.0.0.1:$ne >/dev/null 2>&1 & pids+=($!)
  sleep 1
  for i in $(seq -w 1 480); do curl -s localhost:$ne/metrics > "$scrapes/$i.txt"; sleep 0.5; done
fi

cargo build --release -q -p capstan-tsdb --example disk_size
echo "== capstan"
target/release/examples/disk_size "$scrapes" "$work/out" 15000 | tee "$work/capstan.txt"
samples=$(grep -o '[0-9]* samples' "$work/capstan.txt" | awk '{print $1}')
cap_bytes=$(grep -o 'block: [0-9]* bytes' "$work/capstan.txt" | awk '{print $2}')
cap_chunks=$(grep -o 'chunks: [0-9]* bytes' "$work/capstan.txt" | awk '{print $2}')

echo "== Prometheus $(promtool --version 2>&1 | head -1 | awk '{print $3}') (promtool tsdb create-blocks-from openmetrics)"
promtool tsdb create-blocks-from openmetrics "$work/out/openmetrics.txt" "$work/prom" >/dev/null
prom_bytes=$(du -sb "$work/prom" | awk '{print $1}')
prom_chunks=$(cat "$work"/prom/*/chunks/* | wc -c)
echo "blocks: $prom_bytes bytes (chunks $prom_chunks)"

echo "== VictoriaMetrics $(/usr/bin/victoria-metrics -version 2>&1 | head -1)"
vm=$(free_port)
/usr/bin/victoria-metrics -storageDataPath="$work/vm" -httpListenAddr=127.0.0.1:$vm -retentionPeriod=100y -loggerLevel=ERROR >/dev/null 2>&1 & vmpid=$!; pids+=($vmpid)
for _ in $(seq 50); do curl -sf localhost:$vm/health >/dev/null && break; sleep 0.2; done
curl -sf -X POST --data-binary @"$work/out/import.txt" localhost:$vm/api/v1/import/prometheus
curl -sf localhost:$vm/internal/force_flush >/dev/null
sleep 2
curl -sf "localhost:$vm/internal/force_merge" >/dev/null || true
sleep 5
kill $vmpid; wait $vmpid 2>/dev/null || true
vm_bytes=$(du -sb "$work/vm" | awk '{print $1}')
vm_data=$(du -sb "$work/vm/data" | awk '{print $1}')
echo "storage: $vm_bytes bytes (data $vm_data, the rest is its index and metadata)"

awk -v s="$samples" -v c="$cap_bytes" -v cc="$cap_chunks" -v p="$prom_bytes" -v pc="$prom_chunks" -v v="$vm_bytes" -v vd="$vm_data" 'BEGIN {
  printf "== bytes per sample over %d samples, everything on disk: capstan %.3f, Prometheus %.3f, VictoriaMetrics %.3f\n", s, c/s, p/s, v/s
  printf "== sample data only (chunks / data parts): capstan %.3f, Prometheus %.3f, VictoriaMetrics %.3f\n", cc/s, pc/s, vd/s
  printf "== ratios, everything: capstan/Prometheus %.2f, capstan/VictoriaMetrics %.2f; sample data: capstan/Prometheus %.2f, capstan/VictoriaMetrics %.2f\n", c/p, c/v, cc/pc, cc/vd
}'
