# shellcheck shell=bash disable=SC2034  # SMOKE is read by the scripts that take --smoke
# Sourced by the example scripts. One way to parse flags and to print-or-start a command, so that
# `--dry-run` prints exactly what a real run would execute (tests/unit/test_examples.py parses it).

DRY_RUN=0
SMOKE=0
PIDS=()

parse_flags() {  # parse_flags ALLOWED_FLAGS... -- "$@"
    local allowed=()
    while [[ $# -gt 0 && $1 != "--" ]]; do allowed+=("$1"); shift; done
    shift
    local arg
    for arg in "$@"; do
        if [[ " ${allowed[*]} " != *" $arg "* ]]; then
            echo "$(basename "$0"): unknown argument '$arg'; accepted: ${allowed[*]}" >&2
            exit 2
        fi
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            --smoke) SMOKE=1 ;;
        esac
    done
}

quote() {  # one word as the shell would need it: bare when safe, else in single quotes
    if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

show() {  # show VAR=VALUE... -- CMD ARGS...: the command line, environment first, shell-quoted
    local line="" word
    [[ $1 == "--" ]] || line="env"
    while [[ $1 != "--" ]]; do line+=" $(quote "$1")"; shift; done
    shift
    for word in "$@"; do line+="${line:+ }$(quote "$word")"; done
    echo "$line"
}

start() {  # start NAME VAR=VALUE... -- CMD ARGS...: print it; unless --dry-run, run it in the background
    local name=$1; shift
    echo "[$name] $(show "$@")"
    [[ $DRY_RUN == 1 ]] && return 0
    local vars=()
    while [[ $1 != "--" ]]; do vars+=("$1"); shift; done
    shift
    mkdir -p "$LOG_DIR"
    env "${vars[@]}" "$@" >"$LOG_DIR/$name.log" 2>&1 &
    PIDS+=("$!")
}

stop_all() {  # stop every process this script started (each engine's children go with it on SIGTERM)
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}

wait_healthy() {  # wait_healthy URL TIMEOUT_S: poll URL/health until 200
    local url=$1 deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "$url/health"; do
        if ((SECONDS > deadline)); then
            echo "$url/health not ready after $2 s; see the logs in $LOG_DIR" >&2
            return 1
        fi
        sleep 2
    done
}

kv_config() {  # kv_config ROLE EXTRA_JSON: the --kv-transfer-config naming our connector
    printf '{"kv_connector":"HeteroNixlConnector","kv_role":"%s","kv_connector_extra_config":%s}' "$1" "$2"
}

check_role() {  # ROLE picks the one process this host runs; `all` only prints (hosts differ)
    case "$ROLE" in
        prefill | decode | router) ;;
        all)
            if [[ $DRY_RUN == 0 ]]; then
                echo "$(basename "$0"): prefill and decode run on different machines; run ROLE=prefill on the" \
                    "prefill host, ROLE=decode on the decode host and ROLE=router anywhere (or --dry-run to" \
                    "print all three)" >&2
                exit 2
            fi
            ;;
        *)
            echo "$(basename "$0"): ROLE='$ROLE' is not one of prefill, decode, router, all" >&2
            exit 2
            ;;
    esac
}

run_role() {  # run_role NAME VAR=VALUE... -- CMD ARGS...: print it when ROLE selects it; unless --dry-run, exec it
    local name=$1; shift
    [[ $ROLE == all || $ROLE == "$name" ]] || return 0
    echo "[$name] $(show "$@")"
    [[ $DRY_RUN == 1 ]] && return 0
    local vars=()
    while [[ $1 != "--" ]]; do vars+=("$1"); shift; done
    shift
    exec env "${vars[@]}" "$@"
}

optional_env() {  # optional_env NAME VALUE: "NAME=VALUE" when VALUE is set, nothing otherwise
    [[ -z $2 ]] || echo "$1=$2"
}
