#!/usr/bin/env bash
# Certificates and keys for a ChainFed federation on Flower 1.41 (README, "Deploying on Flower"):
#
#   scripts/make_certs.sh OUT_DIR [NUM_SUPERNODES] [SUPERLINK_HOST ...]
#
# writes, with openssl and ssh-keygen:
#   OUT_DIR/ca.crt, ca.key                     a self-signed CA (SuperNodes and the flwr CLI trust it)
#   OUT_DIR/server.pem, server.key             the SuperLink's TLS certificate, signed by the CA, valid
#                                              for localhost, 127.0.0.1 and every SUPERLINK_HOST given
#   OUT_DIR/supernode_K, supernode_K.pub       SuperNode K's authentication key pair (EC P-384, OpenSSH
#                                              format), K = 0 .. NUM_SUPERNODES-1 (default 3)
# Keep the .key files and the supernode_K private keys on their own machines; only ca.crt and the
# .pub files travel. An existing OUT_DIR is refused (rotate into a fresh folder).
set -euo pipefail

out="${1:?usage: scripts/make_certs.sh OUT_DIR [NUM_SUPERNODES] [SUPERLINK_HOST ...]}"
nodes="${2:-3}"
shift $(( $# >= 2 ? 2 : 1 ))
[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "make_certs.sh: NUM_SUPERNODES must be a number, got '$nodes'" >&2; exit 2; }
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "make_certs.sh: $tool is not installed" >&2; exit 2; }
done
[[ -e "$out" ]] && { echo "make_certs.sh: $out exists; give a fresh folder" >&2; exit 2; }
mkdir -p "$out"
chmod 700 "$out"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san="$san,IP:$host"; else san="$san,DNS:$host"; fi
done

openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=ChainFed federation CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -sha256 -nodes -subj "/CN=ChainFed SuperLink" \
    -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"

for (( k = 0; k < nodes; k++ )); do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "chainfed-supernode-$k" -f "$out/supernode_$k"
done
chmod 600 "$out"/*.key "$out"/supernode_*[0-9]
echo "make_certs.sh: CA, SuperLink certificate ($san) and $nodes SuperNode key pairs in $out"
