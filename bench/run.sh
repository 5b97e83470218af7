#!/usr/bin/env bash
# End-to-end benchmark: the host's POST /providers/kv/get (JWT auth, schema validation,
# tenant instance, SQLite read) against two references measured in the same run:
#   bare - a bare axum handler returning the same JSON from memory;
#   sql  - a bare axum handler doing the same SELECT on the same database;
# the native inventory plugin's `level` (one read of its store, the same SELECT) on the
# same host, against the builtin kv/get; and the same host with its audit trail off and no
# rate limits, against the measured host (audit on, limits set high enough never to refuse).
# Then the hot path without storage: kv/get on kv's memory backend (audit off, no rate limits)
# with observability on (JSON logs at INFO to a file: an access line per request and the
# request and call spans; metrics recorded) and off (log filter `warn`: no per-request line,
# spans disabled; the metrics recorder still counts), against a bare axum handler reading the
# same value from a HashMap; and both at a fixed 1,000 rps (loadtest's open-loop client), p99.
# Writes bench/results.md (the newest run first) with rps, p50, p99 and the ratios.
#
# Usage: bench/run.sh [duration-seconds] [connections] [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10}
connections=${2:-32}
rounds=${3:-3}

if ! command -v wrk >/dev/null; then
  echo "[bench] installing wrk from Debian's packages" >&2
  sudo_cmd=""; [[ $EUID -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq wrk
fi

cargo build --release --locked -p provider-host -p loadtest
bin=target/release

work=$(mktemp -d "${TMPDIR:-/tmp}/provider-bench.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "[bench] nothing listens on port $1" >&2; return 1
}

cargo xtask plugins --out "$work/plugins" >/dev/null

export BENCH_JWT_SECRET=bench-secret-bench-secret-bench-secret-0123
cat > "$work/host.toml" <<TOML
[server]
listen = "127.0.0.1:0"
[storage]
url = "sqlite://$work/host.db"
[security]
issuer = "bench"
audience = "providers"
rate_limits = { tenant = { per_second = 10000000 }, client = { per_second = 10000000 } }
[[security.keys]]
algorithm = "HS256"
secret = "\${env:BENCH_JWT_SECRET}"
[plugins]
dirs = ["$work/plugins"]
[security.roles]
clerk = ["kv.*", "inventory.*"]
[[providers]]
service = "kv"
[[providers]]
service = "inventory"
[tenants.bench]
services = ["kv", "inventory"]
TOML

host_port=$(free_port)
RUST_LOG=warn "$bin/provider-host" serve --config "$work/host.toml" --listen "127.0.0.1:$host_port" >/dev/null 2>"$work/host.log" &
pids+=($!)
wait_port "$host_port"
# The same host on the same database with the audit trail off and no rate limits.
grep -v '^rate_limits' "$work/host.toml" > "$work/open.toml"
printf '[audit]\nenabled = false\n' >> "$work/open.toml"
open_port=$(free_port)
RUST_LOG=warn "$bin/provider-host" serve --config "$work/open.toml" --listen "127.0.0.1:$open_port" >/dev/null 2>"$work/open.log" &
pids+=($!)
wait_port "$open_port"
# kv on its memory backend: the host's own work with no storage read.
memory_toml() { # log filter
  cat <<TOML
[server]
listen = "127.0.0.1:0"
[storage]
url = "sqlite://$work/memory-$1.db"
[security]
issuer = "bench"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "\${env:BENCH_JWT_SECRET}"
[security.roles]
clerk = ["kv.*"]
[[providers]]
service = "kv"
config = { backend = "memory" }
[tenants.bench]
services = ["kv"]
[audit]
enabled = false
[observability]
log_format = "json"
log_filter = "$1"
metrics = "open"
TOML
}
memory_toml info > "$work/obs-on.toml"
memory_toml warn > "$work/obs-off.toml"
on_port=$(free_port)
"$bin/provider-host" serve --config "$work/obs-on.toml" --listen "127.0.0.1:$on_port" >/dev/null 2>"$work/obs-on.log" &
pids+=($!)
off_port=$(free_port)
"$bin/provider-host" serve --config "$work/obs-off.toml" --listen "127.0.0.1:$off_port" >/dev/null 2>"$work/obs-off.log" &
pids+=($!)
wait_port "$on_port"; wait_port "$off_port"
token=$("$bin/provider-host" token --config "$work/host.toml" --tenant bench --roles clerk --ttl 2h)
# More distinct tokens than the verified-token cache holds (4096), so each request verifies one.
"$bin/provider-host" token --config "$work/host.toml" --tenant bench --roles clerk --ttl 2h --count 20000 >"$work/tokens"
curl -sf -X POST "http://127.0.0.1:$host_port/providers/kv/set" -H "Authorization: Bearer $token" \
  -d '{"key":"bench","value":{"sku":"A-100","qty":42,"warehouse":"north"}}' >/dev/null
curl -sf -X POST "http://127.0.0.1:$host_port/providers/inventory/receive" -H "Authorization: Bearer $token" \
  -d '{"item":"bench","warehouse":"main","quantity":42}' >/dev/null
level_body='{"item":"bench","warehouse":"main"}'
for port in "$on_port" "$off_port"; do
  curl -sf -X POST "http://127.0.0.1:$port/providers/kv/set" -H "Authorization: Bearer $token" \
    -d '{"key":"bench","value":{"sku":"A-100","qty":42,"warehouse":"north"}}' >/dev/null
done

bare_port=$(free_port)
"$bin/loadtest" bare "127.0.0.1:$bare_port" & pids+=($!)
map_port=$(free_port)
"$bin/loadtest" map "127.0.0.1:$map_port" & pids+=($!)
sql_port=$(free_port)
"$bin/loadtest" sql "127.0.0.1:$sql_port" "sqlite://$work/host.db" & pids+=($!)
wait_port "$bare_port"; wait_port "$sql_port"; wait_port "$map_port"

# The responses must match in shape before their speed is compared.
curl -sf -X POST "http://127.0.0.1:$host_port/providers/kv/get" -H "Authorization: Bearer $token" -d '{"key":"bench"}' | grep -q '"qty":42'
curl -sf -X POST "http://127.0.0.1:$sql_port/providers/kv/get" -d '{"key":"bench"}' | grep -q '"qty":42'
curl -sf -X POST "http://127.0.0.1:$map_port/providers/kv/get" -d '{"key":"bench"}' | grep -q '"qty":42'
curl -sf -X POST "http://127.0.0.1:$on_port/providers/kv/get" -H "Authorization: Bearer $token" -d '{"key":"bench"}' | grep -q '"qty":42'
curl -sf -X POST "http://127.0.0.1:$host_port/providers/inventory/level" -H "Authorization: Bearer $token" -d "$level_body" | grep -q '"on_hand":42'

# One wrk thread: the servers need the other core. Each target runs `rounds` times,
# interleaved with the others so that drifts of a shared machine hit all alike; the
# round with the median throughput is reported.
run() { # name port token round [tokens-file] -> appends "rps p50 p99" (latencies in microseconds)
  # PATH_ and BODY pick the route (default: kv/get of the seeded key).
  local path=${PATH_:-/providers/kv/get}
  TOKEN=$3 TOKENS_FILE=${5:-} wrk -t1 -c"$connections" -d2s -s bench/post.lua "http://127.0.0.1:$2$path" >/dev/null
  TOKEN=$3 TOKENS_FILE=${5:-} wrk -t1 -c"$connections" -d"${duration}s" --latency -s bench/post.lua "http://127.0.0.1:$2$path" >"$work/$1.$4.txt"
  python3 - "$work/$1.$4.txt" >>"$work/$1.rounds" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
if re.search(r"Non-2xx", text):
    sys.exit("non-2xx responses:\n" + text)
def us(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        sys.exit(f"unreadable latency {v!r} in:\n" + text)
    n, unit = m.groups()
    return float(n) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
# Anchored: a "+/- Stdev" column such as "62.50%" must not pass for the 50th percentile.
p50 = us(re.search(r"^\s*50%\s+(\S+)", text, re.M).group(1))
p99 = us(re.search(r"^\s*99%\s+(\S+)", text, re.M).group(1))
print(f"{rps:.0f} {p50:.0f} {p99:.0f}")
PY
}
# Fixed rate: `rps` for `duration` seconds, open loop -> appends "sent p50 p99 p999".
fixed() { # name port token round
  "$bin/loadtest" rate "http://127.0.0.1:$2/providers/kv/get" 1000 "$duration" "$3" '{"key":"bench"}' >>"$work/$1.rounds"
}
median() { sort -n "$work/$1.rounds" | sed -n "$(( (rounds + 1) / 2 ))p"; }

for round in $(seq 1 "$rounds"); do
  run bare "$bare_port" "" "$round"
  run sql "$sql_port" "" "$round"
  run host "$host_port" "$token" "$round"
  run verify "$host_port" "" "$round" "$work/tokens"
  PATH_=/providers/inventory/level BODY=$level_body run native "$host_port" "$token" "$round"
  run open "$open_port" "$token" "$round"
  run map "$map_port" "" "$round"
  run obs_on "$on_port" "$token" "$round"
  run obs_off "$off_port" "$token" "$round"
  fixed rate_map "$map_port" "" "$round"
  fixed rate_on "$on_port" "$token" "$round"
done
# The log is real: the host with observability on wrote an access line per request, in JSON.
grep -c '"provider_host::access"' "$work/obs-on.log" | awk '$1 < 1000 { print "[bench] too few access lines: " $1; exit 1 }'
python3 -c "import json,sys; [json.loads(l) for l in open(sys.argv[1]) if l.strip()]" "$work/obs-on.log"
read -r bare_rps bare_p50 bare_p99 <<<"$(median bare)"
read -r sql_rps sql_p50 sql_p99 <<<"$(median sql)"
read -r host_rps host_p50 host_p99 <<<"$(median host)"
read -r verify_rps verify_p50 verify_p99 <<<"$(median verify)"
read -r native_rps native_p50 native_p99 <<<"$(median native)"
read -r open_rps open_p50 open_p99 <<<"$(median open)"
read -r map_rps map_p50 map_p99 <<<"$(median map)"
read -r on_rps on_p50 on_p99 <<<"$(median obs_on)"
read -r off_rps off_p50 off_p99 <<<"$(median obs_off)"
# The fixed-rate rounds: the round with the median p99.
median_p99() { sort -n -k3 "$work/$1.rounds" | sed -n "$(( (rounds + 1) / 2 ))p"; }
read -r _ rate_map_p50 rate_map_p99 rate_map_p999 <<<"$(median_p99 rate_map)"
read -r _ rate_on_p50 rate_on_p99 rate_on_p999 <<<"$(median_p99 rate_on)"
spread() { echo "$(cut -d' ' -f1 "$work/$1.rounds" | sort -n | tr '\n' ' ' | sed 's/ $//')"; }

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
entry=$(cat <<MD
## $(date -u +%Y-%m-%dT%H:%M:%SZ)

Machine: $(nproc) cores, ${cpu:-unknown CPU}; $(rustc --version). wrk: 1 thread, $connections connections, ${duration}s after a 2s warm-up, on loopback; median of $rounds interleaved rounds.

| target | rps (median) | p50 (µs) | p99 (µs) | host ÷ target (rps) | rps of every round |
| --- | ---: | ---: | ---: | ---: | --- |
| bare axum handler, JSON from memory | $bare_rps | $bare_p50 | $bare_p99 | $(ratio "$host_rps" "$bare_rps") | $(spread bare) |
| bare axum handler + the same SQLite SELECT | $sql_rps | $sql_p50 | $sql_p99 | $(ratio "$host_rps" "$sql_rps") | $(spread sql) |
| **provider-host** \`POST /providers/kv/get\` (JWT, schema, tenant instance, SQLite, audit trail, rate limits), one token (verified-token cache hits) | $host_rps | $host_p50 | $host_p99 | 1.00 | $(spread host) |
| provider-host, the same call with a different token each request (HS256 verified every time) | $verify_rps | $verify_p50 | $verify_p99 | $(ratio "$host_rps" "$verify_rps") | $(spread verify) |
| provider-host \`POST /providers/inventory/level\`: the **native** plugin, one read of its store (same token) | $native_rps | $native_p50 | $native_p99 | $(ratio "$host_rps" "$native_rps") | $(spread native) |
| provider-host, the same kv/get with the audit trail off and no rate limits | $open_rps | $open_p50 | $open_p99 | $(ratio "$host_rps" "$open_rps") | $(spread open) |

Native route ÷ builtin route (rps): $(ratio "$native_rps" "$host_rps"). Audit trail and rate limits on ÷ off (rps): $(ratio "$host_rps" "$open_rps").

The hot path without storage: \`kv/get\` on kv's memory backend, audit trail off, no rate limits.

| target | rps (median) | p50 (µs) | p99 (µs) | ÷ bare HashMap handler (rps) | rps of every round |
| --- | ---: | ---: | ---: | ---: | --- |
| bare axum handler: parse the body, read the value from a \`HashMap\`, answer the same envelope | $map_rps | $map_p50 | $map_p99 | 1.00 | $(spread map) |
| **provider-host** \`kv/get\` (memory), JWT (cache hits), observability **on**: JSON logs at INFO to a file, metrics | $on_rps | $on_p50 | $on_p99 | $(ratio "$on_rps" "$map_rps") | $(spread obs_on) |
| provider-host, the same with observability **off** (log filter \`warn\`; the metrics recorder still counts) | $off_rps | $off_p50 | $off_p99 | $(ratio "$off_rps" "$map_rps") | $(spread obs_off) |

Host (observability on) ÷ bare HashMap handler (rps): **$(ratio "$on_rps" "$map_rps")** (goal ≥ 0.75). Observability on ÷ off (rps): **$(ratio "$on_rps" "$off_rps")** (goal ≥ 0.95).

At a fixed 1,000 rps for ${duration}s (loadtest's open-loop client: each request sent on its tick, answered or not, timed from its sending; the round with the median p99): bare HashMap handler p50 ${rate_map_p50} µs, p99 ${rate_map_p99} µs, p99.9 ${rate_map_p999} µs; provider-host (observability on) p50 ${rate_on_p50} µs, p99 ${rate_on_p99} µs, p99.9 ${rate_on_p999} µs. Added p99: **$(python3 -c "print(f'{($rate_on_p99-$rate_map_p99)/1000:.3f}')") ms** (goal ≤ 0.1 ms).

MD
)
results=bench/results.md
header="# Benchmark results

Written by \`bench/run.sh\`; newest first. Ratios compare runs made in the same invocation.
"
old=""
[[ -f $results ]] && old=$(sed '1,/^Written by/d' "$results" | sed '1{/^$/d}')
printf '%s\n%s\n\n%s\n' "$header" "$entry" "$old" > "$results"
echo "$entry"
