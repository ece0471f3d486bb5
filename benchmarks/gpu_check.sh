#!/usr/bin/env bash
# The GPU check: what only a machine with NVIDIA GPUs can test, in under five minutes.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; PYTHON=/path/to/python to pick one
#
# Checks, one summary line each ("gpu_check: <name>: PASS|FAIL|SKIP (<detail>)"):
#   cuda-tests   the tests that skip without CUDA (prefetch streams, NCCL transport, precision)
#   prefetch     PrefetchQueue onto the GPU: its copy stream, pinned host memory, batches in order
#   nccl-p2p     NCCL send/recv between two processes on two GPUs (skipped below 2 GPUs:
#                NCCL refuses two ranks on one GPU)
#   nvml         pynvml sampling through synthpipe.benchmark.monitor.Monitor
#   train-<p>    `synthpipe train` in one process on cuda:0, precision p = fp32, bf16, fp16
#   bench        a short `synthpipe bench` on CUDA (2 ranks: skipped below 2 GPUs)
# It installs nothing: it uses the project's install (pip install -e ".[dev]").
# Exit status: 0 when no check failed (also when there is no GPU: it says so and checks
# nothing), 1 when one failed. GPU_CHECK_TIMEOUT (seconds, default 240) bounds each check.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
LIMIT=${GPU_CHECK_TIMEOUT:-240}
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
FAILED=0

say() { printf 'gpu_check: %s\n' "$*"; }
summary() { say "$1: $2 ($3)"; [ "$2" = FAIL ] && FAILED=1; return 0; }

