#!/usr/bin/env bash
# Installs the Debian packages the scale-out tests and the local cluster use, where missing,
# and says which and why, one line each, before anything is installed:
#   postgresql         the registry on PostgreSQL (tests/test_postgres.py, tests/test_cluster.py, deploy/local)
#   nginx              the local cluster's tenant-affinity router (tests/test_cluster.py, bench.cluster)
#   kubernetes-client  kubectl, to render deploy/k8s (tests/test_k8s.py)
#   dataset-fashion-mnist  Fashion-MNIST images for the image benchmarks and marked image tests
#   chromium           a real headless browser for the web console's tests (tests/test_console_browser.py)
# Best effort: without root or apt-get the tests that need a missing program skip and say why.
# --dry-run (or TAILOR_SYSTEM_PACKAGES=skip): say what is present and what is missing, install nothing.
set -uo pipefail
say() { echo "system-packages: $*" >&2; }
dry=0
[ "${1:-}" = "--dry-run" ] || [ "${TAILOR_SYSTEM_PACKAGES:-}" = "skip" ] && dry=1

have_postgresql() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }
have_kubernetes-client() { command -v kubectl >/dev/null 2>&1; }
have_dataset-fashion-mnist() { [ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; }
have_chromium() { command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; }
declare -A why=(
  [postgresql]="the registry on PostgreSQL: tests/test_postgres.py, tests/test_cluster.py, deploy/local"
  [nginx]="the local cluster's tenant-affinity router: tests/test_cluster.py, bench.cluster"
  [kubernetes-client]="kubectl, which renders deploy/k8s: tests/test_k8s.py"
  [dataset-fashion-mnist]="Fashion-MNIST images: bench.quality --dataset fashion-mnist, tests/test_image_datasets.py"
  [chromium]="the web console's browser tests (headless, driven by Playwright): tests/test_console_browser.py"
)
need=()
for pkg in postgresql nginx kubernetes-client dataset-fashion-mnist chromium; do
  if "have_$pkg"; then
    say "$pkg: present (for ${why[$pkg]})"
  else
    say "$pkg: missing, needed for ${why[$pkg]}"
    need+=("$pkg")
  fi
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$dry" = 1 ]; then
  say "not installing ${need[*]} (dry run); tests needing them will skip"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  say "cannot install ${need[*]} (not root or no apt-get); tests needing them will skip"
  exit 0
fi
say "installing ${need[*]} with apt-get (TAILOR_SYSTEM_PACKAGES=skip to skip this)"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${need[@]}" \
  || { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } \
  || say "could not install ${need[*]}; tests needing them will skip"
# The Debian nginx package starts a system-wide server on port 80; we run our own instances.
if [[ " ${need[*]} " == *" nginx "* ]] && command -v service >/dev/null 2>&1; then
  say "stopping the system-wide nginx the package started (the cluster runs its own)"
  service nginx stop >/dev/null 2>&1 || true
fi
exit 0
