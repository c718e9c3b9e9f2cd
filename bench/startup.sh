#!/usr/bin/env bash
# Time from `capstan up -d` to every replica healthy, `down` time, and the daemon's
# memory, for the hello example scaled to N replicas. Prints one line per trial and
# a summary. Usage: bench/startup.sh [REPLICAS] [TRIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=${1:-3}
trials=${2:-5}
cargo build --release --workspace -q
bin=$PWD/target/release/capstan
dir=$(mktemp -d)
trap 'cd /; "$bin" --data-dir "$dir/.capstan" down >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
sed "s#../../target/\${PROFILE:-release}/capstan-demo#$PWD/target/release/capstan-demo#; s/replicas: 3/replicas: $replicas/" \
  examples/hello/capstan.yaml > "$dir/capstan.yaml"
cd "$dir"
ms() { date +%s%3N; }
ups=(); downs=(); rss=()
for t in $(seq "$trials"); do
  t0=$(ms); "$bin" up -d --listen 127.0.0.1:0 >/dev/null; t1=$(ms)
  pid=$(python3 -c 'import json;print(json.load(open(".capstan/daemon.json"))["pid"])')
  sleep 2
  r=$(awk '/VmRSS/{print $2}' /proc/$pid/status)
  t2=$(ms); "$bin" down >/dev/null; t3=$(ms)
  ups+=($((t1-t0))); downs+=($((t3-t2))); rss+=("$r")
  echo "trial $t: up ${ups[-1]} ms to $replicas+1 replicas running/healthy, down ${downs[-1]} ms, daemon RSS ${r} KiB"
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
echo "median: up $(median "${ups[@]}") ms, down $(median "${downs[@]}") ms, daemon RSS $(median "${rss[@]}") KiB ($replicas web replicas)"
