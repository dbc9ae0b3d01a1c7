#!/usr/bin/env bash
# One command, one report on a lent CUDA machine (bench/gpu.py does the work; see its docstring):
#   bash bench/gpu.sh                 # ~8 minutes at most; JSON to $OUT/gpu_report.json or bench/gpu_report.json
#   bash bench/gpu.sh --dry-run       # every step at tiny sizes on the CPU
# A bare machine: installs requirements.txt first if torch or tiktoken is missing (a failure is tolerated:
# the steps then record why they failed).
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c "import torch, tiktoken" >/dev/null 2>&1; then
    echo "gpu.sh: torch or tiktoken missing: pip install -q -r requirements.txt"
    timeout 300 "$PY" -m pip install -q -r requirements.txt || echo "gpu.sh: pip install failed (rc $?); going on"
fi
# the install's time comes out of the 8 minutes (480 s) unless --budget is given
case " $* " in
    *" --budget"*) exec "$PY" bench/gpu.py "$@" ;;
    *) left=$((480 - SECONDS)); [ "$left" -lt 120 ] && left=120
       exec "$PY" bench/gpu.py --budget "$left" "$@" ;;
esac
