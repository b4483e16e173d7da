#!/bin/bash
# Shard a manifest with a job array of N tasks plus a merge/verify job that runs only if all of them succeed.
#   slurm/shard_submit.sh [--tasks N (default 8)] MANIFEST OUT_DIR [one4d shard options, e.g. --samples-per-shard 64]
# Prints "ARRAY_JOB_ID MERGE_JOB_ID". A failed array task cancels the merge job (it never runs half a dataset).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tasks=8
if [[ ${1:-} == --tasks ]]; then tasks=$2; shift 2; fi
if (( $# < 2 )) || (( tasks < 1 )); then
    echo "usage: $0 [--tasks N] MANIFEST OUT_DIR [one4d shard options]" >&2
    exit 2
fi
manifest=$(realpath "$1") out_dir=$(realpath -m "$2")
shift 2
mkdir -p "$out_dir"
array=$("$here/submit.sh" --parsable --array="0-$(( tasks - 1 ))" "$here/shard.sbatch" "$manifest" "$out_dir" "$@")
array=${array%%;*}  # --parsable prints "id;cluster" on multi-cluster setups
merge=$("$here/submit.sh" --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes \
        "$here/shard_merge.sbatch" "$out_dir")
echo "${array} ${merge%%;*}"
