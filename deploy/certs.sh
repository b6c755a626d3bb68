#!/bin/sh
# A CA and a SuperLink certificate signed by it (openssl), for TLS between the
# sites, the Fleet proxy and the SuperLink.
#   certs.sh OUT_DIR SAN [SAN ...]
#   e.g. certs.sh /etc/metafed/certs DNS:link.example.org DNS:localhost IP:127.0.0.1
# Every address the sites or the proxy use for the SuperLink must be a SAN.
# Writes ca.crt, ca.key (keep it offline), superlink.crt, superlink.key.
set -eu
OUT=${1:?usage: certs.sh OUT_DIR SAN [SAN ...]  (e.g. DNS:localhost IP:127.0.0.1)}
shift
[ $# -gt 0 ] || { echo "certs.sh: give at least one SAN, e.g. DNS:localhost IP:127.0.0.1" >&2; exit 2; }
SANS=$(printf '%s,' "$@")
SANS=${SANS%,}
mkdir -p "$OUT"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 3650 -nodes \
  -subj "/CN=metafed CA" -keyout "$OUT/ca.key" -out "$OUT/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes \
  -subj "/CN=metafed superlink" -keyout "$OUT/superlink.key" -out "$OUT/superlink.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$SANS" > "$OUT/superlink.ext"
openssl x509 -req -in "$OUT/superlink.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
  -days 825 -sha256 -extfile "$OUT/superlink.ext" -out "$OUT/superlink.crt" 2>/dev/null
rm -f "$OUT/superlink.csr" "$OUT/superlink.ext" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/superlink.crt"
echo "CA: $OUT/ca.crt; SuperLink certificate for $SANS: $OUT/superlink.crt"
