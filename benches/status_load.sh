#!/usr/bin/env bash
# GET /gpu/status under load against the running daemon (README "Measured"):
# (a) 1,000 requests/s paced, latency percentiles; (b) peak requests/s, with the
# built-in generator and with wrk when installed. About a minute once built; talks only
# to 127.0.0.1 and stops the daemon and stand-ins it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null \
      || echo "note: could not install wrk; only the built-in load generator runs"
  else
    echo "note: wrk is not installed (apt-get install -y wrk); only the built-in load generator runs"
  fi
fi

# The stand-in services and the fake libnvidia-ml live beside the release binaries.
cargo build --release --workspace
cargo bench --bench status_load
