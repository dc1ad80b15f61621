#!/usr/bin/env bash
# One prepared GPU check: the project's own code at each GPU preset's full size.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--keep] [--nproc N] [--budget-scale K]
#
# Parts run one after another, each in its own process under its own `timeout`, so one
# failure or hang costs only its budget; nothing runs in the background. The whole check
# stops starting parts once its budget (GPU 360 s, dry run 300 s; both times K, default 1,
# for a machine shared with other jobs) is spent. Each part
# writes a JSON file; the report joins them into one JSON object, printed and written to
# FILE or benchmarks/results/gpu_check-<UTC>.json (+ a line in benchmarks/results.jsonl).
# Exit status: 0 when every part succeeded, 1 otherwise.
#
# On a bare GPU machine, missing Python packages are installed from the wheels in .whl/
# (see benchmarks/README.md, "GPU check"); nothing is fetched from a network.
set -u -o pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

dry_run=0
out=""
keep=0
nproc=1
scale=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out=$2; shift ;;
        --keep) keep=1 ;;
        --nproc) nproc=$2; shift ;;
        --budget-scale) scale=$2; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

# Packages the GPU image lacks (monai, nibabel, nilearn, minio and minio's crypto deps):
# install each wheel whose distribution is not importable yet, into a private target.
if [ -d "$repo/.whl" ] && ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
    missing=()
    for wheel in "$repo"/.whl/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        "$python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" \
            >/dev/null 2>&1 || missing+=("$wheel")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
        echo "gpu_check: installing ${#missing[@]} wheels from .whl into $site" >&2
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" "${missing[@]}" || exit 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
parts=$work/parts
mkdir -p "$parts"
flags=()
if [ "$dry_run" = 1 ]; then
    flags+=(--dry-run)
    # A 2-core CPU: about 5-10 s of every part is importing torch and MONAI.
    total=300
    declare -A budget=([prepare]=45 [train-ae]=45 [train-diffusion]=40 [sample]=30)
else
    total=360
    # seconds per part: prepare, then per preset autoencoder, diffusion, sample
    declare -A budget=([prepare]=75 [train-ae]=45 [train-diffusion]=40 [sample]=30)
    declare -A budget_multi=([train-ae]=70 [train-diffusion]=60)
fi
total=$((total * scale))
start=$(date +%s)
names=()

# run_part NAME BUDGET COMMAND...: run under timeout, record its exit status and budget.
run_part() {
    local name=$1 want=$2
    shift 2
    names+=("$name")
    local left=$((total - ($(date +%s) - start)))
    if [ "$left" -lt 5 ]; then
        echo "gpu_check: $name skipped (the check's ${total} s are spent)" >&2
        return
    fi
    want=$((want * scale))
    local limit=$((want < left ? want : left))
    echo "$limit" >"$parts/$name.budget"
    echo "gpu_check: $name (at most ${limit} s)" >&2
    timeout -k 5 "$limit" "$@" >"$parts/$name.log" 2>&1
    echo $? >"$parts/$name.rc"
}

module=(-m benchmarks.gpu_check)
run_part prepare "${budget[prepare]}" \
    "$python" "${module[@]}" prepare --work "$work" --out "$parts/prepare.json" "${flags[@]}"
for preset in gpu-16g gpu-32g multi-gpu; do
    launcher=("$python")
    ae_budget=${budget[train-ae]}
    diff_budget=${budget[train-diffusion]}
    if [ "$preset" = multi-gpu ]; then
        # The multi-gpu preset trains the way a PyTorchJob does: under torchrun.
        launcher=("$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc")
        if [ "$dry_run" = 0 ]; then
            ae_budget=${budget_multi[train-ae]}
            diff_budget=${budget_multi[train-diffusion]}
        fi
    fi
    common=(--preset "$preset" --work "$work" "${flags[@]}")
    run_part "$preset.train-ae" "$ae_budget" \
        "${launcher[@]}" "${module[@]}" train-ae "${common[@]}" --out "$parts/$preset.train-ae.json"
    run_part "$preset.train-diffusion" "$diff_budget" \
        "${launcher[@]}" "${module[@]}" train-diffusion "${common[@]}" \
        --out "$parts/$preset.train-diffusion.json"
    run_part "$preset.sample" "${budget[sample]}" \
        "$python" "${module[@]}" sample "${common[@]}" --out "$parts/$preset.sample.json"
done

report=(--parts "$parts" --names "${names[@]}" --wall-s "$(($(date +%s) - start))" "${flags[@]}")
[ -n "$out" ] && report+=(--out "$out")
"$python" "${module[@]}" report "${report[@]}"
status=$?
if [ "$keep" = 1 ]; then
    echo "gpu_check: parts and logs kept in $work" >&2
else
    # The part logs are what explains a failure: keep them next to the result when any failed.
    if [ "$status" != 0 ]; then
        echo "gpu_check: a part failed; its log is in $parts" >&2
    else
        rm -rf "$work"
    fi
fi
exit "$status"
