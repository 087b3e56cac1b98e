#!/usr/bin/env bash
# Creates or refreshes .venv with scratchlm and everything it needs, then leaves it active.
# torch is pinned to the 2.13.0 CPU wheel first so nothing later can pull a CUDA build;
# the package itself declares only a range (torch>=2.4) that real users can satisfy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.scratchlm-installed
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing scratchlm and its dependencies into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" >&2 || true
    # Every optional extra: the test suite covers them all.
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,ray,export,eval,serve]" 2>&1 | grep -v "is ignored" >&2 || true
    .venv/bin/python -c "import torch, scratchlm, pytest" || { echo "setup: install failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
# The web chat page (`scratchlm serve`) is tested in a real headless browser: Debian's chromium
# and its WebDriver, installed when missing (as root; elsewhere the browser test skips, saying why).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: installing chromium and chromium-driver (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
            echo "setup: could not install chromium; the browser test will skip" >&2
    fi
fi
