# Sourced by scripts/run and scripts/test: make .venv and install selfix (+ test extras) into it, cached by the
# hash of setup.cfg so a second run costs nothing.
ensure_venv() {
  local extras="${1:-}"
  local stamp_want
  stamp_want="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16)${extras}"
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  local stamp_have
  stamp_have="$(cat .venv/.selfix-stamp 2>/dev/null || true)"
  # A venv with the test extras also serves scripts/run (same hash, more packages).
  if [ "$stamp_have" != "$stamp_want" ] && [ "${stamp_have}" != "${stamp_want}[test]" ]; then
    echo "selfix: installing selfix${extras} and its packages into .venv (first run, or setup.cfg changed)" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".${extras}"
    echo "$stamp_want" > .venv/.selfix-stamp
  fi
}
