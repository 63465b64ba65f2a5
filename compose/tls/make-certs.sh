#!/usr/bin/env bash
# Make a private CA and a server certificate for the care-home Redis (split deployment).
#   compose/tls/make-certs.sh OUT_DIR HOSTNAME [EXTRA_NAME ...]
# HOSTNAME (and any extra names or IP addresses) must be how the GPU host reaches Redis.
# Writes ca.crt, ca.key, redis.crt, redis.key into OUT_DIR. Copy only ca.crt to the GPU host;
# keep ca.key offline. Also makes client.crt/client.key for optional mutual TLS.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR HOSTNAME [EXTRA_NAME ...]" >&2
  exit 2
fi
out=$1; shift
host=$1
mkdir -p "$out"
cd "$out"
sans=""
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then sans+="IP:$name,"; else sans+="DNS:$name,"; fi
done
sans=${sans%,}
umask 077
if [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=fallwatch Redis CA" -keyout ca.key -out ca.crt 2>/dev/null
fi
issue() {  # name, subject CN, extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
    -keyout "$1.key" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
    -extfile <(printf '%s\n' "$3") -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}
issue redis "$host" "subjectAltName=$sans
extendedKeyUsage=serverAuth"
issue client "fallwatch-cloud" "extendedKeyUsage=clientAuth"
chmod 644 ca.crt redis.crt client.crt
echo "wrote $out/{ca.crt,ca.key,redis.crt,redis.key,client.crt,client.key} for $*"
