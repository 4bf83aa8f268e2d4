#!/usr/bin/env bash
# Prove the compose stack on this machine, with no Docker Hub:
#
#   docker/harness.sh            # from anywhere; needs docker, docker-compose (or compose v2)
#
#  1. a local base image: debootstrap + docker import (docker/make-base-image.sh, cached);
#  2. local PostgreSQL, nginx (docker/proxy) and Orthanc images on it;
#  3. the service image, built by compose from docker/Dockerfile on that base, with the
#     machine's CPU torch wheel and CA bundle in the build context when it has them;
#  4. `up -d` with API_REPLICAS=2 and the `orthanc` profile: init (migrations, small demo)
#     runs to completion, both replicas, the proxy and the worker come up, /ready answers
#     through the proxy. Then, all through the proxy on its one published port:
#     - a radiograph stored in Orthanc is followed into the service (harness_replicas pacs);
#     - authentication, upload and searches (harness_check exercise);
#     - an upload is searchable on each replica, asked directly through `docker exec`, within
#       2 s, and a delete gone from both (harness_replicas propagation);
#     - one replica is killed (`docker kill`) during a 20 s search loop: only the requests
#       in flight may fail, and they are counted (harness_replicas failover);
#     - the killed replica, started again, loads the index snapshot, replays the feed's
#       tail (its log says so; no rebuild) and serves what changed while it was down
#       (harness_replicas catch-up);
#  5. `down` (volumes kept) + `up -d`: the data must have survived (harness_check verify),
#     and init must not have trained again;
#  6. tear down: `down -v`, and remove the images it built unless KEEP_IMAGES=1.
#
# The last line on stdout is a JSON object with the timings (seconds), image sizes (bytes)
# and the replica checks' figures. Any failure prints the stack's logs and exits non-zero;
# cleanup runs either way.
#
# Environment:
#   KEEP_IMAGES=1         keep the built images (the next run reuses their layers)
#   HARNESS_PROJECT       compose project name (convirt-harness)
#   HARNESS_DEMO_N        demo corpus size asked of init (64)
#   HARNESS_DEMO_TIME_BUDGET  demo training budget in seconds (45)
#   HARNESS_ORTHANC=0     leave out the orthanc profile and its check
#   HARNESS_UP_TIMEOUT_S  first start, up to ready (1200); HARNESS_RESTART_TIMEOUT_S (300)
#   CACHE_DIR             base root file system cache (/tmp/convirt-docker-cache)
#   TORCH_WHEEL           a CPU torch wheel to build with (default: looked for under /opt)
#   COMPOSE               compose command (default: `docker compose` if present, else docker-compose)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PROJECT="${HARNESS_PROJECT:-convirt-harness}"
KEEP_IMAGES="${KEEP_IMAGES:-0}"
export CACHE_DIR="${CACHE_DIR:-/tmp/convirt-docker-cache}"
DEMO_N="${HARNESS_DEMO_N:-64}"
DEMO_TIME_BUDGET="${HARNESS_DEMO_TIME_BUDGET:-45}"
UP_TIMEOUT_S="${HARNESS_UP_TIMEOUT_S:-1200}"
RESTART_TIMEOUT_S="${HARNESS_RESTART_TIMEOUT_S:-300}"
WITH_ORTHANC="${HARNESS_ORTHANC:-1}"
REPLICAS=2
FAILOVER_SECONDS=20
FAILOVER_KILL_AT_S=5
FAILOVER_CLIENTS=4
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
BASE_IMAGE_NAME="convirt-local/python:3.11-bookworm"
PG_IMAGE_NAME="convirt-local/postgres:15"
API_IMAGE_NAME="$PROJECT/api:latest"
PROXY_IMAGE_NAME="$PROJECT/proxy:latest"
ORTHANC_IMAGE_NAME="$PROJECT/orthanc:latest"
PYTHON="${PYTHON:-python3}"

log() { printf '[harness %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (docker info fails)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (the HTTP checks need Python 3)"
if [[ -n "${COMPOSE:-}" ]]; then
    read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null; then
    COMPOSE_CMD=(docker-compose)
else
    die "neither \`docker compose\` nor docker-compose is installed"
fi
COMPOSE_VERSION="$("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo unknown)"

