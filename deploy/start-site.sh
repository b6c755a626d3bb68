#!/bin/sh
# A site's SuperNode: connects to the Fleet proxy over TLS, authenticates with
# the site's key, and serves the site folder its node config names.
#   start-site.sh FLEET_ADDRESS CA_CERT SITE_KEY NODE_CONFIG [LOCAL_PORT]
# FLEET_ADDRESS: the proxy's host:port (a SAN of the certificate); NODE_CONFIG:
# the site's TOML file (template: site.toml); LOCAL_PORT (default 9094): the
# SuperNode's own local port, one per SuperNode on a machine.
set -eu
ADDRESS=${1:?usage: start-site.sh FLEET_ADDRESS CA_CERT SITE_KEY NODE_CONFIG [LOCAL_PORT]}
CA=${2:?usage: start-site.sh FLEET_ADDRESS CA_CERT SITE_KEY NODE_CONFIG [LOCAL_PORT]}
KEY=${3:?usage: start-site.sh FLEET_ADDRESS CA_CERT SITE_KEY NODE_CONFIG [LOCAL_PORT]}
NODE_CONFIG=${4:?usage: start-site.sh FLEET_ADDRESS CA_CERT SITE_KEY NODE_CONFIG [LOCAL_PORT]}
PORT=${5:-9094}
for f in "$CA" "$KEY" "$NODE_CONFIG"; do
  [ -r "$f" ] || { echo "start-site.sh: cannot read $f" >&2; exit 2; }
done
exec flower-supernode \
  --superlink "$ADDRESS" --root-certificates "$CA" \
  --auth-supernode-private-key "$KEY" \
  --node-config "$NODE_CONFIG" \
  --port "$PORT"
