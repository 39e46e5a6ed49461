#!/usr/bin/env bash
# Installs shunted_jax with everything the demo and the tests need, from scratch:
# the Debian package with the Fashion-MNIST demo data, then the package and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup.sh: no apt-get here; the demo data (Debian's dataset-fashion-mnist) will be missing." >&2
    echo "          Install it, or point config.data at another dataset (docs/data.md)." >&2
  fi
fi

python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e ".[data,test]"