if ! "$PYTHON" -c "import torch, synthpipe" >/dev/null 2>&1; then
    say "cannot import torch and synthpipe with $PYTHON; install the project first (pip install -e '.[dev]')"
    exit 1
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
GPUS=${GPUS:-0}
if [ "$GPUS" -lt 1 ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        why="nvidia-smi is present but torch sees no CUDA device (a CPU-only torch build, or CUDA_VISIBLE_DEVICES)"
    else
        why="no nvidia-smi and torch sees no CUDA device"
    fi
    say "no NVIDIA GPU on this machine ($why); nothing to check"
    exit 0
fi
NAMES=$("$PYTHON" -c "import torch; print(', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))")
say "$GPUS GPU(s): $NAMES; torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
say "logs in $LOG_DIR"

# run NAME COMMAND...: the command's output goes to LOG_DIR/NAME.log; returns its status
run() {
    local name=$1
    shift
    timeout "$LIMIT" "$@" >"$LOG_DIR/$name.log" 2>&1
}

# -- the CUDA-only tests
if run cuda-tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_prefetch.py tests/test_worker.py \
        tests/test_precision.py -k "cuda or nccl or gpu"; then
    summary cuda-tests PASS "$(tail -n 1 "$LOG_DIR/cuda-tests.log")"
else
    summary cuda-tests FAIL "$(tail -n 1 "$LOG_DIR/cuda-tests.log"); see $LOG_DIR/cuda-tests.log"
fi

# -- the prefetch queue with its copy stream and pinned memory
if run prefetch "$PYTHON" - <<'EOF'
import time
import torch
from synthpipe.engine.prefetch import PrefetchQueue

device = torch.device("cuda", 0)
batches = [(torch.full((256, 1024), float(i)), torch.full((256,), i)) for i in range(64)]
queue = PrefetchQueue(batches, device, depth=3)
assert queue.stream is not None, "no copy stream"
assert queue.pin_memory, "host memory not pinned"
start = time.perf_counter()
seen = [int(y[0]) for x, y in queue if x.is_cuda and y.is_cuda and float(x[0, 0]) == float(y[0])]
torch.cuda.synchronize()
elapsed = time.perf_counter() - start
assert seen == list(range(64)), f"batches out of order or not on the GPU: {seen[:8]}..."
mb = sum(x.numel() * x.element_size() for x, _ in batches) / 2**20
print(f"64 batches in order on {device}, {mb / elapsed:.0f} MB/s host to device")
EOF
then
    summary prefetch PASS "$(tail -n 1 "$LOG_DIR/prefetch.log")"
else
    summary prefetch FAIL "$(tail -n 1 "$LOG_DIR/prefetch.log"); see $LOG_DIR/prefetch.log"
fi

# -- NCCL point-to-point between two processes
if [ "$GPUS" -lt 2 ]; then
    summary nccl-p2p SKIP "1 GPU: NCCL refuses two ranks on one GPU, so point-to-point needs 2+ GPUs"
else
    cat >"$LOG_DIR/nccl_p2p.py" <<'EOF'
import os
import torch
import torch.distributed as dist

rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl")
x = torch.full((1 << 20,), float(rank + 1), device="cuda")
if rank == 0:
    dist.send(x, 1)
    dist.recv(x, 1)
    assert float(x[0]) == 4.0, float(x[0])
    print("rank 0 sent 4 MB to rank 1 and got it back doubled")
else:
    dist.recv(x, 0)
    dist.send(x * 4, 0)
dist.destroy_process_group()
EOF
    if run nccl-p2p "$PYTHON" -m torch.distributed.run --nproc-per-node 2 "$LOG_DIR/nccl_p2p.py"; then
        summary nccl-p2p PASS "$(grep -m 1 'rank 0 sent' "$LOG_DIR/nccl-p2p.log")"
    else
        summary nccl-p2p FAIL "see $LOG_DIR/nccl-p2p.log"
    fi
fi

# -- pynvml sampling
if run nvml "$PYTHON" - <<'EOF'
import time
from synthpipe.benchmark.monitor import Monitor

with Monitor(interval=0.05) as monitor:
    time.sleep(0.5)
assert monitor.gpu_available, "pynvml found no GPU"
gpus = monitor._sample().get("gpus")
assert gpus and all(g["mem_mb"] == g["mem_mb"] for g in gpus), f"no GPU reading: {gpus}"
print(f"pynvml sampled {len(gpus)} GPU(s): " + ", ".join(f"util {g['util']:.0f}%, {g['mem_mb']:.0f} MB used"
                                                      for g in gpus[:2]))
EOF
then
    summary nvml PASS "$(tail -n 1 "$LOG_DIR/nvml.log")"
else
    summary nvml FAIL "$(tail -n 1 "$LOG_DIR/nvml.log"); see $LOG_DIR/nvml.log"
fi

# -- one process training 3 stages on cuda:0 in each precision (runs on one GPU too)
for precision in fp32 bf16 fp16; do
    if run "train-$precision" "$PYTHON" -m synthpipe.launch.train --device cuda --stages 3 --epochs 2 \
            --precision "$precision" --lr-schedule cosine --clip-grad-norm 1 --no-compare --no-progress; then
        summary "train-$precision" PASS "$(grep -m 1 'test accuracy' "$LOG_DIR/train-$precision.log")"
    else
        summary "train-$precision" FAIL "$(tail -n 1 "$LOG_DIR/train-$precision.log"); see $LOG_DIR/train-$precision.log"
    fi
done

# -- a short synthpipe bench on CUDA (2 ranks, one per GPU)
if [ "$GPUS" -lt 2 ]; then
    summary bench SKIP "1 GPU: the bench runs 2+ NCCL ranks, one per GPU, and NCCL refuses two on one GPU"
elif run bench "$PYTHON" -m synthpipe.launch.cli bench --quick --device cuda --ranks 2 --no-converge \
        --no-plots --repeats 1 --output "$LOG_DIR/bench"; then
    summary bench PASS "2 ranks; $(grep -m 1 -i 'samples/s' "$LOG_DIR/bench.log"); results in $LOG_DIR/bench"
else
    summary bench FAIL "$(tail -n 1 "$LOG_DIR/bench.log"); see $LOG_DIR/bench.log"
fi

if [ "$FAILED" -ne 0 ]; then
    say "some checks FAILED"
    exit 1
fi
say "every check passed or was skipped"
exit 0
