#!/bin/sh
# The Fleet proxy (nginx): the only address the sites reach. It serves TLS and
# forwards /v1/fleet/ (the SuperNodes' API) to the SuperLink; every other path
# (the Control API: registration, runs, logs) is refused with 403.
#   start-proxy.sh CERT_DIR STATE_DIR LISTEN SUPERLINK [SUPERLINK_NAME]
#   e.g. start-proxy.sh /etc/metafed/certs /var/lib/metafed/proxy 0.0.0.0:9092 127.0.0.1:9093 localhost
# SUPERLINK_NAME (default localhost): the SAN checked on the SuperLink's certificate.
set -eu
CERTS=${1:?usage: start-proxy.sh CERT_DIR STATE_DIR LISTEN SUPERLINK [SUPERLINK_NAME]}
STATE=${2:?usage: start-proxy.sh CERT_DIR STATE_DIR LISTEN SUPERLINK [SUPERLINK_NAME]}
LISTEN=${3:?usage: start-proxy.sh CERT_DIR STATE_DIR LISTEN SUPERLINK [SUPERLINK_NAME]}
SUPERLINK=${4:?usage: start-proxy.sh CERT_DIR STATE_DIR LISTEN SUPERLINK [SUPERLINK_NAME]}
NAME=${5:-localhost}
HERE=$(cd "$(dirname "$0")" && pwd)
command -v nginx >/dev/null || { echo "start-proxy.sh: nginx is not installed (apt-get install nginx-light)" >&2; exit 2; }
mkdir -p "$STATE/tmp"
sed -e "s|@STATE@|$STATE|g" -e "s|@CERTS@|$CERTS|g" -e "s|@LISTEN@|$LISTEN|g" \
    -e "s|@SUPERLINK@|$SUPERLINK|g" -e "s|@SUPERLINK_NAME@|$NAME|g" \
    "$HERE/fleet-proxy.conf.template" > "$STATE/nginx.conf"
exec nginx -p "$STATE" -e "$STATE/error.log" -c "$STATE/nginx.conf"
