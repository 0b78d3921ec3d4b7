#!/usr/bin/env bash
# One prepared command for a GPU machine without network: install seqpar from this tree, then
#   kernels  pytest tests/kernels with the Triton kernels compiled for the GPU (test_triton_gpu.py must run)
#   sync     attention forward + backward (Triton, bf16, packed documents) with no host synchronisation
#   bench    seqpar bench kernels at 4K/16K/64K: TFLOP/s against SDPA flash, packed vs one document
#   train    configs/gpu-smoke.yaml: a ~180M Llama on 32K-token streams, one GPU: tok/s, MFU, peak memory
#   memory   seqpar bench memory: the memory estimator vs torch.cuda.max_memory_allocated, per policy
#   offload  seqpar bench offload: offload and memo (CUDA engine) step time vs selective at 32K/64K/128K
# and print a summary (part, status, seconds, key numbers), also written to DIR/summary.md and .json.
#
#   bash tools/fetch_device_wheels.sh                 # first, where pip has network: megatron-core, highspy -> .whl/
#   bash tools/device_check.sh --out "$OUT"           # on the GPU machine (.whl carried along): about 4 minutes
#   bash tools/device_check.sh --dry --out /tmp/dc    # the same steps on CPU at tiny sizes, Triton interpreted
#
# Each part has its own timeout and writes into DIR as soon as it ends, so a run cut short still
# returns what ran. DIR holds at most 8 files: summary.md, summary.json, kernels.log,
# sync_check.log, bench.log, train.log, train_metrics.jsonl, extras.tar.gz (JUnit XML, benchmark
# CSV and PNG, sync check JSON, install log, training config). Exit status 0 only if every part passed.
set -euo pipefail

PROG=device_check
ALL_PARTS=kernels,sync,bench,train,memory,offload
USAGE="bash tools/device_check.sh [--out DIR] [--dry] [--quick] [--python PY] [--parts $ALL_PARTS]"

