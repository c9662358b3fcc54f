#!/usr/bin/env bash
# README command 1 as a new user runs it, timed: a fresh clone of this repository's HEAD beside ../shared, a new
# venv, an empty COMPRESS_CACHE, then `compress run recipes/smollm2-135m-lab.yaml`. Prints the wall times of the
# install and the run; the run's own log (timestamps per stage) is in CLONE/lab.log and its results in
# CLONE/runs/smollm2-135m-lab (pip's output in CLONE/install.log). Run it on a quiet machine (the speed figures
# check for contention, but the stage times do not).
#
#   bash benchmarks/lab_fresh_clone.sh [CLONE_DIR]     (default: ../lab-clone, beside the repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
clone=${1:-$repo/../lab-clone}
cache=$clone.cache
if [ -e "$clone" ] || [ -e "$cache" ]; then
  echo "error: $clone or $cache exists; pass a new folder" >&2
  exit 2
fi
git clone -q "$repo" "$clone"
cd "$clone"
export COMPRESS_CACHE=$cache
echo "commit $(git rev-parse --short HEAD); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) CPUs"
uptime
t0=$(date +%s)
python3 -m venv .venv && . .venv/bin/activate
if ! { pip install -q torch==2.13.0 && pip install -q -e .; } > install.log 2>&1; then
  echo "error: the install failed; see $clone/install.log" >&2
  exit 1
fi
t1=$(date +%s)
echo "install: $((t1 - t0)) s ($(date -u +%H:%M:%S) UTC)"
rc=0
compress run recipes/smollm2-135m-lab.yaml > lab.log 2>&1 || rc=$?
t2=$(date +%s)
echo "run: $((t2 - t1)) s, exit $rc; wall $((t2 - t0)) s ($(( (t2 - t0) / 60 )) min)"
uptime
exit $rc
