#!/usr/bin/env bash
# The GPU figures of benchmarks/gpu_step.py in two prepared device calls, for a session that has a
# GPU machine (the device tool). Its image holds torch but not diffusers or cattrs: they travel as
# wheels, and the project goes in with --no-deps beside them.
#
#   here, once:        bash benchmarks/gpu_session.sh wheels      (.whl/, ignored by git)
#   device call 1:     bash benchmarks/gpu_session.sh eager       carry [".whl"], timeout_s 600
#   device call 2:     bash benchmarks/gpu_session.sh compiled    carry [".whl"], timeout_s 600
#   device call 3:     bash benchmarks/gpu_session.sh loads       carry [".whl"], timeout_s 600
#
# eager: FLUX.1-dev and FLUX.2 klein-4b / klein-9b eager, with fp8 rows and a kernel profile of each;
# compiled: FLUX.1-dev and klein-4b compiled, and a 28-step FLUX.1-dev generate; loads: the GPU's
# peak while loading into fp8 (fp8_load.py: klein-4b; text_fp8_load.py: T5-XXL, where the image has
# transformers), each writing its checkpoint first (7.8 and 9.5 GB). Each call writes its
# table to $OUT (or ./gpu_out). Extra arguments go to gpu_step.py (`eager --tiny --device cpu` checks
# this script without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 cattrs==26.2.1 importlib_metadata==8.7.0)

if [[ "${1:-}" == wheels ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    exit 0
fi

part=${1:?"which part: wheels, eager, compiled or loads"}
shift
out=${OUT:-gpu_out}
mkdir -p "$out"
site=/tmp/diffcore-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target "$site" . plugins/flux1 plugins/flux2 \
    plugins/sdxl plugins/sd3
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

case "$part" in
    eager)
        python3 benchmarks/gpu_step.py --cases flux1-dev flux2-klein-4b flux2-klein-9b --iters 20 --fp8 --profile "$@" \
            2>&1 | tee "$out/gpu_step_eager.md" ;;
    compiled)
        python3 benchmarks/gpu_step.py --cases flux1-dev flux2-klein-4b --iters 20 --compile --generate "$@" \
            2>&1 | tee "$out/gpu_step_compiled.md" ;;
    loads)
        python3 benchmarks/fp8_load.py /tmp --device cuda 2>&1 | tee "$out/fp8_load_cuda.md"
        if python3 -c "import transformers" 2>/dev/null; then
            python3 benchmarks/text_fp8_load.py /tmp --device cuda 2>&1 | tee "$out/text_fp8_load_cuda.md"
        else
            echo "no transformers on this machine: text_fp8_load.py skipped" | tee "$out/text_fp8_load_cuda.md"
        fi ;;
    *)
        echo "unknown part $part: wheels, eager, compiled or loads" >&2
        exit 2 ;;
esac
