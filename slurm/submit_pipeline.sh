#!/usr/bin/env bash
# Submit the stages of a pipeline as a chain of pretrain.sbatch jobs: stage k+1 starts only after stage k
# finished successfully (afterok), and every stage shares one run dir. A requeued stage keeps its job id, so
# the chain survives preemption; a failed stage cancels the rest.
#
#   slurm/submit_pipeline.sh RUN_DIR pipeline=NAME [Hydra overrides for every stage...]
#       Each job runs `pipeline=NAME pipeline.only=<stage> run_dir=RUN_DIR ...`: exactly the config that stage
#       has in the whole pipeline (the pipeline file's per-stage overrides included; the command line's win),
#       starting from the previous stage's final/ in RUN_DIR. The stages default to the pipeline's own list.
#   slurm/submit_pipeline.sh RUN_DIR [overrides...]          (no pipeline=: plain stages)
#   Either form takes --config-dir DIR (the user's own stage/data/model/pipeline options, see README).
#       Each job runs `stage=<stage> run_dir=RUN_DIR stage.init_from=RUN_DIR/<previous stage>/final ...`.
#
# Prints one line per stage: "<stage> <job id>".
# Environment knobs:
#   LONGVL_STAGES       stages in order (default: the pipeline's stages; without pipeline=: "s0 s1 s2 s3")
#   LONGVL_PYTHON       Python that lists a pipeline's stages (default: python)
#   LONGVL_STAGE_KEY    plain mode: override key that selects a stage (default: stage)   -> stage=s1
#   LONGVL_RUN_DIR_KEY  override key of the run dir (default: run_dir)                   -> run_dir=RUN_DIR
#   LONGVL_INIT_FROM_KEY plain mode: override key of the handoff (default: stage.init_from; empty: none)
#   LONGVL_SBATCH_ARGS  extra sbatch options for every stage, e.g. "--nodes=4 --ntasks-per-node=8 --time=4:00:00"
#   LONGVL_AFTER        job id the first stage waits for (default: none)
# Everything pretrain.sbatch reads (LONGVL_CMD, LONGVL_LAUNCH_MODE, ...) is passed on through the environment.
set -euo pipefail

RUN_DIR=${1:?usage: submit_pipeline.sh RUN_DIR [overrides...]}
shift
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SBATCH_SCRIPT="$REPO/slurm/pretrain.sbatch"

# --config-dir DIR made absolute: the stage list below is composed from $REPO, the jobs from their own cwd.
args=()
config_dir_next=0
for arg in "$@"; do
    if [ "$config_dir_next" = 1 ]; then
        arg=$(cd "$arg" 2>/dev/null && pwd || echo "$arg")  # a missing DIR is reported by the config loader
        config_dir_next=0
    elif [ "$arg" = --config-dir ]; then
        config_dir_next=1
    elif [[ $arg == --config-dir=* ]]; then
        dir=${arg#--config-dir=}
        arg="--config-dir=$(cd "$dir" 2>/dev/null && pwd || echo "$dir")"
    fi
    args+=("$arg")
done
set -- ${args[@]+"${args[@]}"}

PIPELINE=""
for arg in "$@"; do
    case "$arg" in pipeline=*) PIPELINE=${arg#pipeline=} ;; esac
done
if [ -n "$PIPELINE" ] && [ -z "${LONGVL_STAGES:-}" ]; then
    # The pipeline's stage list, composed with the same overrides (a bad one fails here, before any sbatch).
    LONGVL_STAGES=$(cd "$REPO" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "${LONGVL_PYTHON:-python}" -c '
import sys
from train.config.compose import load_config
from train.config.model import ConfigError
try:
    print(" ".join(entry.stage for entry in load_config(sys.argv[1:]).pipeline.stages))
except ConfigError as err:
    sys.exit(f"longvl: config error: {err}")' "$@")
fi
read -r -a STAGES <<< "${LONGVL_STAGES:-s0 s1 s2 s3}"
read -r -a EXTRA <<< "${LONGVL_SBATCH_ARGS:-}"
[ "${#STAGES[@]}" -gt 0 ] || { echo "submit_pipeline.sh: LONGVL_STAGES is empty" >&2; exit 2; }

INIT_FROM_KEY=${LONGVL_INIT_FROM_KEY-stage.init_from}
previous=${LONGVL_AFTER:-}
previous_stage=""
for stage in "${STAGES[@]}"; do
    dependency=()
    [ -n "$previous" ] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    if [ -n "$PIPELINE" ]; then
        # The trainer composes the stage and its handoff (previous stage's final/ in RUN_DIR) itself.
        select=("pipeline.only=$stage")
    else
        select=("${LONGVL_STAGE_KEY:-stage}=$stage")
        [ -n "$previous_stage" ] && [ -n "$INIT_FROM_KEY" ] && select+=("$INIT_FROM_KEY=$RUN_DIR/$previous_stage/final")
    fi
    previous=$(sbatch --parsable "${dependency[@]}" --job-name="longvl-$stage" \
        --output="$RUN_DIR/slurm-%x-%j.out" "${EXTRA[@]}" "$SBATCH_SCRIPT" \
        "${LONGVL_RUN_DIR_KEY:-run_dir}=$RUN_DIR" "$@" "${select[@]}")
    previous=${previous%%;*}  # --parsable prints "id" or "id;cluster"
    previous_stage=$stage
    echo "$stage $previous"
done