# Everything compose interpolates: the local images, a random key, a free loopback port and
# the small demo. Nothing here leaks into the user's shell or .env.
export POSTGRES_IMAGE="$PG_IMAGE_NAME"
export BASE_IMAGE="$BASE_IMAGE_NAME"
export API_IMAGE="$API_IMAGE_NAME" API_REPLICAS="$REPLICAS"
export PROXY_IMAGE="$PROXY_IMAGE_NAME" PROXY_BASE_IMAGE="$BASE_IMAGE_NAME"
export ORTHANC_IMAGE="$ORTHANC_IMAGE_NAME" ORTHANC_BASE_IMAGE="$BASE_IMAGE_NAME"
export ORTHANC_USERNAME=convirt
export ORTHANC_PASSWORD="harness-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
export POSTGRES_PASSWORD="harness-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
API_KEY="harness-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export CONVIRT_API_KEYS="$API_KEY"
export CONVIRT_DEMO=1 CONVIRT_DEMO_N="$DEMO_N" CONVIRT_DEMO_TIME_BUDGET="$DEMO_TIME_BUDGET"
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT="$(free_port)" ORTHANC_HTTP_PORT="$(free_port)" ORTHANC_DICOM_PORT="$(free_port)"
export API_PORT ORTHANC_HTTP_PORT ORTHANC_DICOM_PORT
BASE_URL="http://127.0.0.1:$API_PORT"

PROFILE_ARGS=() FOLLOWER_SERVICE=""
if [[ "$WITH_ORTHANC" == 1 ]]; then PROFILE_ARGS=(--profile orthanc) FOLLOWER_SERVICE=follower; fi
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$REPO/docker-compose.yml" "${PROFILE_ARGS[@]}" "$@"; }

WORK="$(mktemp -d /tmp/convirt-harness.XXXXXX)"
ADDED_FILES=()
STATUS=failed

# Long steps run in the background and are waited for: bash runs a trap only once the
# foreground command ends, while `wait` returns at once, so SIGTERM cleans up promptly.
# Job control gives each step its own process group, so that cleanup stops the whole step
# (docker-compose and the `docker build` it runs), not just the shell that started it.
set -m
BG_PID=""
run() {
    local rc=0
    "$@" &
    BG_PID=$!
    wait "$BG_PID" || rc=$?
    BG_PID=""
    return "$rc"
}

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$BG_PID" ]]; then
        kill -TERM -- "-$BG_PID" 2>/dev/null
        wait "$BG_PID" 2>/dev/null
    fi
    if [[ "$STATUS" != ok ]]; then
        log "stack logs (last 200 lines per service):"
        compose ps >&2
        compose logs --no-color --tail=200 >&2
    fi
    log "tearing down (down -v)"
    compose down -v --remove-orphans >/dev/null 2>&1
    if [[ "$KEEP_IMAGES" != 1 ]]; then
        docker image rm -f "$API_IMAGE_NAME" "$PG_IMAGE_NAME" "$PROXY_IMAGE_NAME" \
            "$ORTHANC_IMAGE_NAME" >/dev/null 2>&1
        # The builds' other images only (the builder stage, replaced or interrupted builds),
        # by their labels, not whatever else the daemon holds; then the base, now unused.
        # An interrupted build's container goes away a moment after its client: retry.
        local labels=(org.convirt.stage=builder org.opencontainers.image.title=convirt-retrieval
            org.opencontainers.image.title=convirt-local-postgres
            org.opencontainers.image.title=convirt-local-proxy
            org.opencontainers.image.title=convirt-local-orthanc) label left attempt
        for attempt in 1 2 3 4 5 6 7 8 9 10; do
            left=""
            for label in "${labels[@]}"; do
                docker image prune -a -f --filter "label=$label" >/dev/null 2>&1
                left+="$(docker images -aq --filter "label=$label" 2>/dev/null)"
            done
            [[ -n "$left" ]] || break
            sleep 2
        done
        docker image rm -f "$BASE_IMAGE_NAME" >/dev/null 2>&1
    fi
    for f in "${ADDED_FILES[@]}"; do rm -f "$f"; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

containers() { compose ps -q "$1" 2>/dev/null || true; }

# Wait for one container's Docker healthcheck to say healthy; fail early if it exits or
# restarts. $1: container id, $2: its service (for messages), $3: timeout in seconds.
wait_container_healthy() {
    local id=$1 service=$2 timeout_s=$3 start state health restarts last_note=0 elapsed
    start=$(date +%s)
    while :; do
        read -r state health restarts < <(docker inspect -f \
            '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.RestartCount}}' \
            "$id" 2>/dev/null || echo "missing none 0")
        [[ "$health" == healthy ]] && return 0
        [[ "$state" == exited || "$state" == dead || "$state" == missing || "$restarts" -gt 0 ]] &&
            die "$service ${id:0:12} stopped (state $state, restarts $restarts) before becoming healthy"
        elapsed=$(($(date +%s) - start))
        ((elapsed < timeout_s)) || die "$service not healthy after ${timeout_s}s (state $state, health $health)"
        if ((elapsed - last_note >= 30)); then
            last_note=$elapsed
            log "waiting for $service ${id:0:12}: ${elapsed}s, $health; last log: $(
                docker logs --tail=1 "$id" 2>&1 | tail -n 1 | cut -c1-160)"
        fi
        sleep 2
    done
}

