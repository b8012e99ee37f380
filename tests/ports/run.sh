#!/usr/bin/env bash
# make test-ports: the native kernels built for other CPUs and runtimes, each checked against the scalar build.
#
# Every C file in src/gemmakit/quant is compiled with tests/ports/check_kernels.c for: x86 with OpenMP, x86 without
# it (team.c's pthread pool), the AVX2 path, and ARM64 with gcc and clang (NEON with dotprod and i8mm under
# `qemu-aarch64 -cpu max`, plain NEON under `-cpu cortex-a53`, the portable C). Each build must print exactly the
# scalar build's digests: the same bits for every block format; decode.c's whole step must agree with the scalar
# build's within 1e-5 and give the same bits with 1 and 3 workers. The cross tools come from Debian
# (gcc-aarch64-linux-gnu, qemu-user, clang, lld); run as root with apt-get, this installs what is missing, and
# elsewhere it skips what it cannot build with a line saying why. Exit status 1 if any build differs or fails.
set -uo pipefail
cd "$(dirname "$0")/../.."
SRC=(src/gemmakit/quant/*.c)
DRIVER=tests/ports/check_kernels.c
CFLAGS=(-O2 -std=c11 -ffp-contract=off -Isrc/gemmakit/quant)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMP_WAIT_POLICY=passive  # the driver asks for 3 workers: on 2 busy cores, spinning ones only slow it down
failed=0

have() { command -v "$1" >/dev/null 2>&1; }

install_missing() {  # Debian packages for the cross builds, when we may install them
    local want=()
    have aarch64-linux-gnu-gcc || want+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
    have qemu-aarch64 || want+=(qemu-user)
    have clang || want+=(clang)
    have ld.lld || want+=(lld)
    [ ${#want[@]} -eq 0 ] && return
    if [ "$(id -u)" = 0 ] && have apt-get; then
        echo "installing ${want[*]} (apt-get)"
        apt-get update -qq >/dev/null 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null 2>&1 ||
            echo "could not install all of: ${want[*]}"
    else
        echo "missing ${want[*]}: install them (Debian: apt-get install ${want[*]}) to run the ARM64 builds"
    fi
}

# build NAME COMPILER FLAGS...: compile the kernels and the driver; a failed build fails the test
build() {
    local name=$1 cc=$2
    shift 2
    if ! "$cc" "${CFLAGS[@]}" "$@" "${SRC[@]}" "$DRIVER" -lm -o "$OUT/$name" 2>"$OUT/$name.log"; then
        echo "FAIL $name: does not build ($cc $*)"
        sed -n 1,20p "$OUT/$name.log"
        failed=1
        return 1
    fi
}

# check NAME [RUNNER...]: run a build and compare its digests with the scalar build's
check() {
    local name=$1
    shift
    if ! "$@" "$OUT/$name" --compare "$OUT/decode.bin" >"$OUT/$name.txt" 2>"$OUT/$name.err"; then
        echo "FAIL $name: the driver failed"
        sed -n 1,20p "$OUT/$name.txt" "$OUT/$name.err"
        failed=1
    elif ! diff -u "$OUT/ref.txt" "$OUT/$name.txt" >"$OUT/$name.diff"; then
        echo "FAIL $name: differs from the scalar build"
        sed -n 1,20p "$OUT/$name.diff"
        failed=1
    else
        echo "ok   $name ($(cat "$OUT/$name.err"), $(wc -l <"$OUT/$name.txt") kernel checks equal the scalar build's, decode step agrees)"
    fi
}

install_missing
CC=${CC:-$(command -v gcc || command -v cc)}
host=$(uname -m)
# the reference: portable C, no SIMD, no OpenMP
ref_arch=()
[ "$host" = x86_64 ] && ref_arch=(-march=x86-64)
build ref "$CC" "${ref_arch[@]}" -DGEMMAKIT_SCALAR -pthread || exit 1
if ! "$OUT/ref" --write "$OUT/decode.bin" >"$OUT/ref.txt" 2>/dev/null; then
    echo "FAIL the scalar build's driver failed:"
    cat "$OUT/ref.txt"
    exit 1
fi
echo "ok   ref (the scalar build: $(wc -l <"$OUT/ref.txt") kernel checks)"

build native-openmp "$CC" -march=native -fopenmp && check native-openmp
build native-pthreads "$CC" -march=native -pthread && check native-pthreads
if [ "$host" = x86_64 ] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
    build avx2 "$CC" -march=native -mno-avx512f -fopenmp && check avx2
fi
if have clang; then
    build clang-native "$(command -v clang)" -march=native -pthread && check clang-native
fi

if [ "$host" != aarch64 ] && ! { have aarch64-linux-gnu-gcc && have qemu-aarch64; }; then
    echo "SKIP ARM64: needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)"
else
    run=()
    [ "$host" != aarch64 ] && run=(qemu-aarch64)
    gcc_a64=aarch64-linux-gnu-gcc
    have $gcc_a64 || gcc_a64=$CC
    # dotprod + i8mm (Apple M2+, Graviton 3+, Snapdragon X), with OpenMP
    build a64-dotprod-i8mm "$gcc_a64" -march=armv8.6-a+dotprod+i8mm -fopenmp -static &&
        check a64-dotprod-i8mm "${run[@]}" ${run:+-cpu max}
    # plain NEON (ARMv8.0, e.g. Cortex-A53/A72, Graviton 1), the pthread team
    build a64-neon "$gcc_a64" -march=armv8-a -pthread -static &&
        check a64-neon "${run[@]}" ${run:+-cpu cortex-a53}
    build a64-scalar "$gcc_a64" -march=armv8-a -DGEMMAKIT_SCALAR -pthread -static &&
        check a64-scalar "${run[@]}" ${run:+-cpu cortex-a53}
    # the shared library as kernels.py builds it, for a dotprod core
    if ! $gcc_a64 -O3 -shared -fPIC -std=c11 -ffp-contract=off -mcpu=neoverse-n1 -fopenmp "${SRC[@]}" -lm \
        -o "$OUT/libkernels.so" 2>"$OUT/so.log"; then
        echo "FAIL a64-shared: the library does not build"
        sed -n 1,20p "$OUT/so.log"
        failed=1
    else
        echo "ok   a64-shared (kernels.py's build, -mcpu=neoverse-n1 -fopenmp)"
    fi
    if have clang && [ -d /usr/aarch64-linux-gnu ]; then
        ld=()
        have ld.lld && ld=(-fuse-ld=lld)
        build a64-clang "$(command -v clang)" --target=aarch64-linux-gnu "${ld[@]}" -march=armv8.2-a+dotprod \
            -pthread -static && check a64-clang "${run[@]}" ${run:+-cpu max}
    else
        echo "SKIP ARM64 clang: needs clang and the aarch64 sysroot (Debian: clang lld libc6-dev-arm64-cross)"
    fi
fi

[ $failed = 0 ] && echo "test-ports: all builds equal the scalar build" || echo "test-ports: FAILED"
exit $failed
