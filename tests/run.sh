#!/usr/bin/env bash
# The test command (README): installs and starts what the tests need, then runs them all.
# Redis and Docker tests fail (never skip) under CI=true when their backend is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

apt_updated=
apt_install() {
  [ -n "$apt_updated" ] || { as_root apt-get update -qq; apt_updated=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

say "checking test dependencies"
command -v pkill >/dev/null || apt_install procps
command -v redis-server >/dev/null || apt_install redis-server
python3 -c 'import redis' 2>/dev/null || python3 -m pip install --quiet 'redis>=5' || apt_install python3-redis
python3 -c 'import redis' || { echo "the Python redis module (redis-py) could not be installed: the Redis lease tests need it"; exit 1; }

# The dashboard's browser tests (Debian's headless Chromium and its WebDriver, driven by
# selenium), the OpenAPI fuzzing (schemathesis) and the metrics check (promtool, from
# Debian's prometheus package).
{ command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || apt_install chromium chromium-driver
command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
# A Debian python3 refuses pip installs outside a virtualenv (PEP 668) unless told.
pip_install() { python3 -m pip install --quiet "$@" || python3 -m pip install --quiet --break-system-packages "$@"; }
# pip puts a user install's commands (schemathesis) in the user base's bin: look there too.
PATH="$PATH:$(python3 -m site --user-base)/bin"
export PATH
python3 -c 'import selenium' 2>/dev/null || pip_install 'selenium>=4.20'
command -v schemathesis >/dev/null || pip_install 'schemathesis>=4.0,<5'

# Docker tests need the docker CLI and a running engine; they build their image from the
# stand-in binary with tar and ldd.
docker_missing="Docker tests will be skipped (and fail under CI=true)"
if ! command -v docker >/dev/null; then
  echo "warning: no docker command: install docker.io (apt-get install docker.io); $docker_missing"
elif ! docker info >/dev/null 2>&1; then
  if command -v dockerd >/dev/null; then
    say "starting the Docker daemon"
    (as_root dockerd >/tmp/gpu-manager-dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "dockerd did not start: see /tmp/gpu-manager-dockerd.log"; exit 1; }
  else
    echo "warning: docker cannot reach an engine at ${DOCKER_HOST:-unix:///var/run/docker.sock} and dockerd is not installed: install docker.io or start your engine; $docker_missing"
  fi
fi

say "building the workspace (daemon, stand-in services, fake libnvidia-ml)"
cargo build --workspace --all-targets

say "checking the systemd unit (examples/systemd/gpu-manager.service)"
command -v systemd-analyze >/dev/null || apt_install systemd
unit_dir=$(mktemp -d)
# verify wants ExecStart's binary to exist: point it at the one just built.
sed "s#/usr/local/bin/gpu-manager#$PWD/target/debug/gpu-manager#" \
  examples/systemd/gpu-manager.service >"$unit_dir/gpu-manager.service"
# It exits 0 on some mistakes (an unknown KillMode...) and only says so: any output fails.
unit_check=$(systemd-analyze verify "$unit_dir/gpu-manager.service" 2>&1) && [ -z "$unit_check" ] ||
  { echo "systemd-analyze verify refused the unit:"; echo "$unit_check"; exit 1; }
rm -rf "$unit_dir"
echo "unit OK"

say "installing the Python client and its test tools (clients/python)"
venv=target/python-client
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" 2>/dev/null || {
  apt_install python3-venv
  python3 -m venv "$venv"
}
"$venv/bin/pip" install --quiet './clients/python[test]'
# The demand proxy's tests (tests/proxy/clients.py) call the stand-ins through it with the
# real clients that users have, which no one here wrote.
"$venv/bin/pip" install --quiet ollama openai websockets

say "running the tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log" || status=$?
say "soak: 1,000 phase transitions with crashes, health failures and event-stream clients (a few minutes)"
cargo test --test soak soak_in_ci -- --ignored --exact --nocapture 2>&1 | tee -a "$log" || status=$?
# One closing line over every test binary (cargo prints one per binary, the last often
# a doc-test run of 0). A test whose backend (Docker, Redis) is missing returns early,
# so cargo counts it as passed; each says "!!!! SKIPPED" on a line of its own
# (tests/common), and is counted as skipped instead.
awk '/^test result:/ { passed += $4; failed += $6 }
     /^!+ SKIPPED/ { skipped += 1 }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", passed - skipped, failed, skipped }' "$log"

say "running the Python client's tests against the daemon"
GPU_MANAGER_BIN="$PWD/target/debug/gpu-manager" "$venv/bin/python" -m pytest -q clients/python/tests ||
  status=1
exit "$status"
