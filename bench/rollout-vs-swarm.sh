#!/usr/bin/env bash
# A rolling update of 4 replicas, capstan beside Docker Swarm, with the same
# update_config on the same image (its health check baked in): time from the
# command (`capstan deploy`, `docker service update`) to fully rolled, and, for
# capstan, failed requests of an open-loop load (`capstan load --rate RATE`)
# running through it (Swarm's routing mesh does not serve loopback, and servers
# here stay on loopback: no load runs through Swarm). Swarm is a single-node
# swarm on this machine's engine (initialized here, left at the end).
# Usage: bench/rollout-vs-swarm.sh [TRIALS] [MONITOR] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-3}
monitor=${2:-5s}
rate=${3:-200}
cargo build --release --workspace -q
bin=$PWD/target/release/capstan
work=$(mktemp -d)
own_swarm=""
cleanup() {
  docker service rm capstan-bench >/dev/null 2>&1 || true
  docker rmi capstan-demo:bench-hc >/dev/null 2>&1 || true
  [ -z "$own_swarm" ] || docker swarm leave --force >/dev/null 2>&1 || true
  (cd "$work/stack" 2>/dev/null && "$bin" down >/dev/null 2>&1) || true
  rm -rf "$work"
}
trap cleanup EXIT

. bench/demo-image.sh
demo_image "$work" 'ENV LOG_REQUESTS=0'
# Swarm's --health-cmd runs through /bin/sh, which the image has not: the
# check goes into the image (exec form), for both.
mkdir -p "$work/hc"
printf 'FROM capstan-demo:bench\nHEALTHCHECK --interval=1s --timeout=1s CMD ["/capstan-demo", "check", "/healthz"]\n' > "$work/hc/Dockerfile"
docker build -q -t capstan-demo:bench-hc "$work/hc" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms() { date +%s%3N; }
errors() { python3 -c "import json,sys; v=json.load(sys.stdin); print(v['errors'] + sum(n for c, n in v['status'].items() if not c.startswith('2')), v['requests'])"; }

# capstan
cp_port=$(free_port)
mkdir -p "$work/stack"
stack() {
  cat > "$work/stack/capstan.yaml" <<YAML
services:
  web:
    image: capstan-demo:bench-hc
    environment: {VERSION: "$1"}
    ports: ["127.0.0.1:$cp_port:8080"]
    deploy:
      replicas: 4
      update_config: {parallelism: 1, delay: 0s, monitor: $monitor, order: start-first, failure_action: rollback}
    x-capstan:
      metrics: {disable: true}
      proxy: {access_log: false}
YAML
}
stack v0
(cd "$work/stack" && "$bin" up -d --listen 127.0.0.1:0 >/dev/null)
echo "rolling update of 4 replicas, parallelism 1, monitor $monitor, start-first; load $rate req/s"
printf '%-8s %6s %12s %10s\n' tool trial rolled_ms failed
for t in $(seq 1 "$trials"); do
  stack "v$t"
  "$bin" load "http://127.0.0.1:$cp_port/" --rate "$rate" -d 120s -o json > "$work/load.json" &
  lp=$!
  sleep 1
  start=$(ms)
  (cd "$work/stack" && "$bin" deploy >/dev/null)
  took=$(($(ms) - start))
  kill -INT $lp 2>/dev/null || true; wait $lp 2>/dev/null || true
  read -r failed n < <(errors < "$work/load.json" 2>/dev/null || echo "? ?")
  printf '%-8s %6s %12s %10s\n' capstan "$t" "$took" "$failed/$n"
done
(cd "$work/stack" && "$bin" down >/dev/null)

# Docker Swarm, same image and update_config.
if [ "$(docker info -f '{{.Swarm.LocalNodeState}}')" != active ]; then
  docker swarm init --advertise-addr 127.0.0.1 >/dev/null
  own_swarm=1
fi
# Not published: the routing mesh serves every interface, not loopback, and
# servers started here stay on loopback; so no load runs through Swarm's update.
docker service create -q --name capstan-bench --replicas 4 \
  --env VERSION=v0 \
  --update-parallelism 1 --update-delay 0s --update-monitor "$monitor" \
  --update-order start-first --update-failure-action rollback \
  capstan-demo:bench-hc >/dev/null
for t in $(seq 1 "$trials"); do
  start=$(ms)
  docker service update -q --env-add "VERSION=v$t" capstan-bench >/dev/null
  took=$(($(ms) - start))
  printf '%-8s %6s %12s %10s\n' swarm "$t" "$took" "-"
done
