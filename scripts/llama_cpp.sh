#!/usr/bin/env bash
# llama-cpp-python for the GGUF export test, built from source in the background at the lowest CPU priority, so
# that the build overlaps the rest of `make test` (its set-up downloads, then the other tests).
#
#   scripts/llama_cpp.sh start VENV    begin the build unless it is installed or already running
#   scripts/llama_cpp.sh finish VENV   wait for it, then install the wheel into VENV
#
# Only the GGUF test needs it, on models of a few MB, so it is built unoptimized (-O0), without its multimodal
# library, and without llama.cpp's `common` library (argument parsing, chat templates, a JSON parser: nothing the
# Python binding loads; its CMakeLists forces it on, so the sdist's line is switched off before the build). On 2
# cores: 480 s as released, 247 s wall / 424 s CPU at -O0 without the multimodal library, 163 s / 204 s without
# `common` too; the 4 GGUF tests pass with each. `pip wheel` writes only its own folder, so it can run while pip
# installs the other requirements into VENV.
set -euo pipefail
cmd=${1:?start or finish} venv=${2:?venv folder}
dir=$venv/llama-build
stamp=$venv/.llama-cpp-installed

running() { [ -f "$dir/pid" ] && [ ! -f "$dir/rc" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }

case $cmd in
start)
  [ -f "$stamp" ] && exit 0
  running && exit 0
  rm -rf "$dir"
  mkdir -p "$dir/wheel" "$dir/sdist"
  (
    src=$dir/sdist/llama_cpp_python-0.3.36
    on='set(LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE)'
    {
      nice -n 19 "$venv/bin/python" -m pip download -q --no-deps --no-binary :all: -d "$dir/sdist" \
        llama-cpp-python==0.3.36 &&
        tar xzf "$src.tar.gz" -C "$dir/sdist" &&
        { grep -qF "$on" "$src/CMakeLists.txt" || { echo "the sdist no longer forces LLAMA_BUILD_COMMON on"; false; }; } &&
        sed -i "s/set(LLAMA_BUILD_COMMON ON /set(LLAMA_BUILD_COMMON OFF /" "$src/CMakeLists.txt" &&
        SKBUILD_CMAKE_BUILD_TYPE=Debug \
          CMAKE_ARGS="-DGGML_NATIVE=off -DLLAVA_BUILD=off -DCMAKE_C_FLAGS_DEBUG=-O0 -DCMAKE_CXX_FLAGS_DEBUG=-O0" \
          nice -n 19 "$venv/bin/python" -m pip wheel -q --no-deps -w "$dir/wheel" "$src"
    } > "$dir/log" 2>&1
    echo $? > "$dir/rc"
  ) > /dev/null 2>&1 &
  echo $! > "$dir/pid"
  ;;
finish)
  [ -f "$stamp" ] && exit 0
  [ -f "$dir/pid" ] || "$0" start "$venv"
  echo "waiting for the llama-cpp-python build ($dir/log)"
  while [ ! -f "$dir/rc" ]; do
    if ! running; then
      sleep 2
      [ -f "$dir/rc" ] && break
      rm -rf "$dir"
      echo "the llama-cpp-python build stopped without a result; run make test again" >&2
      exit 1
    fi
    sleep 5
  done
  if [ "$(cat "$dir/rc")" != 0 ]; then
    tail -40 "$dir/log" >&2
    echo "the llama-cpp-python build failed (log above)" >&2
    exit 1
  fi
  "$venv/bin/python" -m pip install -q "$dir"/wheel/llama_cpp_python-*.whl
  touch "$stamp"
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start|finish VENV" >&2
  exit 2
  ;;
esac
