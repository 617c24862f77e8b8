#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it with only its declared dependencies
# into a fresh virtual environment, and use it from a directory that holds a model file
# (.ci/wheel_smoke.py). Needs python3 and PyPI; run as `make smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loraplug-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { echo "wheel smoke: $*"; }

step "copying the source tree"
mkdir "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and new files, as they are now; nothing ignored (no build/ from earlier).
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -cf - -T - | tar -xf - -C "$WORK/src"
else
    tar --exclude=./.venv --exclude=./build --exclude=./dist -cf - . | tar -xf - -C "$WORK/src"
fi

step "creating a fresh virtual environment"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip

step "building the wheel"
"$VPY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/loraplug-*.whl)

# torch first, at the version the tests use (the wheel itself accepts a range); then the
# wheel, with what it declares and nothing else: no extras.
TORCH=$(grep -E '^torch==' requirements-dev.txt)
step "installing $TORCH"
"$VPY" -m pip install -q "$TORCH"
step "installing $(basename "$WHEEL") with its declared dependencies only"
"$VPY" -m pip install -q "$WHEEL"
"$VPY" -m pip check
"$VPY" -m pip list --format=freeze | sed 's/^/    /'

step "using it from a directory that holds a model file"
mkdir "$WORK/user"
cd "$WORK/user"
status=0
PATH="$WORK/venv/bin:$PATH" "$VPY" "$ROOT/.ci/wheel_smoke.py" 2>"$WORK/stderr.txt" || status=$?
cat "$WORK/stderr.txt" >&2
if grep -q "Failed to initialize NumPy" "$WORK/stderr.txt"; then
    echo "wheel smoke: FAILED: torch could not initialize NumPy" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "wheel smoke: FAILED (exit status $status)" >&2
    exit "$status"
fi
echo "wheel smoke: passed"
