# shellcheck shell=bash
# Throwaway PostgreSQL server for tests. Source this file, then:
#   pg_install; pg_start <dir>; trap pg_stop EXIT
# pg_start exports TEST_POSTGRES_URL and PG_TEST_DIR.
# Written to be safe under `set -euo pipefail` in the sourcing script.

_pg_log() { echo "[postgres] $*" >&2; }

# Newest installed server binaries; Debian keeps them off PATH, per major version.
_pg_bindir() {
  local initdb
  initdb=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)
  [[ -x $initdb ]] || return 1
  dirname "$initdb"
}

# initdb and postgres refuse to run as root, so root delegates to the
# `postgres` system user created by the Debian package. cd / avoids
# "could not change directory" noise when the caller's cwd is private.
_pg_as_owner() {
  if [[ $EUID -eq 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_install() {
  if _pg_bindir >/dev/null; then
    return 0
  fi
  _pg_log "installing postgresql from Debian packages"
  local sudo=()
  if [[ $EUID -ne 0 ]]; then
    if ! command -v sudo >/dev/null; then
      _pg_log "error: postgresql is not installed and we are neither root nor have sudo"
      return 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -q >&2 || return 1
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || return 1
  _pg_bindir >/dev/null || { _pg_log "error: initdb still missing after install"; return 1; }
}

# Connecting succeeds only if something listens; bash's /dev/tcp avoids
# depending on python3 or ss being present.
_pg_free_port() {
  local port
  for ((port = 55432; port < 55632; port++)); do
    if ! (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  _pg_log "error: no free port in 55432-55631"
  return 1
}

pg_start() {
  local dir=${1:?usage: pg_start <dir>}
  local bin port attempt
  bin=$(_pg_bindir) || { _pg_log "error: no PostgreSQL server found, run pg_install"; return 1; }
  mkdir -p "$dir" || return 1
  dir=$(cd "$dir" && pwd) # pg_ctl and the socket path need it absolute
  local data=$dir/data

  if [[ $EUID -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || { _pg_log "error: system user 'postgres' missing"; return 1; }
    chown postgres: "$dir" || return 1
  fi
  if ! _pg_as_owner test -w "$dir"; then
    _pg_log "error: $dir not writable by the server user (check parent directory permissions)"
    return 1
  fi

  if [[ ! -f $data/PG_VERSION ]]; then
    _pg_log "initdb in $data"
    # C locale: initdb fails if the caller's LANG names a locale that isn't generated.
    _pg_as_owner "$bin/initdb" -D "$data" -U postgres -A trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; return 1; }
    # TCP on loopback only; the socket lives in $dir so clusters never collide
    # with each other or with the system one in /var/run/postgresql.
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
EOF
  fi

  # Second pg_start on the same dir: reuse the running server.
  if _pg_as_owner "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then
    port=$(sed -n 4p "$data/postmaster.pid") # line 4 of postmaster.pid is the port
    _pg_log "already running on port $port"
  else
    # Another process may grab the chosen port before the server binds it;
    # the server then exits and pg_ctl -w fails, so move on to the next port.
    for attempt in 1 2 3 4 5; do
      port=$(_pg_free_port) || return 1
      _pg_log "starting on 127.0.0.1:$port"
      if _pg_as_owner "$bin/pg_ctl" start -w -t 30 -D "$data" -l "$dir/server.log" -o "-p $port" >/dev/null; then
        break
      fi
      port=
    done
    if [[ -z $port ]]; then
      _pg_log "error: server failed to start; tail of $dir/server.log:"
      tail -n 20 "$dir/server.log" >&2 || true
      return 1
    fi
  fi

  # pg_ctl -w watches postmaster.pid; also confirm the TCP listener clients will use.
  local i
  for ((i = 0; i < 30; i++)); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break
    sleep 1
  done
  if ((i == 30)); then
    _pg_log "error: pg_isready never succeeded on port $port"
    return 1
  fi

  export PG_TEST_DIR=$dir
  export TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres
  _pg_log "ready: $TEST_POSTGRES_URL"
}

# Always returns 0 so it can be used as an EXIT trap without masking the
# script's real exit status or failing twice.
pg_stop() {
  local bin data=${PG_TEST_DIR:-}/data
  [[ -n ${PG_TEST_DIR:-} && -f $data/PG_VERSION ]] || return 0
  bin=$(_pg_bindir) || return 0
  if _pg_as_owner "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then
    _pg_log "stopping server in $data"
    # immediate: the cluster is disposable, no need to wait for a checkpoint.
    _pg_as_owner "$bin/pg_ctl" stop -m immediate -D "$data" >/dev/null 2>&1 || true
  fi
  return 0
}
