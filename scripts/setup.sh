#!/usr/bin/env bash
# Installs shunted_jax with everything the demo and the tests need, from scratch:
# the Debian package with the Fashion-MNIST demo data, then the package and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runs a command, its output shown on a terminal; elsewhere (a log file, CI) only if it fails.
quiet_unless_terminal() {
  if [ -t 1 ]; then
    "$@"
    return
  fi
  local log status=0
  log="$(mktemp)"
  "$@" >"$log" 2>&1 || status=$?
  [ "$status" -eq 0 ] || cat "$log" >&2
  rm -f "$log"
  return "$status"
}

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    quiet_unless_terminal $sudo_cmd apt-get update -qq
    quiet_unless_terminal $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup.sh: no apt-get here; the demo data (Debian's dataset-fashion-mnist) will be missing." >&2
    echo "          Install it, or point config.data at another dataset (docs/data.md)." >&2
  fi
fi

quiet_unless_terminal python3 -m pip install -q --upgrade pip
quiet_unless_terminal python3 -m pip install -q -e ".[data,test]"
