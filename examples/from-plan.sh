#!/usr/bin/env bash
# N prefill + M decode instances behind the router, as the planner sized them. Step 1 asks
# `vllm-hetero-pd plan ... --emit-launch PLAN_DIR` for the cheapest disaggregated deployment; it
# writes one script per instance (prefill_0.sh, ..., decode_0.sh, ...), router.sh and
# instances.json. Step 2 runs one of them per host: ROLE=prefill_0, ROLE=decode_1, ROLE=router.
#   examples/from-plan.sh --dry-run                       plan, then print every instance's command
#   ROLE=prefill_0 PREFILL_0_ADDRESS=10.0.0.1 examples/from-plan.sh   on the first prefill host
#   ROLE=router PREFILL_0_URL=http://10.0.0.1:8100 DECODE_0_URL=http://10.0.0.2:8101 examples/from-plan.sh
# The planner only computes and writes files (no engines), so --dry-run runs it too. The generated
# scripts take their hosts and ports from <NAME>_ADDRESS / _HOST / _PORT / _URL (see their text);
# on a CPU host run the printed `vllm serve ...` through `vllm-hetero-pd vllm serve ...` instead.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags --dry-run -- "$@"

ROLE=${ROLE:-all}                          # an instance name from the plan, router, or all (--dry-run only)
HETERO_PD=${HETERO_PD:-vllm-hetero-pd}
PLAN_MODEL=${PLAN_MODEL:-llama-3.1-8b}     # planner preset, config.json or model directory
PLAN_DTYPE=${PLAN_DTYPE:-bf16}
ISL=${ISL:-2048}                           # prompt tokens per request
OSL=${OSL:-256}                            # output tokens per request
RATE=${RATE:-5}                            # requests/s
TTFT_P90_MS=${TTFT_P90_MS:-2000}
TPOT_P90_MS=${TPOT_P90_MS:-50}
PREFILL_DEVICES=${PREFILL_DEVICES:-}       # e.g. H100 (empty: every device in the catalog)
DECODE_DEVICES=${DECODE_DEVICES:-}         # e.g. MI300X,Gaudi3
INVENTORY=${INVENTORY:-}                   # e.g. H100=16,MI300X=8
PLAN_DIR=${PLAN_DIR:-plan-launch}

plan=("$HETERO_PD" plan --model "$PLAN_MODEL" --dtype "$PLAN_DTYPE" --isl "$ISL" --osl "$OSL" --rate "$RATE"
      --ttft-p90 "$TTFT_P90_MS" --tpot-p90 "$TPOT_P90_MS" --mode disaggregated)
[[ -z $PREFILL_DEVICES ]] || plan+=(--prefill-devices "$PREFILL_DEVICES")
[[ -z $DECODE_DEVICES ]] || plan+=(--decode-devices "$DECODE_DEVICES")
if [[ -n $INVENTORY ]]; then
    IFS=, read -ra items <<<"$INVENTORY"
    for item in "${items[@]}"; do plan+=(--inventory "$item"); done
fi
plan+=(--emit-launch "$PLAN_DIR")
echo "[plan] $(show -- "${plan[@]}")"
"${plan[@]}"

if [[ $ROLE == all ]]; then
    if [[ $DRY_RUN == 0 ]]; then
        names=("$PLAN_DIR"/*.sh)
        names=("${names[@]##*/}")
        echo "$(basename "$0"): the instances run on different hosts; set ROLE to one of:" \
            "${names[*]%.sh} (or --dry-run to print them all)" >&2
        exit 2
    fi
    for script in "$PLAN_DIR"/*.sh; do
        echo "[$(basename "$script" .sh)] bash $script:"
        sed -n '/^set -euo pipefail$/,$p' "$script" | tail -n +2 | sed 's/^/    /'
    done
    exit 0
fi
script="$PLAN_DIR/$ROLE.sh"
if [[ ! -f $script ]]; then
    echo "$(basename "$0"): the plan has no instance '$ROLE' ($script); see $PLAN_DIR/instances.json" >&2
    exit 2
fi
echo "[$ROLE] bash $script"
[[ $DRY_RUN == 1 ]] || exec bash "$script"
