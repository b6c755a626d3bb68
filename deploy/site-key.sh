#!/bin/sh
# A site's SuperNode authentication key pair (ECDSA P-384, ssh-keygen).
#   site-key.sh OUT_DIR SITE_NAME
# OUT_DIR/SITE_NAME is the private key: it stays at the site (flower-supernode
# --auth-supernode-private-key). OUT_DIR/SITE_NAME.pub goes to the operator,
# who registers it: flwr supernode register SITE_NAME.pub CONNECTION
set -eu
OUT=${1:?usage: site-key.sh OUT_DIR SITE_NAME}
NAME=${2:?usage: site-key.sh OUT_DIR SITE_NAME}
mkdir -p "$OUT"
[ ! -e "$OUT/$NAME" ] || { echo "site-key.sh: $OUT/$NAME exists; not overwriting a site's key" >&2; exit 2; }
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$NAME" -f "$OUT/$NAME"
echo "private key (stays at the site): $OUT/$NAME; public key (to register): $OUT/$NAME.pub"
