#!/usr/bin/env bash
# Build the CPU image with podman and run it: `cxrnode migrate`, one `serve` (jobs.workers = 0)
# and two `worker` containers on one shared folder and a PostgreSQL server, the image's
# HEALTHCHECK, one study per worker sent with DCMTK storescu, every study drafted, SIGTERM exit 0.
#
#   deploy/smoke-podman.sh POSTGRES_SERVER_URL      # e.g. postgresql+psycopg://postgres@127.0.0.1:55432/postgres
#
# Needs: podman (and runc where crun cannot run containers, e.g. hybrid cgroups), storescu, a
# PostgreSQL server on this machine where it may create and drop a database, python3 with
# SQLAlchemy and psycopg (to create it). Containers use the host network (ports 11112, 8080, 18091,
# 18092 must be free).
#
# Where the registry cannot be reached (the machine this was written on reaches only PyPI and
# Debian), SUBSTITUTE_BASE=1 builds a stand-in for python:3.11-slim-bookworm with debootstrap
# (Debian 12's python3.11 + venv) and the host's CA bundle (a TLS-intercepting proxy), and builds
# the Containerfile on it with --build-arg PYTHON_IMAGE: it checks the Containerfile's steps and
# the image's behaviour, not the official base image.
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER=${1:?usage: deploy/smoke-podman.sh POSTGRES_SERVER_URL}
IMAGE=localhost/cxrnode:smoke
WORK=$(mktemp -d /tmp/cxrnode-podman-smoke.XXXXXX)
DB=cxrnode_podman_$(date +%s)
P=(podman)
if [[ -n "${RUNTIME:-}" ]]; then P+=(--runtime "$RUNTIME" --cgroup-manager cgroupfs); fi
# the soft limits of this shell: crun/runc may not raise them without CAP_SYS_RESOURCE
RUN=("${P[@]}" run --ulimit "nofile=$(ulimit -Sn):$(ulimit -Sn)" --ulimit nproc=4096:4096 --network host
     --read-only --tmpfs /tmp -v "$WORK/shared:/var/lib/cxrnode")
BUILD_ARGS=()

cleanup() {
    "${P[@]}" rm -f cxr-smoke-scp cxr-smoke-w1 cxr-smoke-w2 >/dev/null 2>&1 || true
    python3 - "$SERVER" "$DB" <<'EOF' || true
import sys
from sqlalchemy import create_engine, text
a = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with a.connect() as c:
    c.execute(text(f'DROP DATABASE IF EXISTS "{sys.argv[2]}" WITH (FORCE)'))
EOF
    rm -rf "$WORK"
}
trap cleanup EXIT

if [[ "${SUBSTITUTE_BASE:-0}" == 1 ]]; then
    echo "== stand-in base image (debootstrap bookworm + python3.11)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >/dev/null
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$WORK/rootfs" -c . | "${P[@]}" import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
        - localhost/cxrnode-smoke-base:bookworm >/dev/null
    rm -rf "$WORK/rootfs"
    BUILD_ARGS=(--build-arg PYTHON_IMAGE=localhost/cxrnode-smoke-base:bookworm)
fi

echo "== build"
time "${P[@]}" build --format docker --isolation=chroot "${BUILD_ARGS[@]}" -t "$IMAGE" -f Containerfile . | tail -1

echo "== database, shared folder"
python3 - "$SERVER" "$DB" <<'EOF'
import sys
from sqlalchemy import create_engine, text
a = create_engine(sys.argv[1], isolation_level="AUTOCOMMIT")
with a.connect() as c:
    c.execute(text(f'CREATE DATABASE "{sys.argv[2]}"'))
EOF
URL=$(python3 -c "import sys; from sqlalchemy.engine import make_url; print(make_url(sys.argv[1]).set(database=sys.argv[2]).render_as_string(hide_password=False))" "$SERVER" "$DB")
mkdir -p "$WORK/shared" && chown 10001:10001 "$WORK/shared" && chmod 750 "$WORK/shared"
ENV=(-e "CXRNODE_NODE_DATABASE_URL=$URL" -e CXRNODE_NODE_MIN_FREE_SPACE_MB=50)

echo "== migrate, serve, two workers"
"${RUN[@]}" --rm "${ENV[@]}" "$IMAGE" migrate
"${RUN[@]}" -d --name cxr-smoke-scp "${ENV[@]}" -e CXRNODE_NODE_HOST_ID=scp -e CXRNODE_JOBS_WORKERS=0 "$IMAGE" serve >/dev/null
"${RUN[@]}" -d --name cxr-smoke-w1 "${ENV[@]}" -e CXRNODE_NODE_HOST_ID=worker-1 -e CXRNODE_NODE_HEALTH_PORT=18091 \
    "$IMAGE" worker --threads 1 >/dev/null
"${RUN[@]}" -d --name cxr-smoke-w2 "${ENV[@]}" -e CXRNODE_NODE_HOST_ID=worker-2 -e CXRNODE_NODE_HEALTH_PORT=18092 \
    "$IMAGE" worker --threads 1 >/dev/null
for i in $(seq 120); do
    if "${P[@]}" healthcheck run cxr-smoke-scp >/dev/null 2>&1 \
        && curl -fs http://127.0.0.1:18091/healthz >/dev/null && curl -fs http://127.0.0.1:18092/healthz >/dev/null; then
        break
    fi
    [[ $i == 120 ]] && { "${P[@]}" logs cxr-smoke-scp; "${P[@]}" logs cxr-smoke-w1; echo "not healthy"; exit 1; }
    sleep 1
done
echo "serve HEALTHCHECK ok; workers /healthz: $(curl -s http://127.0.0.1:18091/healthz | head -c 120)"

echo "== two studies by C-STORE"
python3 - "$WORK/studies" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from plugin.drafting.samples import make_study
out = Path(sys.argv[1]); out.mkdir()
for n in range(2):
    for ds in make_study(n, prefix="podman-smoke"):
        ds.save_as(out / f"{n}_{ds.InstanceNumber}_{ds.SeriesNumber}.dcm", enforce_file_format=True)
EOF
STORESCU=/usr/bin/storescu
for n in 0 1; do "$STORESCU" -aec CXRNODE 127.0.0.1 11112 "$WORK"/studies/"$n"_*.dcm; done
for i in $(seq 120); do
    COUNTS=$("${P[@]}" exec cxr-smoke-scp cxrnode status --json | python3 -c "import json,sys; print(json.load(sys.stdin)['counts'])")
    [[ "$COUNTS" == *"'drafted': 2"* ]] && break
    [[ $i == 120 ]] && { echo "not drafted: $COUNTS"; exit 1; }
    sleep 1
done
echo "status: $COUNTS"
[[ -z "$(find "$WORK/shared" -maxdepth 1 -name .cache)" ]] || { echo "a cache on the shared volume"; exit 1; }

echo "== stop (SIGTERM)"
"${P[@]}" stop -t 60 cxr-smoke-scp cxr-smoke-w1 cxr-smoke-w2 >/dev/null
CODES=$("${P[@]}" inspect cxr-smoke-scp cxr-smoke-w1 cxr-smoke-w2 --format '{{.State.ExitCode}}' | tr '\n' ' ')
echo "exit codes: $CODES"
[[ "$CODES" == "0 0 0 " ]]
echo "podman smoke: ok"
