#!/usr/bin/env bash
# Prefill on NVIDIA (CUDA vLLM), decode on AMD Instinct (ROCm vLLM), router anywhere.
# Run on each host with its ROLE; `--dry-run` prints the exact commands (ROLE=all prints all three):
#   ROLE=prefill PREFILL_ADDRESS=10.0.0.1 examples/cuda-to-rocm.sh       # on the NVIDIA host
#   ROLE=decode DECODE_GPU=mi300x examples/cuda-to-rocm.sh               # on the AMD host
#   ROLE=router PREFILL_URL=http://10.0.0.1:8100 DECODE_URL=http://10.0.0.2:8200 examples/cuda-to-rocm.sh
#
# KV dtype: with KV_DTYPE=fp8 vLLM itself picks the byte encoding per GPU (vllm/platforms/rocm.py
# fp8_dtype): MI300X/MI325X (gfx942) store float8_e4m3fnuz, MI350X/MI355X (gfx950) float8_e4m3fn,
# the NVIDIA encoding. The decode detects both sides' formats and the shim remaps fn -> fnuz bytes
# on MI300-class decodes (docs/formats.md); KV_DTYPE=auto moves the model dtype (bf16) unchanged.
#
# Transport: HeteroNixlConnector registers the KV cache where vLLM allocates it, so on GPUs NIXL
# reads device memory (VRAM) directly (connector/worker.py); it has no host-DRAM staging mode. Both
# UCX builds therefore need device-memory support: the CUDA NIXL wheel (nixl-cu12/cu13) on the
# prefill and a ROCm-enabled UCX (--with-rocm: RIXL or a nixl_rocm build, as in vLLM's ROCm images)
# on the decode; the PyPI nixl wheel cannot register ROCm memory. The two sides need a common UCX
# transport (rc over InfiniBand/RoCE, or tcp) and the same NIXL release line
# (/work/shared/notes/nixl.md section 6). Set PREFILL_UCX_TLS / DECODE_UCX_TLS to pin transports.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags --dry-run -- "$@"

ROLE=${ROLE:-all}                               # prefill | decode | router | all (all: --dry-run only)
VLLM=${VLLM:-vllm}                              # vLLM's CLI on the GPU hosts
HETERO_PD=${HETERO_PD:-vllm-hetero-pd}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
DECODE_GPU=${DECODE_GPU:-mi300x}                # mi300x | mi325x (fnuz fp8) | mi350x | mi355x (fn fp8)
KV_DTYPE=${KV_DTYPE:-fp8}                       # fp8 | auto (model dtype)
PREFILL_TP=${PREFILL_TP:-1}
DECODE_TP=${DECODE_TP:-1}
PREFILL_ADDRESS=${PREFILL_ADDRESS:-127.0.0.1}   # the prefill host's address as the decode reaches it
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
SIDE_CHANNEL_PORT=${SIDE_CHANNEL_PORT:-5600}
PREFILL_URL=${PREFILL_URL:-http://$PREFILL_ADDRESS:$PREFILL_PORT}
DECODE_URL=${DECODE_URL:-http://127.0.0.1:$DECODE_PORT}
ROUTER_PORT=${ROUTER_PORT:-8000}
PREFILL_UCX_TLS=${PREFILL_UCX_TLS:-}            # empty: UCX chooses
DECODE_UCX_TLS=${DECODE_UCX_TLS:-}
PROGRESS_DELAY_US=${PROGRESS_DELAY_US:-100}

check_role
case "$DECODE_GPU" in
    mi300x | mi325x) decode_fp8="float8_e4m3fnuz (gfx942)" ;;
    mi350x | mi355x) decode_fp8="float8_e4m3fn (gfx950)" ;;
    *) echo "DECODE_GPU='$DECODE_GPU' is not one of mi300x, mi325x, mi350x, mi355x" >&2; exit 2 ;;
esac
[[ $KV_DTYPE == fp8 ]] && echo "# decode KV bytes on $DECODE_GPU: $decode_fp8; prefill: float8_e4m3fn"

prefill_extra=$(printf '{"side_channel_host":"%s","side_channel_port":%d,"progress_delay_us":%d}' \
    "$PREFILL_ADDRESS" "$SIDE_CHANNEL_PORT" "$PROGRESS_DELAY_US")
decode_extra=$(printf '{"progress_delay_us":%d}' "$PROGRESS_DELAY_US")
mapfile -t prefill_env < <(optional_env UCX_TLS "$PREFILL_UCX_TLS")
mapfile -t decode_env < <(optional_env UCX_TLS "$DECODE_UCX_TLS")

run_role prefill "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" "${prefill_env[@]}" -- \
    "$VLLM" serve "$MODEL" --host 0.0.0.0 --port "$PREFILL_PORT" --tensor-parallel-size "$PREFILL_TP" \
    --kv-cache-dtype "$KV_DTYPE" --kv-transfer-config "$(kv_config kv_producer "$prefill_extra")"
run_role decode "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" "${decode_env[@]}" -- \
    "$VLLM" serve "$MODEL" --host 0.0.0.0 --port "$DECODE_PORT" --tensor-parallel-size "$DECODE_TP" \
    --kv-cache-dtype "$KV_DTYPE" --kv-transfer-config "$(kv_config kv_consumer "$decode_extra")"
run_role router -- "$HETERO_PD" proxy --host 0.0.0.0 --port "$ROUTER_PORT" \
    --prefill "$PREFILL_URL" --decode "$DECODE_URL"
