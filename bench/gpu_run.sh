#!/usr/bin/env bash
# The GPU benchmark in one command on an offline GPU machine (no package index there):
# install the carried wheel bundle (made here by `python -m bench.bundle --python-version 3.12`)
# into a fresh folder, then run `python -m bench.gpu` with that folder on PYTHONPATH.
#
#   bash bench/gpu_run.sh BUNDLE OUTDIR [bench.gpu options, e.g. --quick --budget-s 420]
#
# OUTDIR gets gpu-bench.json (rewritten after every section) and gpu-run.log (all output).
# Environment: PYTHON, the interpreter that has torch (default python3); VL_SITE, the folder the
# wheels go to (default /tmp/vl-site; emptied first); VL_ALLOW_MISSING, distributions the image
# should provide that may be absent (tests only: tests/test_bench_gpu.py runs this on a 3.12 venv
# without torch, with --device cpu --budget-s 0).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash bench/gpu_run.sh BUNDLE OUTDIR [bench.gpu options]" >&2
    exit 2
fi
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=$(cd "$1" && pwd)
mkdir -p "$2"
out=$(cd "$2" && pwd)
shift 2
python=${PYTHON:-python3}
site=${VL_SITE:-/tmp/vl-site}
allow=()
for dist in ${VL_ALLOW_MISSING:-}; do
    allow+=(--allow-missing "$dist")
done

step() {
    echo "+ $*"
    "$@"
}

main() {
    echo "gpu_run: $(date -u +%FT%TZ) on $(hostname), repo $repo, bundle $bundle, out $out"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L || true
    fi
    cd "$repo"
    step "$python" -m bench.bundle_install "$bundle" "$site" ${allow[@]+"${allow[@]}"}
    # The repo first (pipeline, actors, bench), then the bundle; Ray's workers inherit both.
    export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1
    echo "gpu_run: PYTHONPATH=$PYTHONPATH"
    step "$python" -m bench.gpu --out "$out" "$@"
}

# pipefail: the benchmark's exit status, not tee's, is this script's.
main "$@" 2>&1 | tee "$out/gpu-run.log"
