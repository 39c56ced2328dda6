#!/usr/bin/env bash
# The demand proxy against nginx as a plain reverse proxy, on the same upstream (README
# "Measured", "The demand proxy against nginx"): throughput and added latency with wrk,
# time to the first streamed byte, a request to a stopped service, RSS with 1,000 idle
# connections. About 3.5 minutes once built; talks only to 127.0.0.1 and stops the
# daemon, upstreams and nginx it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "error: ${missing[*]} missing: apt-get install -y ${missing[*]} (as root)" >&2
    exit 1
  fi
fi

# The fake libnvidia-ml beside the release binaries, and the bench's upstream (an example).
cargo build --release --workspace
cargo build --release --example proxy_upstream
cargo bench --bench proxy