# Every container of a service healthy; $3: how many there must be.
wait_healthy() {
    local service=$1 timeout_s=$2 expected=${3:-1} ids start
    start=$(date +%s)
    while ids=($(containers "$service")); ((${#ids[@]} < expected)); do
        (($(date +%s) - start < timeout_s)) || die "$service: ${#ids[@]} of $expected containers"
        sleep 2
    done
    for id in "${ids[@]}"; do wait_container_healthy "$id" "$service" "$timeout_s"; done
}

# The one-shot init service: wait until it exits, and fail unless with status 0.
wait_init() {
    local timeout_s=$1 start id state code last_note=0 elapsed
    start=$(date +%s)
    while :; do
        id="$(containers init | sed -n 1p)"
        if [[ -n "$id" ]]; then
            read -r state code < <(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id" \
                2>/dev/null || echo "missing 0")
            if [[ "$state" == exited ]]; then
                [[ "$code" == 0 ]] && return 0
                die "init exited with status $code"
            fi
        fi
        elapsed=$(($(date +%s) - start))
        ((elapsed < timeout_s)) || die "init still running after ${timeout_s}s"
        if ((elapsed - last_note >= 30)); then
            last_note=$elapsed
            log "waiting for init: ${elapsed}s; last log: $(
                compose logs --no-color --tail=1 init 2>/dev/null | tail -n 1 | cut -c1-160)"
        fi
        sleep 2
    done
}

# Up; init done; db, replicas and proxy healthy; /ready 200 through the proxy. Sets
# HEALTHY_S and READY_S. `up` itself waits for init before it starts the replicas, so it
# runs in the background while init is watched (and its failure seen at once).
start_stack() {
    local timeout_s=$1 t0 remaining up_pid rc=0
    t0=$(now)
    compose up -d --no-build >&2 &
    up_pid=$!
    BG_PID=$up_pid
    wait_init "$timeout_s"
    wait "$up_pid" || rc=$?
    BG_PID=""
    ((rc == 0)) || die "compose up failed (status $rc)"
    wait_healthy db "$timeout_s"
    wait_healthy api "$timeout_s" "$REPLICAS"
    wait_healthy proxy "$timeout_s"
    # Services without a health check (no HTTP port): running, and not restarting.
    local service id state restarts
    for service in worker ${FOLLOWER_SERVICE:-}; do
        id="$(containers "$service" | sed -n 1p)"
        [[ -n "$id" ]] || die "no $service container"
        read -r state restarts < <(docker inspect -f '{{.State.Status}} {{.RestartCount}}' "$id")
        [[ "$state" == running && "$restarts" == 0 ]] ||
            die "$service is $state after $restarts restarts: $(docker logs --tail=5 "$id" 2>&1)"
    done
    HEALTHY_S=$(since "$t0")
    remaining=$(awk -v t="$timeout_s" -v h="$HEALTHY_S" 'BEGIN { r = t - h; print (r < 30 ? 30 : int(r)) }')
    run "$PYTHON" docker/harness_check.py wait-ready "$BASE_URL" "$remaining" ||
        die "replicas healthy but the proxy's /ready is not 200"
    READY_S=$(since "$t0")
}

T_TOTAL=$(now)
log "compose: ${COMPOSE_CMD[*]} ($COMPOSE_VERSION), project $PROJECT, api on $BASE_URL"
# A previous run killed with SIGKILL may have left its stack behind.
compose down -v --remove-orphans >/dev/null 2>&1 || true

# 1. base image
t0=$(now)
run docker/make-base-image.sh "$BASE_IMAGE_NAME"
BASE_S=$(since "$t0")
log "base image: ${BASE_S}s"

# 2. PostgreSQL image
t0=$(now)
run docker build -q -f docker/postgres/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE_NAME" \
    -t "$PG_IMAGE_NAME" . >"$WORK/postgres-build.log" 2>&1 ||
    { cat "$WORK/postgres-build.log" >&2; die "PostgreSQL image build failed"; }
PG_S=$(since "$t0")
log "PostgreSQL image: ${PG_S}s"

# 2b. nginx (and Orthanc): built by compose from their Dockerfiles on the same base
t0=$(now)
extra_images=(proxy)
[[ "$WITH_ORTHANC" == 1 ]] && extra_images+=(orthanc)
run compose build "${extra_images[@]}" >"$WORK/extra-build.log" 2>&1 ||
    { tail -n 80 "$WORK/extra-build.log" >&2; die "${extra_images[*]} image build failed"; }
EXTRA_S=$(since "$t0")
log "${extra_images[*]} images: ${EXTRA_S}s"

# 3. service image: the local CPU torch wheel and the CA bundle go into the build context
wheel="${TORCH_WHEEL:-}"
if [[ -z "$wheel" ]]; then
    wheel="$(find /opt -maxdepth 4 -name "torch-${TORCH_VERSION}*cpu*.whl" -print -quit 2>/dev/null || true)"
fi
if [[ -n "$wheel" ]]; then
    target="docker/wheels/$(basename "$wheel")"
    if [[ ! -e "$target" ]]; then
        cp "$wheel" "$target"
        ADDED_FILES+=("$REPO/$target")
    fi
    log "torch from $wheel"
else
    log "no local torch wheel: the build downloads the CPU build from its TORCH_INDEX_URL"
fi
if [[ -s /etc/ssl/certs/ca-certificates.crt && ! -e docker/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt docker/certs/ca-certificates.crt
    ADDED_FILES+=("$REPO/docker/certs/ca-certificates.crt")
fi
t0=$(now)
run compose build init >"$WORK/api-build.log" 2>&1 ||
    { tail -n 80 "$WORK/api-build.log" >&2; die "service image build failed"; }
API_BUILD_S=$(since "$t0")
log "service image: ${API_BUILD_S}s"

# What the runtime stage must (not) contain: a non-root user, no compiler, nothing of the
# build context's extras (torch wheel, CA bundle), and a healthcheck.
[[ "$(docker image inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$API_IMAGE_NAME")" == yes ]] ||
    die "the service image has no HEALTHCHECK"
docker run --rm --entrypoint /bin/sh "$API_IMAGE_NAME" -c '
    [ "$(id -u)" != 0 ] || { echo "runs as root"; exit 1; }
    for tool in gcc cc g++ make; do
        ! command -v "$tool" >/dev/null || { echo "compiler $tool in the runtime image"; exit 1; }
    done
    [ ! -e /tmp/wheels ] && [ ! -e /tmp/certs ] || { echo "build extras left in the image"; exit 1; }
    /opt/venv/bin/python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"
' >&2 || die "service image checks"

# 4. first start: init (demo bundle and corpus), replicas, proxy; then the checks
start_stack "$UP_TIMEOUT_S"
UP1_HEALTHY_S=$HEALTHY_S UP1_READY_S=$READY_S
log "first start: healthy ${UP1_HEALTHY_S}s, ready ${UP1_READY_S}s"
mapfile -t API_IDS < <(containers api)
((${#API_IDS[@]} == REPLICAS)) || die "expected $REPLICAS api containers, found ${#API_IDS[@]}"
for id in "${API_IDS[@]}"; do
    [[ "$(docker inspect -f '{{len .NetworkSettings.Ports}}{{range $p, $b := .NetworkSettings.Ports}}{{if $b}}published{{end}}{{end}}' "$id")" != *published* ]] ||
        die "api replica ${id:0:12} publishes a host port: only the proxy may"
done

PACS_JSON=null
if [[ "$WITH_ORTHANC" == 1 ]]; then
    PACS_JSON="$("$PYTHON" docker/harness_replicas.py pacs "$BASE_URL" "$API_KEY" \
        "${API_IDS[0]}" http://orthanc:8042 "$ORTHANC_USERNAME" "$ORTHANC_PASSWORD")" ||
        die "a study stored in Orthanc did not become searchable"
    log "orthanc: $PACS_JSON"
fi
run "$PYTHON" docker/harness_check.py exercise "$BASE_URL" "$API_KEY" "$WORK/state.json" ||
    die "API checks on the first start"
PROPAGATION_JSON="$("$PYTHON" docker/harness_replicas.py propagation "$BASE_URL" "$API_KEY" \
    "${API_IDS[@]}")" || die "a change through the proxy did not reach every replica in time"
log "propagation: $PROPAGATION_JSON"

VICTIM="${API_IDS[1]}"
log "failover: ${FAILOVER_SECONDS}s of searches, replica ${VICTIM:0:12} killed at ${FAILOVER_KILL_AT_S}s"
FAILOVER_JSON="$("$PYTHON" docker/harness_replicas.py failover "$BASE_URL" "$API_KEY" \
    "$VICTIM" "$FAILOVER_SECONDS" "$FAILOVER_KILL_AT_S" "$FAILOVER_CLIENTS")" ||
    die "searches through the proxy failed beyond the requests in flight at the kill"
log "failover: $FAILOVER_JSON"
OUTAGE_ID="$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1])["outage_image_id"])' "$FAILOVER_JSON")"

# The killed replica, started again: snapshot plus the feed's tail, then the outage's upload.
restart_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
t0=$(now)
docker start "$VICTIM" >/dev/null
wait_container_healthy "$VICTIM" api "$RESTART_TIMEOUT_S"
RESTART_HEALTHY_S=$(since "$t0")
CATCH_UP_JSON="$("$PYTHON" docker/harness_replicas.py catch-up "$BASE_URL" "$API_KEY" \
    "$VICTIM" "$OUTAGE_ID")" || die "the restarted replica did not catch up"
docker logs --since "$restart_at" "$VICTIM" >"$WORK/victim.log" 2>&1 || true
grep -q "holds the feed up to" "$WORK/victim.log" ||
    { tail -n 40 "$WORK/victim.log" >&2; die "the restarted replica did not start from the index snapshot"; }
! grep -q "rebuilding the index from the database" "$WORK/victim.log" ||
    die "the restarted replica rebuilt its index instead of replaying the feed's tail"
REPLAYED="$(sed -n 's/.*replayed \([0-9]*\) feed records after the snapshot.*/\1/p' "$WORK/victim.log" | tail -n 1)"
log "restarted replica: healthy ${RESTART_HEALTHY_S}s, replayed ${REPLAYED:-0} feed records; $CATCH_UP_JSON"

# 5. down (volumes kept) and up again: everything must still be there, and the demo
#    must not have been rebuilt
run compose down >&2
start_stack "$RESTART_TIMEOUT_S"
UP2_HEALTHY_S=$HEALTHY_S UP2_READY_S=$READY_S
log "second start: healthy ${UP2_HEALTHY_S}s, ready ${UP2_READY_S}s"
run "$PYTHON" docker/harness_check.py verify "$BASE_URL" "$API_KEY" "$WORK/state.json" ||
    die "API checks after down + up"
# `convirt demo` logs a JSON summary of its steps: on the second start it must have found
# the bundle on the volume instead of training again.
# (To a file first: `grep -q` stops reading at the first match, and under pipefail the
# SIGPIPE of the writer would count as a failure.)
compose logs --no-color init >"$WORK/init-second-start.log" 2>&1 || true
grep -qF '"train": "skipped"' "$WORK/init-second-start.log" ||
    die "the second start trained again instead of reusing the bundle on the volume"

size() { docker image inspect -f '{{.Size}}' "$1"; }
STATUS=ok
printf '{"harness": "ok", "compose": "%s", "replicas": %s, "demo_n": %s, "demo_time_budget_s": %s, "base_image_s": %s, "postgres_image_s": %s, "proxy_orthanc_images_s": %s, "api_image_s": %s, "first_up_healthy_s": %s, "first_up_ready_s": %s, "second_up_healthy_s": %s, "second_up_ready_s": %s, "restarted_replica_healthy_s": %s, "replayed_after_restart": %s, "propagation": %s, "failover": %s, "catch_up": %s, "pacs": %s, "total_s": %s, "image_bytes": {"base": %s, "postgres": %s, "proxy": %s, "api": %s}}\n' \
    "$COMPOSE_VERSION" "$REPLICAS" "$DEMO_N" "$DEMO_TIME_BUDGET" "$BASE_S" "$PG_S" "$EXTRA_S" "$API_BUILD_S" \
    "$UP1_HEALTHY_S" "$UP1_READY_S" "$UP2_HEALTHY_S" "$UP2_READY_S" "$RESTART_HEALTHY_S" "${REPLAYED:-0}" \
    "$PROPAGATION_JSON" "$FAILOVER_JSON" "$CATCH_UP_JSON" "$PACS_JSON" "$(since "$T_TOTAL")" \
    "$(size "$BASE_IMAGE_NAME")" "$(size "$PG_IMAGE_NAME")" "$(size "$PROXY_IMAGE_NAME")" "$(size "$API_IMAGE_NAME")"
