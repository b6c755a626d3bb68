#!/bin/sh
# The SuperLink: TLS, only registered sites (--enable-supernode-auth), its state
# in a database (runs and nodes survive a restart), no per-run dependency
# installation (the ServerApp uses this environment: pip install -e . first).
#   start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]
# HOST:PORT (default 127.0.0.1:9093) serves the Fleet, Control and Runtime APIs
# together: keep it on the operator's side and let the sites in through the
# Fleet proxy (start-proxy.sh). The ServerApp runs in STATE_DIR; the experiment
# config's output_dir (absolute) says where its runs are written.
set -eu
CERTS=${1:?usage: start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]}
STATE=${2:?usage: start-superlink.sh CERT_DIR STATE_DIR [HOST [PORT]]}
HOST=${3:-127.0.0.1}
PORT=${4:-9093}
mkdir -p "$STATE"
cd "$STATE"
exec flower-superlink \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/superlink.crt" --ssl-keyfile "$CERTS/superlink.key" \
  --enable-supernode-auth \
  --database "$STATE/state.db" \
  --disable-runtime-dependency-installation \
  --host "$HOST" --port "$PORT"
