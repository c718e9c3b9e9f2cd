#!/usr/bin/env bash
# The dashboard's figures, measured by the browser test (tests/dashboard.rs)
# in Debian's headless Chromium against a release build: first contentful
# paint of the overview from a warm daemon (cold browser cache), bytes
# transferred for it, the time to draw and to query+draw a 1 h / 15 s chart of
# 100 series, and the daemon's RSS before and after ROUNDS browser sessions.
# Usage: bench/dashboard.sh [ROUNDS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
runs=${2:-3}
cargo build --release --workspace -q
for r in $(seq "$runs"); do
  echo "# run $r"
  DASHBOARD_ROUNDS=$rounds cargo test --release -q -p capstan --test dashboard -- --nocapture 2>/dev/null \
    | grep -E '^FIGURE' | sed 's/^FIGURE /  /'
done