usage() {
    cat <<EOF
usage: $USAGE

  --out DIR      where results go (default: \$OUT if set, else runs/device_check)
  --dry          run the same steps on CPU: TRITON_INTERPRET=1, tiny sizes, nothing installed (about a minute)
  --quick        GPU: fewer kernel tests, two benchmark lengths, 4 training steps
  --python PY    the interpreter (default: \$PYTHON, else python3 on PATH)
  --parts LIST   comma-separated subset of $ALL_PARTS (default: all; install always runs)
  -h, --help     this help
EOF
}
die() { echo "$PROG: error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="" DRY=0 QUICK=0 PY=${PYTHON:-python3} PARTS=$ALL_PARTS
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 && -n "$2" ]] || die "--out needs a directory (usage: $USAGE)"; DIR=$2; shift 2 ;;
        --out=*) DIR=${1#--out=}; shift ;;
        --dry) DRY=1; shift ;;
        --quick) QUICK=1; shift ;;
        --python) [[ $# -ge 2 && -n "$2" ]] || die "--python needs an interpreter (usage: $USAGE)"; PY=$2; shift 2 ;;
        --python=*) PY=${1#--python=}; shift ;;
        --parts) [[ $# -ge 2 && -n "$2" ]] || die "--parts needs a list (usage: $USAGE)"; PARTS=$2; shift 2 ;;
        --parts=*) PARTS=${1#--parts=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (usage: $USAGE)" ;;
    esac
done
for part in ${PARTS//,/ }; do
    [[ ",$ALL_PARTS," == *",$part,"* ]] || die "--parts: unknown part '$part'; choose from $ALL_PARTS"
done
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found; pass --python PATH"
PY=$(command -v "$PY")
[[ $PY == */* ]] && PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, symlinks kept (venvs)
MODE=gpu
[[ $DRY == 1 ]] && MODE=dry

DIR=${DIR:-${OUT:-$ROOT/runs/device_check}}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WORK=$DIR/work
# Only this script's own outputs are removed: DIR may be shared (e.g. the device tool's $OUT).
rm -rf "$WORK" "$DIR"/{summary.md,summary.json,kernels.log,sync_check.log,bench.log,train.log,train_metrics.jsonl,extras.tar.gz}
mkdir -p "$WORK"
cd "$ROOT"
REPORT=("$PY" "$ROOT/tools/device_check_report.py")

export PYTHONUNBUFFERED=1
SITE=${TMPDIR:-/tmp}/seqpar-device-site  # carried wheels (and, as a fallback, the import hook) go here
if [[ $MODE == dry ]]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # Triton decides interpreted-or-compiled at import
else
    unset TRITON_INTERPRET
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

# Per part: GPU timeouts sum to under 10 minutes (a device call may run 10); a full run should take 4-5.
declare -A LIMIT
if [[ $MODE == gpu ]]; then
    LIMIT=([install]=80 [kernels]=130 [sync]=50 [bench]=80 [train]=80 [memory]=60 [offload]=110)
else
    LIMIT=([install]=600 [kernels]=600 [sync]=600 [bench]=600 [train]=600 [memory]=600 [offload]=600)  # hang guards only: CI machines can be slow
fi

RC=0 SECONDS_TAKEN=0
run_part() {  # run_part NAME LOG CMD...: CMD under NAME's timeout, output to the console and to LOG
    local name=$1 log=$2 start
    shift 2
    echo "== $name (timeout ${LIMIT[$name]} s)" | tee "$log"
    start=$(date +%s.%N)
    set +e
    timeout --kill-after=15 "${LIMIT[$name]}" "$@" 2>&1 | tee -a "$log"
    RC=${PIPESTATUS[0]}
    set -e
    SECONDS_TAKEN=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: exit $RC after $SECONDS_TAKEN s" | tee -a "$log"
}
record() {  # record NAME [report options]: check NAME's outputs, update the summary files
    local name=$1
    shift
    "${REPORT[@]}" record --dir "$DIR" --part "$name" --rc "$RC" --seconds "$SECONDS_TAKEN" --limit "${LIMIT[$name]}" "$@" \
        || echo "$PROG: warning: could not record part $name" >&2
}
finish() {  # pack the raw outputs, print the summary; exit status 0 only if every part passed
    if [[ -d "$WORK" ]]; then
        tar -czf "$DIR/extras.tar.gz" -C "$WORK" . && rm -rf "$WORK"
    fi
    "${REPORT[@]}" final --dir "$DIR" --why-not-run "$1"
}

# ---------------------------------------------------------------------------------------------
# install: carried wheels, then seqpar itself (editable; else an import hook), checked from / and the repo.

seqpar_importable() {  # from the repo (where the parts run) and, on the GPU machine, from / too
    local here dirs=("$ROOT")
    [[ $MODE == gpu ]] && dirs+=(/)
    for here in "${dirs[@]}"; do
        (cd "$here" && "$PY" - "$ROOT" <<'EOF') || return 1
import json, os, platform, sys
import seqpar.kernels.triton_attn, seqpar.launcher.cli, seqpar.parallel, seqpar.bench.kernel_bench
import torch, triton
root = os.path.realpath(sys.argv[1])
for mod in (seqpar, seqpar.kernels, seqpar.launcher, seqpar.parallel):
    if not os.path.realpath(mod.__file__).startswith(root + os.sep):
        sys.exit(f"{mod.__name__} comes from {mod.__file__}, not from {root}")
cuda = torch.cuda.is_available()
env = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__, cuda=cuda,
           device=torch.cuda.get_device_name(0) if cuda else "cpu")
print("env:", json.dumps(env))  # read by tools/device_check_report.py
EOF
    done
}

write_import_hook() {  # seqpar's package-dir mapping as a meta-path finder, run by sitecustomize from PYTHONPATH
    "$PY" - "$ROOT" "$SITE/sitecustomize.py" <<'EOF'
import sys

root, path = sys.argv[1], sys.argv[2]
hook = f'''"""Written by tools/device_check.sh: import seqpar from {root} without installing it.

pyproject maps seqpar.kernels, .parallel, .launcher and ._profiles onto top-level folders, so a
sys.path entry alone cannot find them; this finder does what the editable install's finder does.
"""
import importlib.machinery
import importlib.util
import os
import sys

_ROOT = {root!r}
_DIRS = {{"seqpar": "seqpar", "seqpar.parallel": "parallel", "seqpar.kernels": "kernels",
         "seqpar.launcher": "launcher", "seqpar._profiles": "cluster/profiles"}}


class _SeqparFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        sub = _DIRS.get(name)
        if sub is None:
            return None
        folder = os.path.join(_ROOT, sub)
        init = os.path.join(folder, "__init__.py")
        if os.path.isfile(init):
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


sys.meta_path.insert(0, _SeqparFinder)
'''
with open(path, "w") as f:
    f.write(hook)
EOF
}

install_project() {
    echo "python: $PY ($("$PY" -V 2>&1))"
    if [[ $MODE == dry ]]; then
        seqpar_importable || { echo "seqpar is not importable by $PY from $ROOT: pip install -e . there, or pass --python"; return 1; }
        echo "seqpar: dry run, nothing installed"
        return 0
    fi
    rm -rf "$SITE"
    mkdir -p "$SITE"
    local wheels=() mod how
    shopt -s nullglob
    wheels=("$ROOT"/.whl/*.whl)
    shopt -u nullglob
    if [[ ${#wheels[@]} -gt 0 ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
        echo "installed into $SITE: $(cd "$ROOT/.whl" && ls -- *.whl | tr '\n' ' ')"
    else
        echo "no wheels in .whl/ (run tools/fetch_device_wheels.sh where pip has network, and carry .whl)"
    fi
    for mod in megatron.core.datasets.indexed_dataset highspy; do
        "$PY" -W ignore -c "import $mod" >/dev/null 2>&1 \
            || echo "warning: $mod is not importable (train needs megatron-core): carry its wheel in .whl/"
    done
    if seqpar_importable 2>/dev/null; then
        how="already importable from $ROOT"
    elif "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT" && seqpar_importable; then
        how="pip install -e (editable)"
    else
        echo "editable install did not work; falling back to an import hook in $SITE/sitecustomize.py"
        write_import_hook
        seqpar_importable || { echo "seqpar is still not importable by $PY"; return 1; }
        how="import hook ($SITE/sitecustomize.py)"
    fi
    echo "seqpar: $how"
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device: use --dry on CPU')"
}

"${REPORT[@]}" init --dir "$DIR" --mode "$MODE" --parts "$PARTS"
export PY ROOT SITE MODE
export -f install_project seqpar_importable write_import_hook
run_part install "$WORK/install.log" bash -c 'set -euo pipefail; install_project'
INSTALL_NOTE=$(sed -n 's/^seqpar: //p' "$WORK/install.log" | tail -1)
record install --note "${INSTALL_NOTE:-install failed}"
if [[ $RC -ne 0 ]]; then
    echo "$PROG: install failed (exit $RC); no part can run" >&2
    finish "not run: install failed"
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# The parts, in order; each one's sizes per mode.

if [[ ",$PARTS," == *,kernels,* ]]; then
    tests=(tests/kernels tests/memory/test_cuda_engine.py)
    [[ $QUICK == 1 ]] && tests=(tests/kernels/test_triton_gpu.py tests/kernels/test_ranges.py tests/memory/test_cuda_engine.py)
    if [[ $MODE == dry ]]; then  # the CPU-runnable core, interpreted; the CUDA-only files are collected and skip
        tests=(tests/kernels/test_ranges.py tests/kernels/test_triton_gpu.py tests/memory/test_cuda_engine.py
               "tests/kernels/test_triton.py::test_block_matches_oracle[packed causal GQA]"
               tests/kernels/test_triton.py::test_autograd_wrappers_with_triton tests/kernels/test_triton.py::test_empty_sides)
    fi
    workers=()
    # Autotuning compiles ~14 configurations per kernel shape: spread the compiles over the CPU cores.
    if [[ $MODE == gpu ]] && "$PY" -c "import xdist" >/dev/null 2>&1; then
        n=$(( $(nproc) - 4 )); (( n > 12 )) && n=12; (( n < 2 )) && n=2
        workers=(-n "${DEVICE_CHECK_WORKERS:-$n}")
    fi
    run_part kernels "$DIR/kernels.log" "$PY" -m pytest -q -p no:cacheprovider -rfEs "${workers[@]}" \
        --junitxml "$WORK/kernels_junit.xml" "${tests[@]}"
    record kernels
fi

if [[ ",$PARTS," == *,sync,* ]]; then
    shape=()  # GPU: the defaults, 32K tokens in 4 documents, 8 heads / 2 KV heads, head_dim 128, bf16
    [[ $MODE == dry ]] && shape=(--tokens 64 --docs 3 --heads 4 --kv-heads 2 --head-dim 16)
    run_part sync "$DIR/sync_check.log" "$PY" -m seqpar.bench.sync_check "${shape[@]}" --json "$WORK/sync_check.json"
    record sync
fi

if [[ ",$PARTS," == *,bench,* ]]; then
    if [[ $MODE == dry ]]; then
        lengths=16,32 bench=(--cpu-smoke --heads 1 --head-dim 16 --tokens 32 --docs 2 --repeats 1)
    elif [[ $QUICK == 1 ]]; then
        lengths=4096,16384 bench=(--repeats 3)
    else
        lengths=4096,16384,65536 bench=()
    fi
    run_part bench "$DIR/bench.log" "$PY" -m seqpar.launcher bench kernels --lengths "$lengths" "${bench[@]}" --output "$WORK"
    record bench --lengths "$lengths"
fi

if [[ ",$PARTS," == *,train,* ]]; then
    steps=10
    [[ $QUICK == 1 ]] && steps=4
    overrides=(logging.progress=false)
    if [[ $MODE == dry ]]; then  # tiny-cpu sizes and the torch reference kernel (the interpreter is too slow to train)
        steps=3
        overrides+=(model.dim=64 model.n_layers=2 model.n_heads=4 model.n_kv_heads=2 model.ffn_multiple_of=32
                    data.seq_len=256 data.tokens_per_step=512 kernels.attention=reference train.dtype=fp32)
    fi
    run_dir=$(mktemp -d "${TMPDIR:-/tmp}/seqpar-device-train.XXXXXX")
    run_part train "$DIR/train.log" "$PY" -m seqpar.launcher train configs/gpu-smoke.yaml --nproc 1 \
        "run.output_dir=$run_dir/run" "train.steps=$steps" "${overrides[@]}"
    if [[ -f "$run_dir/run/metrics.jsonl" ]]; then cp "$run_dir/run/metrics.jsonl" "$DIR/train_metrics.jsonl"; fi
    if [[ -f "$run_dir/run/config.yaml" ]]; then cp "$run_dir/run/config.yaml" "$WORK/train_config.yaml"; fi
    rm -rf "$run_dir"
    record train --steps "$steps"
fi

if [[ ",$PARTS," == *,memory,* ]]; then  # its log goes into extras.tar.gz: DIR holds at most 8 files
    sizes=(--model 2048,8,16,4 --vocab 32000 --tokens 8192,32768 --chunk 4096 --policies none,full,selective,offload,memo)
    [[ $MODE == dry ]] && sizes=(--model 128,4,4,2 --vocab 512 --tokens 512,1024 --chunk 256)  # activations above the 1 MB score blocks
    run_part memory "$WORK/memory.log" "$PY" -m seqpar.launcher bench memory "${sizes[@]}" --json "$WORK/memory_bench.json"
    record memory
fi

if [[ ",$PARTS," == *,offload,* ]]; then  # its log goes into extras.tar.gz too
    sizes=(--model 1024,8,8,2 --vocab 32000 --tokens 32768,65536,131072 --steps 2)
    [[ $MODE == dry ]] && sizes=(--model 64,4,4,2 --vocab 512 --tokens 256 --steps 1)
    run_part offload "$WORK/offload.log" "$PY" -m seqpar.launcher bench offload "${sizes[@]}" --json "$WORK/offload_bench.json"
    record offload
fi

finish "did not run"
