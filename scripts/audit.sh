#!/usr/bin/env bash
# Dependency audit: every pin of requirements*.lock (runtime, development, CUDA) against the Python Packaging Advisory
# database, with pip-audit (pinned below) in its own environment, .venv-audit/.
#
#   scripts/audit.sh            exit 0: no known vulnerability; 1: vulnerable pins (or a
#                               pin pip-audit could not check); 3: see "offline" below
#
# Offline: pip-audit needs PyPI's per-release JSON API (https://pypi.org/pypi/NAME/VERSION/json).
# When it is unreachable (no network, or a mirror that serves only the package index),
# nothing can be audited: the script says so on stderr and exits 0, so tests still run
# on a machine without network, unless RECSTREAM_AUDIT_REQUIRED=1, which makes it exit 3
# (set it where the network is guaranteed, e.g. a release pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-audit
PIP_AUDIT=pip-audit==2.10.1
PROBE_URL=https://pypi.org/pypi/pip-audit/2.10.1/json

if ! "$PYTHON" - "$PROBE_URL" <<'EOF'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
then
  echo "audit: PyPI's vulnerability data ($PROBE_URL) is unreachable from here;" \
       "dependency audit NOT run" >&2
  [ "${RECSTREAM_AUDIT_REQUIRED:-0}" = 1 ] && exit 3
  exit 0
fi

if [ ! -x "$VENV/bin/pip-audit" ] || ! "$VENV/bin/pip-audit" --version | grep -q "${PIP_AUDIT#*==}"; then
  echo "setting up $VENV ($PIP_AUDIT)..." >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$PIP_AUDIT"
fi

# Local version labels (torch==2.13.0+cpu) are builds of the public release: audit that.
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
cat requirements.lock requirements-dev.lock requirements-cuda.lock \
  | sed -E 's/^([A-Za-z0-9_.-]+==[^+ ;]+)\+[A-Za-z0-9.]+/\1/' >"$pins"

echo "== pip-audit (requirements.lock, requirements-dev.lock, requirements-cuda.lock)" >&2
# --strict: a pin that cannot be checked fails the audit instead of being skipped.
exec "$VENV/bin/pip-audit" --strict --no-deps --disable-pip --progress-spinner off -r "$pins"
