#!/usr/bin/env bash
# Memory under large responses (kv list pages and bulk reads of 64 KB values), with glibc's
# default allocator settings and with MALLOC_ARENA_MAX=2, measured in the same run.
# Writes bench/memory-results.md (newest first).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p provider-host
bin=target/release/provider-host
work=$(mktemp -d "${TMPDIR:-/tmp}/provider-memory.XXXXXX")
trap 'pkill -f "$work/host.toml" 2>/dev/null || true; rm -rf "$work"' EXIT
export MEMORY_JWT_SECRET=memory-secret-memory-secret-memory-0123
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/host.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[storage]
url = "sqlite://$work/host.db"
[security]
issuer = "memory"
audience = "providers"
[[security.keys]]
algorithm = "HS256"
secret = "\${env:MEMORY_JWT_SECRET}"
[security.roles]
clerk = ["kv.*"]
[[providers]]
service = "kv"
config = { max_value_bytes = 70000 }
[tenants.acme]
services = ["kv"]
TOML
rows=""
for setting in "" "MALLOC_ARENA_MAX=2"; do
  rm -f "$work"/host.db*
  env $setting "$bin" serve --config "$work/host.toml" >/dev/null 2>"$work/host.log" &
  pid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  token=$("$bin" token --config "$work/host.toml" --tenant acme --roles clerk)
  read -r responses largest peak idle <<<"$(python3 bench/memory.py "$port" "$token" "$pid")"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rows+="| ${setting:-glibc defaults} | $responses | $largest | $peak | $idle |
"
done
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
entry="## $(date -u +%Y-%m-%dT%H:%M:%SZ)

Machine: $(nproc) cores, ${cpu:-unknown CPU}. 1,000 keys of 64 KB; 8 clients \`list\` (limit 1000, pages cut at max_page_bytes = 1 MiB) and 4 \`bulk_get\` 100 keys, for 10 s; then 30 s idle.

| allocator setting | responses in 10 s | largest response (bytes) | peak RSS (MB) | RSS after 30 s idle (MB) |
| --- | ---: | ---: | ---: | ---: |
$rows"
results=bench/memory-results.md
old=""
[[ -f $results ]] && old=$(sed '1,/^Written by/d' "$results" | sed '1{/^$/d}')
printf '# Memory results\n\nWritten by `bench/memory.sh`; newest first.\n\n%s\n%s\n' "$entry" "$old" > "$results"
echo "$entry"
