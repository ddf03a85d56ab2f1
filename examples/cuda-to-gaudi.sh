#!/usr/bin/env bash
# Prefill on NVIDIA (CUDA vLLM), decode on Intel Gaudi (vLLM + the vllm-gaudi plugin), router anywhere.
# Run on each host with its ROLE; `--dry-run` prints the exact commands (ROLE=all prints all three):
#   ROLE=prefill PREFILL_ADDRESS=10.0.0.1 examples/cuda-to-gaudi.sh      # on the NVIDIA host
#   ROLE=decode examples/cuda-to-gaudi.sh                                # on the Gaudi host
#   ROLE=router PREFILL_URL=http://10.0.0.1:8100 DECODE_URL=http://10.0.0.3:8200 examples/cuda-to-gaudi.sh
#
# Facts from vllm-gaudi (commit 091bbad, /work/shared/notes/kv-formats.md section 6): KV block size
# 128 (the only kernel block size), KV dtype bf16 (`auto`) or `fp8_inc` (float8_e4m3fn bytes; the
# CUDA prefill then runs --kv-cache-dtype fp8, also e4m3fn). Gaudi 2 treats fp8 range as +-240,
# Gaudi 3 as +-448. Dynamic KV scales (VLLM_DYNAMIC_KV_QUANT) are not registered by vllm-gaudi and
# so cannot be transferred: use static scales. vllm-gaudi pins its own upstream vLLM commit, so the
# CUDA prefill must run a vLLM our connector supports (see docs/formats.md for the versions).
#
# Transport: HeteroNixlConnector registers the KV cache where vLLM allocates it (HPU memory, as
# NIXL VRAM; connector/worker.py) and has no host-DRAM staging mode, so the decode needs the UCX
# that vllm-gaudi builds with --with-gaudi=yes (transport gaudi_gdr; UCX_TLS=ib,rc,gaudi_gdr and
# UCX_MEMTYPE_CACHE=0 as in vllm-gaudi's examples/nixl scripts); the PyPI nixl wheel has no Gaudi UCT.
set -euo pipefail
# shellcheck source=examples/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags --dry-run -- "$@"

ROLE=${ROLE:-all}                               # prefill | decode | router | all (all: --dry-run only)
VLLM=${VLLM:-vllm}
HETERO_PD=${HETERO_PD:-vllm-hetero-pd}
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
KV_DTYPE=${KV_DTYPE:-auto}                      # auto (bf16) | fp8_inc
MAX_NUM_SEQS=${MAX_NUM_SEQS:-128}               # decode batch size
DECODE_BLOCK_SIZE=${DECODE_BLOCK_SIZE:-128}
PREFILL_TP=${PREFILL_TP:-1}
DECODE_TP=${DECODE_TP:-1}
PREFILL_ADDRESS=${PREFILL_ADDRESS:-127.0.0.1}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
SIDE_CHANNEL_PORT=${SIDE_CHANNEL_PORT:-5600}
PREFILL_URL=${PREFILL_URL:-http://$PREFILL_ADDRESS:$PREFILL_PORT}
DECODE_URL=${DECODE_URL:-http://127.0.0.1:$DECODE_PORT}
ROUTER_PORT=${ROUTER_PORT:-8000}
PREFILL_UCX_TLS=${PREFILL_UCX_TLS:-}            # empty: UCX chooses
DECODE_UCX_TLS=${DECODE_UCX_TLS:-ib,rc,gaudi_gdr}
QUANT_CONFIG=${QUANT_CONFIG:-}                  # Intel Neural Compressor config for fp8_inc, if your model needs one
PROGRESS_DELAY_US=${PROGRESS_DELAY_US:-100}

check_role
case "$KV_DTYPE" in
    auto) prefill_kv_dtype=auto ;;
    fp8_inc) prefill_kv_dtype=fp8 ;;
    *) echo "KV_DTYPE='$KV_DTYPE' is not one vllm-gaudi supports; use auto (bf16) or fp8_inc" >&2; exit 2 ;;
esac

prefill_extra=$(printf '{"side_channel_host":"%s","side_channel_port":%d,"progress_delay_us":%d}' \
    "$PREFILL_ADDRESS" "$SIDE_CHANNEL_PORT" "$PROGRESS_DELAY_US")
decode_extra=$(printf '{"progress_delay_us":%d}' "$PROGRESS_DELAY_US")
mapfile -t prefill_env < <(optional_env UCX_TLS "$PREFILL_UCX_TLS")
mapfile -t decode_env < <(optional_env UCX_TLS "$DECODE_UCX_TLS"; optional_env QUANT_CONFIG "$QUANT_CONFIG")

run_role prefill "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" "${prefill_env[@]}" -- \
    "$VLLM" serve "$MODEL" --host 0.0.0.0 --port "$PREFILL_PORT" --tensor-parallel-size "$PREFILL_TP" \
    --kv-cache-dtype "$prefill_kv_dtype" --kv-transfer-config "$(kv_config kv_producer "$prefill_extra")"
run_role decode "HETERO_PD_NIXL_PROGRESS_DELAY_US=$PROGRESS_DELAY_US" UCX_MEMTYPE_CACHE=0 "${decode_env[@]}" -- \
    "$VLLM" serve "$MODEL" --host 0.0.0.0 --port "$DECODE_PORT" --tensor-parallel-size "$DECODE_TP" \
    --block-size "$DECODE_BLOCK_SIZE" --max-num-seqs "$MAX_NUM_SEQS" --kv-cache-dtype "$KV_DTYPE" \
    --kv-transfer-config "$(kv_config kv_consumer "$decode_extra")"
run_role router -- "$HETERO_PD" proxy --host 0.0.0.0 --port "$ROUTER_PORT" \
    --prefill "$PREFILL_URL" --decode "$DECODE_URL"
