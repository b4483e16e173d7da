#!/bin/bash
# Submit a job script with this site's sbatch options (slurm/site.env, or the file named by ONE4D_SITE).
#   slurm/submit.sh [sbatch options] slurm/<train|eval|shard|shard_merge|encode_latents>.sbatch [script arguments]
# The site's options for that script go first, so options given here win. Prints what sbatch prints.
set -euo pipefail
export ONE4D_ROOT=${ONE4D_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ONE4D_SITE=$(realpath "${ONE4D_SITE:-$ONE4D_ROOT/slurm/site.env}")
export ONE4D_SITE
source "$ONE4D_SITE"

script=
for arg in "$@"; do
    if [[ $arg == *.sbatch ]]; then script=$arg; break; fi
done
[[ -n $script ]] || { echo "usage: $0 [sbatch options] slurm/<job>.sbatch [arguments]" >&2; exit 2; }
kind=$(basename "$script" .sbatch)
if ! declare -p "ONE4D_SBATCH_${kind^^}" >/dev/null 2>&1; then
    echo "$ONE4D_SITE defines no ONE4D_SBATCH_${kind^^} for $script" >&2
    exit 2
fi
site_opts="ONE4D_SBATCH_${kind^^}[@]"
# inside a job (the training job submitting its evaluation, an salloc shell) the environment holds that job's
# allocation (SLURM_NTASKS_PER_NODE, SLURM_MEM_PER_NODE ...): it would travel with the new job (--export=ALL), whose
# srun reads it as options of its own and may refuse to start (SLURM_MEM_PER_CPU next to SLURM_MEM_PER_NODE)
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    for var in $(compgen -e SLURM_); do
        if [[ $var != SLURM_CONF ]]; then unset "$var"; fi
    done
fi
exec sbatch "${ONE4D_SBATCH_ALL[@]}" "${!site_opts}" "$@"
