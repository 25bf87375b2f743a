# Shared by the scripts: install what is missing, and build in one place that survives clones.
# shellcheck shell=bash

# One target directory outside the clone, so RocksDB (about 15 minutes on 2 cores) is
# compiled once per machine, and one profile (release) for tests, demo and benchmarks.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/griddle/target}"
mkdir -p "$CARGO_TARGET_DIR"

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_pkg() { # need_pkg PACKAGE...: install the Debian packages that are not installed yet
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    apt_install "${missing[@]}"
  fi
}

ensure_build_deps() {
  command -v cargo >/dev/null || { echo "cargo is missing: install Rust (rustup) first" >&2; exit 1; }
  need_pkg libclang-dev clang
}

# Headless Chromium (Debian's) and Node.js for the browser test, and its npm packages
# (playwright-core, pinned in web/e2e/package-lock.json).
ensure_browser_deps() {
  command -v node >/dev/null && command -v npm >/dev/null || need_pkg nodejs npm
  [ -x /usr/bin/chromium ] || need_pkg chromium
  (cd web/e2e && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
}

griddle_bin() { echo "$CARGO_TARGET_DIR/release/griddle"; }
