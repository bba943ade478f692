#!/usr/bin/env bash
# The one entry script for developers and CI.
#
#   bash infra/dev.sh setup   # venv + Kafka jars + S3 server binary, all cached in ~/.cache/maas
#   bash infra/dev.sh test    # setup, then ruff and the whole pytest suite (starts its own stack)
#   bash infra/dev.sh demo    # setup, `maas stack up` (Kafka, S3, the services), smoke, `maas demo`
#   bash infra/dev.sh shell   # setup, then a shell with the venv active
#
# Extra arguments after `test` go to pytest (e.g. `bash infra/dev.sh test -k stack -x`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MAAS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/maas}"
PYTHON="${MAAS_PYTHON:-python3.11}"
export MAAS_CACHE_DIR="$CACHE"

log() { printf '[dev.sh] %s\n' "$*" >&2; }

# torch from PyPI depends on ~4.2 GB of CUDA wheels. Its shared objects link against most of the
# CUDA runtime libraries, so those (~2.8 GB, in requirements.lock) are needed even to import it on a
# CPU; triton and the lazily loaded libraries (~1.3 GB) are never loaded there and live in
# requirements-cuda.lock, added only where a GPU is found or MAAS_TORCH=cuda asks for them.
# --no-deps keeps pip from pulling them back in.
torch_flavour() {
  case "${MAAS_TORCH:-auto}" in
    cpu|cuda) printf '%s' "$MAAS_TORCH" ;;
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            printf cuda; else printf cpu; fi ;;
    *) log "MAAS_TORCH=${MAAS_TORCH} is unknown; use cpu, cuda or auto (the default)"; exit 2 ;;
  esac
}

venv_path() {
  local hash
  # The locks are the exact install set (the editable install of this checkout adds no deps), so
  # they alone name the venv: editing pyproject.toml's tool settings does not rebuild it.
  hash="$(cat "$ROOT/requirements.lock" "$ROOT/requirements-cuda.lock" | sha256sum | cut -c1-12)"
  printf '%s/venv-%s-%s' "$CACHE" "$(torch_flavour)" "$hash"
}

ensure_venv() {
  VENV="$(venv_path)"
  mkdir -p "$CACHE"
  if [[ ! -f "$VENV/.complete" ]]; then
    # flock: two sessions racing on a cold cache build the venv once.
    exec 9>"$VENV.lock"
    flock 9
    if [[ ! -f "$VENV/.complete" ]]; then
      log "creating $VENV ($(torch_flavour) torch; first run for these locks; takes minutes)"
      rm -rf "$VENV"
      "$PYTHON" -m venv "$VENV"
      "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements.lock"
      if [[ "$(torch_flavour)" == cuda ]]; then
        "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-cuda.lock"
      fi
      touch "$VENV/.complete"
    fi
    flock -u 9
    exec 9>&-
  fi
  # Every run: CI clones into a fresh folder, and the editable install must point at this one.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  export PATH="$VENV/bin:$PATH"
  export VIRTUAL_ENV="$VENV"
  # Several checkouts share one venv and each re-points the editable install; PYTHONPATH makes
  # this checkout's code win regardless of which one ran last.
  export PYTHONPATH="$ROOT/shared:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

ensure_native() {
  python -m infra.kafka ensure >&2
  python -m infra.s3 ensure >&2
}

setup() {
  ensure_venv
  ensure_native
}

# Everything runs from inside main(): bash has parsed all of it before the first command,
# so editing this file while it runs (git pull) cannot derail it.
main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  cd "$ROOT"
  case "$cmd" in
    setup)
      setup
      log "ready: venv $VENV"
      ;;
    test)
      setup
      # Both always run, so a lint error never hides a test result; either failing fails CI.
      local lint_rc=0 test_rc=0
      log "ruff check, ruff format --check, mypy shared/"
      ruff check . || lint_rc=$?
      ruff format --check . || lint_rc=$?
      mypy shared/ || lint_rc=$?
      log "pytest"
      # the slowest 25 tests close the report: where CI time goes, run by run
      python -m pytest -q -p no:cacheprovider --durations=25 "$@" || test_rc=$?
      log "ruff rc=$lint_rc pytest rc=$test_rc"
      [[ $lint_rc -eq 0 && $test_rc -eq 0 ]]
      ;;
    demo)
      setup
      maas stack up
      python -m infra.smoke
      maas demo "$@"
      log "the stack is still up (maas stack status); stop it with: bash infra/dev.sh shell -c 'maas stack down'"
      ;;
    shell)
      setup
      if [[ $# -gt 0 ]]; then
        exec bash "$@"
      fi
      log "venv $VENV active; try: maas --help"
      exec bash -i
      ;;
    help|-h|--help)
      sed -n '2,10p' "$0"
      ;;
    *)
      log "unknown command: $cmd (use setup | test | demo | shell)"
      exit 2
      ;;
  esac
}

main "$@"
exit $?
