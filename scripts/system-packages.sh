#!/usr/bin/env bash
# Installs the Debian packages the scale-out tests and the local cluster use, where missing:
# PostgreSQL (registry), NGINX (tenant-affinity router), kubectl (renders deploy/k8s).
# Best effort: without root or apt the tests that need a missing program skip and say why.
set -uo pipefail
need=()
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: missing ${need[*]} (not root or no apt-get); tests needing them will skip" >&2
  exit 0
fi
echo "system-packages: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
{ apt-get install -y -q --no-install-recommends "${need[@]}" \
  || { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; }; } >/dev/null 2>&1 \
  || echo "system-packages: could not install ${need[*]}; tests needing them will skip" >&2
# The Debian nginx package starts a system-wide server on port 80; we run our own instances.
command -v service >/dev/null 2>&1 && service nginx stop >/dev/null 2>&1 || true
exit 0
