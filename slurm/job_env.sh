# Sourced first by every job script: this site's settings, its modules and the Python environment.
# The scripts run from Slurm's spool copy, so the repository is found through ONE4D_ROOT (set by submit.sh)
# or, for a plain `sbatch` from the repository root, the submission directory.
if (( BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4) )); then
    echo "[one4d] the job scripts need bash 4.4 or newer (empty arrays under set -u), this is $BASH_VERSION" >&2
    exit 2
fi
export ONE4D_ROOT=${ONE4D_ROOT:-$SLURM_SUBMIT_DIR}
export ONE4D_SITE=${ONE4D_SITE:-$ONE4D_ROOT/slurm/site.env}
if [[ ! -f $ONE4D_SITE ]]; then
    echo "[one4d] no site file at $ONE4D_SITE (set ONE4D_SITE, or submit from the repository root)" >&2
    exit 2
fi
source "$ONE4D_SITE"
# the settings the job scripts read, checked now rather than where they are used (after hours of training)
ONE4D_MAX_RESTARTS=${ONE4D_MAX_RESTARTS:-20}
ONE4D_TASK_EXIT_WAIT_S=${ONE4D_TASK_EXIT_WAIT_S:-300}
ONE4D_EVAL_AFTER_TRAIN=${ONE4D_EVAL_AFTER_TRAIN:-1}
ONE4D_REQUEUE_ON_TERM=${ONE4D_REQUEUE_ON_TERM:-0}
for setting in ONE4D_MAX_RESTARTS ONE4D_TASK_EXIT_WAIT_S; do
    if [[ ! ${!setting} =~ ^(0|[1-9][0-9]*)$ ]]; then  # no leading 0: bash would read 08 as octal
        echo "[one4d] $setting=${!setting} ($ONE4D_SITE or the environment): must be a whole number" >&2
        exit 2
    fi
done
if (( ONE4D_TASK_EXIT_WAIT_S < 1 )); then  # srun --wait=0 is no limit: a crashed rank would leave the rest blocked
    echo "[one4d] ONE4D_TASK_EXIT_WAIT_S=0 ($ONE4D_SITE or the environment): must be 1 or more (srun reads 0 as" \
         "'wait for ever')" >&2
    exit 2
fi
for setting in ONE4D_EVAL_AFTER_TRAIN ONE4D_REQUEUE_ON_TERM; do
    if [[ ${!setting} != [01] ]]; then
        echo "[one4d] $setting=${!setting} ($ONE4D_SITE or the environment): must be 0 or 1" >&2
        exit 2
    fi
done
if [[ -n ${ONE4D_MODULES:-} ]]; then
    # a batch shell is not a login shell: the `module` function may not be defined yet
    for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh /usr/share/lmod/lmod/init/bash; do
        if ! type module >/dev/null 2>&1 && [[ -f $init ]]; then source "$init"; fi
    done
    # shellcheck disable=SC2086  # a space-separated list of modules
    module load $ONE4D_MODULES || { echo "[one4d] module load $ONE4D_MODULES failed" >&2; exit 2; }
fi
if [[ -n ${ONE4D_VENV:-} ]]; then
    export VIRTUAL_ENV=$ONE4D_VENV PATH=$ONE4D_VENV/bin:$PATH
fi
command -v one4d >/dev/null || { echo "[one4d] 'one4d' is not on PATH (ONE4D_VENV=${ONE4D_VENV:-})" >&2; exit 2; }
# from Slurm 22.05 on, srun does not inherit the job's --cpus-per-task (sbatch(1)): it reads SRUN_CPUS_PER_TASK.
# Without it each training task, data workers included, may be pinned to a single CPU where tasks are bound.
# Always this job's own value: one inherited from the job that submitted this one (--export=ALL) would make srun
# ask for CPUs this allocation may not have
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; else unset SRUN_CPUS_PER_TASK; fi
