# shellcheck shell=bash
# Sourced by scripts/atomicfs and scripts/test: installs whatever is missing, once.
#   bootstrap [test]   -> system packages, .venv with the package (and test extras)
# Idempotent and quick when everything is there (a stamp records what was installed).

ATOMICFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATOMICFS_VENV:-$ATOMICFS_ROOT/.venv}"

_say() { printf 'atomicfs setup: %s\n' "$*" >&2; }

_missing_debs() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    printf '%s\n' "${missing[@]}"
}

_apt_install() {
    local missing
    mapfile -t missing < <(_missing_debs "$@" | sed '/^$/d')
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        _say "missing system packages: ${missing[*]} (and no apt-get to install them)"; return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        _say "missing system packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
        return 1
    fi
    _say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        >"${TMPDIR:-/tmp}/atomicfs-apt.log" 2>&1 \
        || { _say "apt-get failed; see ${TMPDIR:-/tmp}/atomicfs-apt.log"; tail -n 5 "${TMPDIR:-/tmp}/atomicfs-apt.log" >&2; return 1; }
}

_python() {
    local py
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 \
            && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    _say "Python 3.11 or newer is needed"; return 1
}

bootstrap() {
    local extra="${1:-}" debs=(fuse3 libfuse3-dev pkg-config gcc)
    if [ "$extra" = test ]; then
        # tools the test suite drives through the mount
        debs+=(attr acl rsync sqlite3 git xfsprogs e2fsprogs util-linux mount strace tar sed diffutils
               systemd passwd quota btrfs-progs logrotate vim-tiny make)
    fi
    if command -v dpkg-query >/dev/null 2>&1; then
        _apt_install "${debs[@]}" || return 1
    fi
    local py want stamp
    py="$(_python)" || return 1
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            _apt_install python3-venv || return 1
            rm -rf "$VENV"; "$py" -m venv "$VENV" || return 1
        fi
    fi
    # A test install also serves plain runs; a plain install does not serve tests.
    want="$(sha256sum <"$ATOMICFS_ROOT/pyproject.toml" | cut -c1-16)"
    stamp="$VENV/.atomicfs-installed"
    if ! grep -qx -- "$want-test" "$stamp" 2>/dev/null \
        && { [ "$extra" = test ] || ! grep -qx -- "$want-run" "$stamp" 2>/dev/null; }; then
        local spec="$ATOMICFS_ROOT"
        [ "$extra" = test ] && spec="$ATOMICFS_ROOT[test]"
        _say "installing the package into $VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" \
            >"${TMPDIR:-/tmp}/atomicfs-pip.log" 2>&1 \
            || { _say "pip install failed; see ${TMPDIR:-/tmp}/atomicfs-pip.log"; tail -n 5 "${TMPDIR:-/tmp}/atomicfs-pip.log" >&2; return 1; }
        echo "$want-${extra:-run}" >"$stamp"
    fi
    _launcher
}

# The first run (as root) puts the atomicfs launcher in /usr/local/bin, where
# mount(8) -> mount.fuse3 -> /bin/sh finds it with their empty PATH. A working
# launcher of another checkout is kept (ATOMICFS_VENV selects one per call).
_launcher() {
    [ "$(id -u)" -eq 0 ] && [ -d /usr/local/bin ] || return 0
    local said venv
    if [ -e /usr/local/bin/atomicfs ]; then  # quick check, without starting Python
        venv="$(sed -n "s/^default=//p" /usr/local/bin/atomicfs 2>/dev/null | head -n 1)"
        venv="${venv#\'}"; venv="${venv%\'}"
        [ -n "$venv" ] && [ -x "$venv/bin/atomicfs" ] && return 0
    fi
    if said="$("$VENV/bin/atomicfs" install --if-missing 2>&1)"; then
        [ -z "$said" ] || _say "$said"
    else
        _say "launcher not installed: $said"
    fi
}
