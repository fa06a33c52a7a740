#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the engine behind `kfoundry serve --engine llama.cpp`).
#
# Why this route: Debian 12 ships no llama.cpp package and nothing else is reachable in CI but PyPI, Debian and
# npm. The llama-cpp-python sdist that `make setup` already installs (the `test` extra pins it) carries the
# whole llama.cpp source tree in vendor/llama.cpp, server included, so we build the server from that very
# tree with cmake: the same llama.cpp version the GGUF parity tests use, no new download source, no git.
#
#   scripts/build_llama_server.sh [DEST]        (DEST default: .venv/bin; the binary is DEST/llama-server)
#
# Environment: QUICK=1 (the server's own code at -O1 and the unused multimodal library at -O0: a quicker build
# on a loaded machine; the model's arithmetic, ggml and llama, stays -O3 either way), PY (python with pip; default .venv/bin/python), LLAMA_CPP_PYTHON_VERSION (default: the pin in
# pyproject.toml), JOBS (default: nproc), GGML_NATIVE (ON: tuned for this CPU, as a server you build where it
# runs; OFF: portable x86-64), BUILD_DIR (default: build/llama-server, kept so a rebuild is incremental).
# Needs cmake >= 3.14, a C++17 compiler and make or ninja (Debian: cmake g++). Offline it still works when
# pip's cache holds the sdist (make setup leaves it there).
# Build time, 2 shared cores, GGML_NATIVE=ON, llama-server target only: see docs/serve.md ("Which engine where").
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.venv/bin}
PY=${PY:-.venv/bin/python}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
GGML_NATIVE=${GGML_NATIVE:-ON}
BUILD_DIR=${BUILD_DIR:-build/llama-server}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)}
[ -n "$VERSION" ] || { echo "build_llama_server: no llama-cpp-python pin found in pyproject.toml" >&2; exit 1; }

if [ -x "$DEST/llama-server" ] && [ -f "$DEST/.llama-server-version" ] && [ "$(cat "$DEST/.llama-server-version")" = "$VERSION" ]; then
  echo "build_llama_server: $DEST/llama-server ($VERSION) is already built"; exit 0
fi

# A built server is kept in the user's cache, keyed by the llama.cpp version, the build options and this script,
# the way pip keeps built wheels: a fresh clone or a new venv on the same machine copies it instead of compiling.
CACHE_DIR=${KFOUNDRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kfoundry}
KEY="$VERSION-native${GGML_NATIVE}-quick${QUICK:-0}-$(sha256sum "$0" | cut -c1-12)"
CACHED="$CACHE_DIR/llama-server-$KEY"
if [ -x "$CACHED" ]; then
  mkdir -p "$DEST"
  install -m 755 "$CACHED" "$DEST/llama-server"
  echo "$VERSION" >"$DEST/.llama-server-version"
  echo "build_llama_server: $DEST/llama-server copied from $CACHED"; exit 0
fi

start=$(date +%s)
SRC="$BUILD_DIR/src"
if [ ! -f "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/CMakeLists.txt" ]; then
  mkdir -p "$SRC"
  # --no-binary: we want the source tree, not a wheel; pip serves it from its cache when it has it.
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$SRC" "llama-cpp-python==$VERSION"
  tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
LLAMA="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
# One patch, for the streams kfoundry reads: llama-server holds back a token whose text ends inside a UTF-8
# character and then streams only the token that completes it, so a client reading token ids ("return_tokens")
# would never see the held one (byte-level BPE splits Hangul and emoji that way all the time). With the patch, a
# stream that asked for token ids gets every token as it is sampled, with empty text; the text still arrives
# whole with the next token, and nothing changes for requests that did not ask for token ids.
"$PY" - "$LLAMA/tools/server/server-context.cpp" <<'PATCH'
import sys
path = sys.argv[1]
src = open(path, encoding="utf-8").read()
anchor = "        bool incomplete = validate_utf8(slot.generated_text) < slot.generated_text.size();\n"
patch = """        // kfoundry: a stream that asked for token ids gets every token as it is sampled
        if (incomplete && slot.task->params.stream && slot.task->params.return_tokens) {
            completion_token_output held = result;
            held.text_to_send = "";
            send_partial_response(slot, held, false);
        }
"""
if "kfoundry: a stream that asked for token ids" not in src:
    if src.count(anchor) != 1:
        sys.exit(f"build_llama_server: cannot apply the token-stream patch to {path} (llama.cpp changed?)")
    open(path, "w", encoding="utf-8").write(src.replace(anchor, anchor + patch))
PATCH
if [ "${QUICK:-0}" = 1 ]; then
  # A quicker build for a loaded machine: the code that runs the model (ggml, llama) keeps -O3; the helper
  # library (argument and chat parsing) and the multimodal library (linked by the server, unused for text
  # models) are built at -O0 as unity builds (their files share one huge JSON header), the server at -O1.
  add_opt() { grep -q "kfoundry QUICK" "$1" || printf '\n# kfoundry QUICK\n%s\n' "$2" >>"$1"; }
  add_opt "$LLAMA/tools/mtmd/CMakeLists.txt" "target_compile_options(mtmd PRIVATE -O0)
set_target_properties(mtmd PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE 26)
set_source_files_properties(mtmd-helper.cpp mtmd-helper-gen.cpp PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)"
  add_opt "$LLAMA/common/CMakeLists.txt" "target_compile_options(llama-common PRIVATE -O0)
set_target_properties(llama-common PROPERTIES UNITY_BUILD ON UNITY_BUILD_BATCH_SIZE 11)
set_source_files_properties(json.cpp PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)"
  add_opt "$LLAMA/tools/server/CMakeLists.txt" "target_compile_options(server-context PRIVATE -O1)"
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
# Only the server: no tests, examples or other tools. The web UI stays off (its prebuilt assets would be
# downloaded from the Hugging Face hub; kfoundry serves its own page anyway). Static libraries, so the binary
# does not depend on the build folder. No OpenSSL: it serves plain HTTP on loopback behind our front.
cmake -S "$LLAMA" -B "$BUILD_DIR/cmake" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE="$GGML_NATIVE" -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=0 >"$BUILD_DIR/cmake-configure.log" 2>&1 \
  || { tail -30 "$BUILD_DIR/cmake-configure.log" >&2; exit 1; }
cmake --build "$BUILD_DIR/cmake" --target llama-server -j "$JOBS" >"$BUILD_DIR/cmake-build.log" 2>&1 \
  || { tail -30 "$BUILD_DIR/cmake-build.log" >&2; exit 1; }
mkdir -p "$DEST"
install -m 755 "$BUILD_DIR/cmake/bin/llama-server" "$DEST/llama-server"
echo "$VERSION" >"$DEST/.llama-server-version"
mkdir -p "$CACHE_DIR" && install -m 755 "$BUILD_DIR/cmake/bin/llama-server" "$CACHED.tmp" && mv "$CACHED.tmp" "$CACHED"
echo "build_llama_server: $DEST/llama-server (llama-cpp-python $VERSION's llama.cpp, GGML_NATIVE=$GGML_NATIVE)" \
     "built in $(( $(date +%s) - start )) s with $JOBS jobs"
