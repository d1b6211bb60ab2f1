#!/usr/bin/env bash
# make-certs.sh: a test CA, a broker certificate and one client certificate per device, with openssl.
#
#   configs/mosquitto/make-certs.sh OUT_DIR [--server-name NAME]... [--days N] CLIENT_ID...
#
# OUT_DIR/ca.crt, ca.key            the CA (kept: running again adds clients under the same CA)
# OUT_DIR/server.crt, server.key    the broker (SAN: every --server-name; default localhost, 127.0.0.1)
# OUT_DIR/clients/ID.crt, ID.key    one per CLIENT_ID; the certificate's CN is the ID, which the
#                                   broker uses as the username (use_identity_as_username) in the ACL
# For a lab or a test only: a production CA key lives offline, not next to the broker.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
out="$1"; shift
days=825
names=()
clients=()
while [ $# -gt 0 ]; do
  case "$1" in
    --server-name) names+=("$2"); shift 2 ;;
    --days) days="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "make-certs.sh: unknown option $1" >&2; exit 2 ;;
    *) clients+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
for id in "${clients[@]}"; do
  # the CN becomes an MQTT username and part of topics: same rule as device.id
  [[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$ ]] || { echo "make-certs.sh: bad client id '$id'" >&2; exit 2; }
done

mkdir -p "$out/clients"
umask 077
cd "$out"

if [ ! -f ca.key ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout ca.key -out ca.crt -days "$days" -subj "/CN=edgeagent test CA $(date +%s)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

sign() {  # sign NAME SUBJECT EXTFILE
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
    -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
    -extfile "$3" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$3"
}

if [ ! -f server.crt ]; then
  san=""
  for n in "${names[@]}"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
  done
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' \
    "${san%,}" > server.ext
  sign server "/CN=${names[0]}" server.ext
fi

for id in "${clients[@]}"; do
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "clients/$id.ext"
  sign "clients/$id" "/CN=$id" "clients/$id.ext"
done
chmod 0644 ca.crt server.crt clients/*.crt 2>/dev/null || true
echo "certificates in $out: ca.crt server.crt ${clients[*]/#/clients/}"
