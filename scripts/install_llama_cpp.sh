#!/usr/bin/env bash
# llama.cpp for stage export_gguf and `python -m tokalign.serve`: llama-cpp-python (its runtime, quantizer and
# OpenAI-compatible server, built from its source distribution) and the converter (convert_hf_to_gguf.py with its
# conversion/ and gguf-py/) of the very llama.cpp it was built from, so a GGUF is written and read by one version.
#
#   bash scripts/install_llama_cpp.sh                                 # CPU build: about 5 minutes on 2 cores
#   CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" bash scripts/install_llama_cpp.sh   # CUDA build on a GPU machine
#
# The converter goes to $TOKALIGN_LLAMA_CPP (default ~/.cache/tokalign/llama.cpp), where tokalign looks for it.
set -euo pipefail
VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${TOKALIGN_LLAMA_CPP:-$HOME/.cache/tokalign/llama.cpp}"
mkdir -p "$DEST/src"
SDIST="$DEST/src/llama_cpp_python-$VER.tar.gz"
[ -f "$SDIST" ] || python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$DEST/src"
# GGML_NATIVE=OFF: a portable AVX2 build. A native build on a CPU with AMX (Sapphire Rapids and later) compiles
# llama.cpp's AMX matmul, which crashes (SIGSEGV in ggml_backend_amx_mul_mat) on the demo model's quantized GGUFs.
ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF}"
STAMP="$DEST/build.txt"   # what the installed build was made with; another version or other flags rebuild it
if ! python3 -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null \
   || [ "$(cat "$STAMP" 2>/dev/null)" != "$VER $ARGS" ]; then
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    python3 -m pip install -q --force-reinstall --no-deps "$SDIST"
  python3 -m pip install -q "llama-cpp-python[server]==$VER"   # its and its server's dependencies; no rebuild
  echo "$VER $ARGS" > "$STAMP"
fi
V="llama_cpp_python-$VER/vendor/llama.cpp"
tar xzf "$SDIST" -C "$DEST" --strip-components=3 "$V/convert_hf_to_gguf.py" "$V/conversion" "$V/gguf-py"
echo "llama-cpp-python $VER; converter: $DEST/convert_hf_to_gguf.py"
