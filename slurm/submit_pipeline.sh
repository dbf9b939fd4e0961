#!/usr/bin/env bash
# Submit the stages of a pipeline as a chain of pretrain.sbatch jobs: stage k+1 starts only after stage k
# finished successfully (afterok), and every stage shares one run dir; stage k+1 initialises from stage k's
# final weights there (`stage.init_from=RUN_DIR/<stage k>/final`, the trainer's handoff dir). A requeued
# stage keeps its job id, so the chain survives preemption; a failed stage cancels the rest.
#
#   slurm/submit_pipeline.sh RUN_DIR [Hydra overrides for every stage...]
#
# Prints one line per stage: "<stage> <job id>".
# Environment knobs:
#   LONGVL_STAGES       stages in order (default: "s0 s1 s2 s3")
#   LONGVL_STAGE_KEY    override key that selects a stage (default: stage)   -> stage=s1
#   LONGVL_RUN_DIR_KEY  override key of the run dir (default: run_dir)       -> run_dir=RUN_DIR
#   LONGVL_INIT_FROM_KEY override key of the handoff (default: stage.init_from; empty: no handoff override)
#   LONGVL_SBATCH_ARGS  extra sbatch options for every stage, e.g. "--nodes=4 --ntasks-per-node=8 --time=4:00:00"
#   LONGVL_AFTER        job id the first stage waits for (default: none)
# Everything pretrain.sbatch reads (LONGVL_CMD, LONGVL_LAUNCH_MODE, ...) is passed on through the environment.
set -euo pipefail

RUN_DIR=${1:?usage: submit_pipeline.sh RUN_DIR [overrides...]}
shift
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
SBATCH_SCRIPT="$(cd "$(dirname "$0")" && pwd)/pretrain.sbatch"
read -r -a STAGES <<< "${LONGVL_STAGES:-s0 s1 s2 s3}"
read -r -a EXTRA <<< "${LONGVL_SBATCH_ARGS:-}"
[ "${#STAGES[@]}" -gt 0 ] || { echo "submit_pipeline.sh: LONGVL_STAGES is empty" >&2; exit 2; }

INIT_FROM_KEY=${LONGVL_INIT_FROM_KEY-stage.init_from}
previous=${LONGVL_AFTER:-}
previous_stage=""
for stage in "${STAGES[@]}"; do
    dependency=()
    [ -n "$previous" ] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    handoff=()
    [ -n "$previous_stage" ] && [ -n "$INIT_FROM_KEY" ] && handoff=("$INIT_FROM_KEY=$RUN_DIR/$previous_stage/final")
    previous=$(sbatch --parsable "${dependency[@]}" --job-name="longvl-$stage" \
        --output="$RUN_DIR/slurm-%x-%j.out" "${EXTRA[@]}" "$SBATCH_SCRIPT" \
        "${LONGVL_STAGE_KEY:-stage}=$stage" "${LONGVL_RUN_DIR_KEY:-run_dir}=$RUN_DIR" "${handoff[@]}" "$@")
    previous=${previous%%;*}  # --parsable prints "id" or "id;cluster"
    previous_stage=$stage
    echo "$stage $previous"
done
