#!/bin/bash
# The proxy container: write nginx's upstream and limits from the environment, run nginx,
# and follow the replica set.
#
#   proxy-entrypoint            # run (the image's default)
#   proxy-entrypoint health     # the health check: does nginx answer on 127.0.0.1:8000?
#
# Debian's nginx (1.22) resolves an upstream's name once, when it loads its configuration.
# A replica added by scaling, or restarted on another address, would never get traffic, and
# a stopped one would be tried on every fail_timeout. So the replica set is looked up in
# Docker's DNS every PROXY_RESOLVE_EVERY_S seconds, and nginx reloads (gracefully: requests
# in flight finish on the old workers) when it changes.
set -euo pipefail

UPSTREAM="${PROXY_UPSTREAM:-api}"
UPSTREAM_PORT="${PROXY_UPSTREAM_PORT:-8000}"
MAX_BODY_BYTES="${PROXY_MAX_BODY_BYTES:-52428800}"
HEADER_TIMEOUT_S="${PROXY_HEADER_TIMEOUT_S:-10}"
BODY_TIMEOUT_S="${PROXY_BODY_TIMEOUT_S:-60}"
READ_TIMEOUT_S="${PROXY_READ_TIMEOUT_S:-300}"
RESOLVE_EVERY_S="${PROXY_RESOLVE_EVERY_S:-5}"
# A replica that fails a connection is left out for this long (passive health check).
FAIL_TIMEOUT_S="${PROXY_FAIL_TIMEOUT_S:-10}"
START_WAIT_S="${PROXY_START_WAIT_S:-120}"
RUN=/run/convirt-proxy
CONF=/etc/convirt-proxy/nginx.conf

log() { printf '[proxy %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ "${1:-}" == health ]]; then
    exec 3<>/dev/tcp/127.0.0.1/8000
    printf 'GET /.proxy-health HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
    read -r -t 2 status_line <&3
    [[ "$status_line" == *" 200 "* ]]
    exit
fi

for name in MAX_BODY_BYTES HEADER_TIMEOUT_S BODY_TIMEOUT_S READ_TIMEOUT_S RESOLVE_EVERY_S \
    FAIL_TIMEOUT_S START_WAIT_S UPSTREAM_PORT; do
    [[ "${!name}" =~ ^[0-9]+$ && "${!name}" -gt 0 ]] ||
        { log "PROXY_$name must be a positive whole number, got '${!name}'"; exit 2; }
done
[[ "$UPSTREAM" =~ ^[A-Za-z0-9._-]+$ ]] || { log "PROXY_UPSTREAM '$UPSTREAM' is not a host name"; exit 2; }

# The replicas' IPv4 addresses, sorted, one per line; empty when none is running.
replicas() { getent ahostsv4 "$UPSTREAM" 2>/dev/null | awk '{ print $1 }' | sort -u || true; }

write_upstream() {
    local addresses=$1 address
    {
        echo "upstream convirt_api {"
        for address in $addresses; do
            echo "    server $address:$UPSTREAM_PORT max_fails=1 fail_timeout=${FAIL_TIMEOUT_S}s;"
        done
        echo "}"
    } >"$RUN/upstream.conf.new"
    mv "$RUN/upstream.conf.new" "$RUN/upstream.conf"
}

mkdir -p "$RUN"
cat >"$RUN/limits.conf" <<CONF
client_max_body_size $MAX_BODY_BYTES;
client_header_timeout ${HEADER_TIMEOUT_S}s;
client_body_timeout ${BODY_TIMEOUT_S}s;
send_timeout 60s;
proxy_read_timeout ${READ_TIMEOUT_S}s;
proxy_send_timeout 60s;
CONF

current=""
waited=0
until current="$(replicas)"; [[ -n "$current" ]]; do
    ((waited < START_WAIT_S)) || { log "no address for '$UPSTREAM' after ${START_WAIT_S}s"; exit 1; }
    ((waited % 10)) || log "waiting for '$UPSTREAM' to resolve"
    sleep 1
    waited=$((waited + 1))
done
write_upstream "$current"
nginx -t -q -e stderr -c "$CONF"
log "balancing over $(echo $current) (port $UPSTREAM_PORT); body limit $MAX_BODY_BYTES bytes"
nginx -e stderr -c "$CONF" -g 'daemon off;' &
nginx_pid=$!

stop() { kill -QUIT "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" || true; exit 0; }
trap stop TERM INT QUIT

while kill -0 "$nginx_pid" 2>/dev/null; do
    sleep "$RESOLVE_EVERY_S" &
    wait $! || true
    latest="$(replicas)"
    # No address at all (every replica down at once): keep the last set, whose passive
    # checks answer 502 until one is back, rather than an upstream with no server.
    if [[ -n "$latest" && "$latest" != "$current" ]]; then
        write_upstream "$latest"
        if nginx -t -q -e stderr -c "$CONF"; then
            nginx -e stderr -c "$CONF" -s reload
            log "replicas now $(echo $latest)"
            current=$latest
        else
            log "the new upstream did not pass nginx -t; keeping $(echo $current)"
            write_upstream "$current"
        fi
    fi
done
wait "$nginx_pid"
