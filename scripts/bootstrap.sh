#!/bin/sh
# bootstrap.sh: make this Debian 12 machine able to build, run and test the dataplane.
# Idempotent: installs only missing apt packages (waiting for the dpkg lock), creates .venv from
# Debian's python3 with system site-packages (so Debian's pyverbs imports), installs the Python
# dependencies and builds the native code (cffi) when its sources changed.  Needs root for apt.
set -eu
cd "$(dirname "$0")/.."
ROOT=$PWD

PKGS="gcc pkg-config python3-venv python3-dev dpdk dpdk-dev libdpdk-dev liburing-dev libbpf-dev
libxdp-dev iproute2 ethtool prometheus rdma-core ibverbs-providers python3-pyverbs
qemu-system-x86 busybox-static cpio kmod iperf3 perftest openssl git man-db
libpcap-dev tcpdump tshark nfdump"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "bootstrap: missing Debian packages:$missing" >&2
        echo "bootstrap: installing them needs root: sudo $0" >&2
        exit 2
    fi
    echo "bootstrap: installing$missing"
    # DPkg::Lock::Timeout waits for another apt/dpkg (unattended-upgrades) instead of failing
    apt-get -o DPkg::Lock::Timeout=600 update -q
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
        --no-install-recommends $missing
fi

if ! [ -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    echo "bootstrap: creating .venv (Debian python3, --system-site-packages for pyverbs)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Rebuild only when the inputs changed: the stamp hashes every native source and header (any
# depth under native/), the build metadata and the build switches.  DATAPLANE_TESTING=1: this is
# a development install, so the test-only extension dataplane._testing is built too.
# DATAPLANE_DPDK=0 leaves the DPDK worker (dataplane._dpdk) out.  DATAPLANE_WERROR=1: warnings
# fail this build (and so CI's: scripts/test runs this), not a user's pip install.
export DATAPLANE_TESTING=1 DATAPLANE_WERROR=1
stamp=$( (cat pyproject.toml setup.py MANIFEST.in
          for f in $(find native -type f \( -name '*.c' -o -name '*.h' -o -name '*.py' \) |
                     LC_ALL=C sort); do
              echo "$f"; cat "$f"
          done
          echo "DATAPLANE_DPDK=${DATAPLANE_DPDK:-}") | sha256sum | cut -c1-16)
if [ "$(cat .venv/.dataplane-stamp 2>/dev/null)" != "$stamp" ] || \
   ! .venv/bin/python -c 'import dataplane._native, dataplane._testing, matplotlib' 2>/dev/null; then
    echo "bootstrap: installing Python dependencies and building native code"
    .venv/bin/pip install -q --disable-pip-version-check setuptools wheel "cffi>=1.16"
    # matplotlib (perf/report.py's plots) from pip: Debian 12's python3-matplotlib is built
    # against numpy 1, and the venv has numpy 2
    .venv/bin/pip install -q --disable-pip-version-check "numpy>=1.26" "scapy>=2.5" \
        "prometheus-client>=0.19" "pyyaml>=6" "bcrypt>=4" "shtab>=1.6" "argparse-manpage>=4" \
        "pytest>=7" "hypothesis>=6" "ruff>=0.4" "build>=1" "matplotlib>=3.8"
    .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT"
    echo "$stamp" > .venv/.dataplane-stamp
fi
