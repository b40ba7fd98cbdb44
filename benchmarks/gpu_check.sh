#!/usr/bin/env bash
# The check to run first on a GPU machine (docs/benchmarks.md, "On a GPU machine"): the CUDA
# tests, the coarse stage's learning benchmark trained on the GPU for a time budget, then
# reconstruction speed on CUDA (the test-time refinement included).
# A machine whose Python lacks wildface's pure-Python dependencies installs them from .whl/
# (`make gpu-wheels`). Logs and figures go to $OUT (default /tmp/gpu-check).
#
# Environment: PYTHON (python3), DEVICE (cuda), LEARN_SECONDS (training budget, 120),
# LEARN_ARGS (the benchmark's other arguments, below), TEST_SECONDS (limit of the tests, 150).
# The whole run takes about 2 x LEARN_SECONDS (training, then the probe) + 5 min (estimated:
# never run on a GPU yet).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi || true; "$PYTHON" -c "import torch; cuda = torch.cuda.is_available()
print('torch', torch.__version__, 'cuda', cuda, torch.cuda.get_device_name() if cuda else '')"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# 1. The CUDA tests: parity with the CPU, mixed precision, the trainer's resume, the
#    benchmark end to end (CUDA where present).
timeout "${TEST_SECONDS:-150}" "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py tests/test_flame.py tests/test_learning_benchmark.py \
    tests/test_trainer.py::test_mixed_precision_run_on_cuda_resumes_with_its_grad_scaler \
    2>&1 | tee "$OUT/tests.log"
tests=$?

# 2. Learning: the demo head, a batch of 32 at 128 px, mixed precision, cosine decay, trained
#    for LEARN_SECONDS; then the same encoder and steps trained on the true shape codes (the
#    supervised probe: can it read identity at all?); then the step time of the demo and
#    paper configs on this device. The loss optimum is skipped: it needs no GPU and is
#    recorded in docs/training.md.
LEARN_ARGS=${LEARN_ARGS:---identities 1040 --images-per-identity 2 --held-out 40
    --set train.identities_per_batch=16 --set train.amp=true --set train.pretrain_steps=1000
    --set train.lr_schedule=cosine --set data.num_workers=4 --optimum-steps 0 --probe}
# shellcheck disable=SC2086  # LEARN_ARGS is a list of arguments
"$PYTHON" benchmarks/learning.py --device "$DEVICE" --threads 8 \
    --train-seconds "${LEARN_SECONDS:-120}" $LEARN_ARGS --json "$OUT/learning.json" \
    2>&1 | tee "$OUT/learning.log"
learning=$?

# 3. Reconstruction speed on DEVICE: ms per face from a crop, and the refinement's cost per
#    1000 steps (keypoints only / with the photometric phase), demo and paper models.
timeout 180 "$PYTHON" benchmarks/inference.py --devices "$DEVICE" --cases crop refine \
    --batch 1 32 --repeats 3 2>&1 | tee "$OUT/inference.log"
inference=$?
echo "gpu_check: tests rc $tests, learning rc $learning, inference rc $inference"
exit $((tests || learning || inference))
