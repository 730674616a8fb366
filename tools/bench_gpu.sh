#!/usr/bin/env bash
# The GPU checks and figures of docs/performance.md, in one script for a one-GPU machine:
#   bash tools/bench_gpu.sh OUT_DIR
# 1. tools/bench_step.py: ResNet-34, 1000 classes, 4 aux heads, batch 256 + 256, 224 px:
#    framework step vs bare PyTorch loop in bf16 and fp32, one loopback peer with top-10
#    messages, and one pack + unpack of such a message;
# 2. the digits job on the GPU with 4 clients sharing it (bf16 by backend.precision=auto), and
#    in fp16;
# 3. 2 clients x 2 ranks on the one GPU with backend.intra=torch (gloo fallback, announced);
# 4. the precision tests under mpirun on the GPU.
set -uo pipefail
OUT=${1:-bench-gpu}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
run() { echo "== $*"; "$@"; echo "== exit code $?"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
STEP="python3 tools/bench_step.py --arch resnet34 --batch 256 --image-size 224 --classes 1000 --aux-heads 4 --device cuda --steps 10 --repeats 3"
run $STEP --precision bf16 --json "$OUT/step_bf16.json"
run $STEP --precision fp32 --json "$OUT/step_fp32.json"
run $STEP --precision bf16 --peers 1 --top-k 10 --codec --json "$OUT/step_bf16_peer.json"
DIG="python3 -m mhd_hpc.train jobs/digits.yaml data.root=/tmp/bench-gpu-data"
run timeout 300 mpirun --oversubscribe -np 4 $DIG run.out_dir=/tmp/bench-gpu/digits backend.device=cuda
run timeout 200 mpirun --oversubscribe -np 4 $DIG run.out_dir=/tmp/bench-gpu/fp16 backend.device=cuda backend.precision=fp16 run.steps=300
run timeout 200 mpirun --oversubscribe -np 4 $DIG run.out_dir=/tmp/bench-gpu/shared clients.count=2 clients.ranks_per_client=2 backend.intra=torch backend.device=cuda run.steps=200
run python3 -m mhd_hpc.report /tmp/bench-gpu/digits --json
run timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_codec.py tests/test_devices.py tests/test_precision_mpi.py tests/test_exchange_mpi.py
