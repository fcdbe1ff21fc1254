#!/usr/bin/env bash
# Issue 10's GPU measurements on a Python 3.12 host with torch/torchaudio and no package index:
# installs the project's dependencies from the offline bundle, then runs bench/gpu_bench.py
# (at most 8 minutes in all) and leaves bench/gpu_bench.py's JSON, the install check and nvidia-smi in $OUT.
#
# Prepare, in a clone with `make install` done (data/ is git-ignored; never commit it):
#   BUNDLE_TAR=$PWD/data/carry/esc50-site.tar.xz bash ../shared/tools/offline-bundle.sh /tmp/esc50-wheels
#   .venv/bin/esc50 prepare --source ../shared/esc50 --dtype uint8 --out data/carry/shards
#   git rev-parse HEAD > data/carry/COMMIT        # the device copy has no .git
#   du -sh data/carry                              # the device tool carries at most 64 MiB
# (2026-11-28: the tarball 27.8 MiB, built in ~60 min on the loaded 2-core box, most of it xz -9e;
# the uint8 shards 21.2 MB, ~4 min; 48 MiB in all. The tarball holds ray (tune), optuna,
# mlflow-skinny with the SQLAlchemy store and pyfunc, sqlalchemy, alembic, cmaes, soundfile; no plotly.)
# Run, with the device tool (`run`):
#   command:   bash bench/gpu_run.sh
#   carry:     ["data/carry"]
#   timeout_s: 540
# Then copy the JSON from the returned files into bench/results/ (gpu_bench_<GPU>_<date>.json),
# commit it, and quote it in the README's Benchmarks table.
#
# Knobs: OUT (default $OUT of the device tool, else /tmp/gpu_bench_out), CARRY (default data/carry),
# PYTHON (default python3), BUDGET_S (default 480: the whole script, install included); further
# arguments go to bench/gpu_bench.py (e.g. --skip layouts,full --search-minutes 7 for a search-only run).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
CARRY=${CARRY:-data/carry}
OUT=${OUT:-/tmp/gpu_bench_out}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
SITE=/tmp/esc50-site
mkdir -p "$OUT"
for f in "$CARRY/esc50-site.tar.xz" "$CARRY/shards/_manifest.json"; do
  [[ -e $f ]] || { echo "gpu_run.sh: $f is missing (see the header: what to prepare and carry)" >&2; exit 2; }
done
if [[ ! -f $SITE/.complete ]]; then  # a warm machine keeps it between calls
  rm -rf "$SITE" && mkdir -p "$SITE"
  tar -xJf "$CARRY/esc50-site.tar.xz" -C "$SITE"
  touch "$SITE/.complete"
fi
# The bundle after the project; both before the host's site-packages (the bundle holds only what the
# host lacks). Ray's workers inherit this from the driver.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" - > "$OUT/install-check.txt" <<'PY'
import importlib, sys
mods = ["torch", "torchaudio", "ray", "ray.tune", "optuna", "mlflow", "sqlalchemy", "alembic", "soundfile",
        "pyarrow", "pandas", "numpy", "matplotlib", "cmaes", "search.cli", "trainable.packed_worker"]
for m in mods:
    mod = importlib.import_module(m)
    print(m, getattr(mod, "__version__", ""), getattr(mod, "__file__", ""))
try:
    import plotly  # optional: the interactive search plots (the bundle leaves it out by default)
    print("plotly", plotly.__version__)
except ImportError:
    print("plotly absent: PNG plots only")
print("python", sys.version)
PY
echo "install: $(( $(date +%s) - START )) s"
LEFT=$(( BUDGET_S - ($(date +%s) - START) - 10 ))
if [[ -z ${COMMIT:-} && -f $CARRY/COMMIT ]]; then COMMIT=$(cat "$CARRY/COMMIT"); fi
exec "$PY" bench/gpu_bench.py --shards "$CARRY/shards" --out "$OUT/gpu_bench.json" --budget "$LEFT" \
  ${COMMIT:+--commit "$COMMIT"} "$@"
