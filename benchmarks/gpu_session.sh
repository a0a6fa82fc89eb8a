#!/usr/bin/env bash
# What a session with a GPU runs, in one call: `mauctl doctor --smoke`, then the bench matrix
# (ResNet-50, 224 px, 2,000 generated JPEGs; pil vs tensor; fp32 / bf16 / bf16 + compile).
#
#     OUT=/tmp/gpu-out bash benchmarks/gpu_session.sh      # $OUT gets doctor.txt, doctor.json, bench.md, log.txt
#
# On a machine whose Python has torch but lacks mauctl's other dependencies (pydantic, pydantic-settings,
# typer, rich, ...), put their wheels in .whl/ (`pip download --no-deps --python-version 3.12
# --only-binary=:all: -d .whl NAME==VERSION ...`; .whl/ is git-ignored): they are installed into /tmp/site first.
set -u
OUT=${OUT:-/tmp/gpu-out}; W=${W:-/tmp/mauctl-session}; PY=${PY:-python3}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "${NO_WHL:-}" != 1 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
exec > >(tee "$OUT/log.txt") 2>&1
T0=$SECONDS
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
echo "== data"
[ -d "$W/bench-data/train" ] || $PY benchmarks/bench_matrix.py --make-jpegs "$W/bench-data" "${JPEGS:-2000}"
echo "== mauctl doctor --smoke ($((SECONDS - T0))s)"
rm -rf "$W/doctor"
timeout -k 10 "${DOCTOR_S:-280}" $PY -m mauctl doctor "$W/bench-data" --smoke --work "$W/doctor" --json \
  > "$OUT/doctor.json" 2> >(tee "$OUT/doctor.txt" >&2)
echo "== doctor exit $? after $((SECONDS - T0))s"
echo "== bench matrix ($((SECONDS - T0))s)"
timeout -k 10 "${BENCH_S:-200}" $PY benchmarks/bench_matrix.py --data "$W/bench-data" --preset v2-b256 \
  --arch "${ARCH:-resnet50}" --image-size "${SIZE:-224}" --steps "${STEPS:-10}" --out "$OUT/bench.md"
echo "== bench exit $? after $((SECONDS - T0))s"
echo "== the tests' CUDA cases ($((SECONDS - T0))s)"
timeout -k 10 "${TESTS_S:-80}" $PY -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/test_device_step.py tests/test_gpu_decode.py \
  tests/test_batch_augment.py 2>&1 | tail -n 25
