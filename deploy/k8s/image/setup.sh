#!/bin/sh
# Runs as root while the image is built (bentofile `docker: setup_script:`), before the Python
# environment exists. The bento ships the project as source (src/adapters, src/service), not as
# an installed package, so the `tailor` console script of pyproject.toml is absent from the
# image: this puts an equivalent one on PATH. Kubernetes runs `tailor worker` with it, and
# `kubectl exec deploy/tailor -- tailor --help` works for the admin commands.
set -eu
cat > /usr/local/bin/tailor <<'SH'
#!/bin/sh
# `tailor` = python -m service.cli, from the bento's source (see deploy/k8s/image/setup.sh).
export PYTHONPATH="${BENTO_PATH:-/home/bentoml/bento}/src${PYTHONPATH:+:$PYTHONPATH}"
exec python -m service.cli "$@"
SH
chmod 0755 /usr/local/bin/tailor
