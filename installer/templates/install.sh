#!/bin/sh
# cxrnode offline installer. Run from the unpacked bundle folder, as root for a system install:
#
#   ./install.sh [--prefix P] [--no-systemd] [--no-user] [--ae-title T] [--port N]
#                [--storage-dir D] [--destination NAME=AE@HOST:PORT] [--set section.key=value] ...
#
# It is the same as `cxrnode install --bundle <this folder>`; `./install.sh --help` lists every
# option. Nothing is downloaded: Python packages come from ./wheelhouse only (pip --no-index).
# Needs Python 3.11 or newer (set PYTHON=/path/to/python3 to choose one).
set -eu

# Everything below runs from this bundle's own folder, never from the working directory: a
# root shell in someone else's folder (`cd /home/x && sh /media/bundle/install.sh`) must not
# import their installer/ or venv.py. Hence the absolute bundle path, python -I for the probe,
# -P (no working directory on sys.path) and -s (no user site) for the installer, and no
# inherited PYTHON* variables but the wheel on PYTHONPATH.
HERE=$(CDPATH='' cd -P -- "$(dirname -- "$0")" && pwd -P)
unset PYTHONHOME PYTHONSTARTUP PYTHONINSPECT PYTHONUSERBASE PYTHONEXECUTABLE PYTHONPLATLIBDIR \
    PYTHONSAFEPATH PYTHONNOUSERSITE PYTHONWARNINGS PYTHONBREAKPOINT

find_python() {
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -I -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

PY=$(find_python) || {
    echo "install.sh: needs Python 3.11 or newer with the venv module (Debian/Ubuntu: apt install python3)." >&2
    echo "            Set PYTHON=/path/to/python3 to choose an interpreter." >&2
    exit 2
}

WHEEL=""
for f in "$HERE"/wheelhouse/cxrnode-*.whl; do
    [ -e "$f" ] && WHEEL="$f"
done
if [ -z "$WHEEL" ]; then
    echo "install.sh: no cxrnode wheel in $HERE/wheelhouse; is this an unpacked cxrnode bundle?" >&2
    exit 2
fi

# The installer itself runs from the project's wheel (pure Python, standard library only); it
# checks every file of the bundle against SHA256SUMS before using any of them.
case "$WHEEL" in
    *:*) echo "install.sh: the bundle path may not contain ':' ($HERE)" >&2; exit 2 ;;
    /*) ;;
    *) echo "install.sh: cannot resolve the bundle folder ($HERE)" >&2; exit 2 ;;
esac
PYTHONPATH="$WHEEL" exec "$PY" -P -s -m installer.install --bundle "$HERE" "$@"
