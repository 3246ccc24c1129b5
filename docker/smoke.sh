#!/usr/bin/env bash
# Smoke test of the Docker setup: build the image, start the service with compose, wait until
# it is healthy, classify a real image, check that a bad upload gets a 4xx, tear down.
# Exit status 0 = pass. Needs docker with compose (v2 `docker compose` or v1.28+
# `docker-compose`) and curl on the host; nothing else (images are made inside the container).
#
#   docker/smoke.sh                                          # the compose default bundle
#   PATHGUARD_BUNDLE_DIR=runs/digits/detector/bundle docker/smoke.sh
#   TORCH_INDEX_URL= docker/smoke.sh                         # build with the default index
#
# Settings (environment): SMOKE_BUILD=0 skips the build, SMOKE_PORT (default 18000) is the host
# port, SMOKE_TIMEOUT (default 240) bounds the wait for healthy in seconds, SMOKE_IMAGE sends
# that file instead of a test image, SMOKE_DATA_DIR (default ../shared/data) is where
# mnist.npz / cifar10.npz are looked for and SMOKE_INDEX (default 0) picks the test image,
# SMOKE_KEEP=1 leaves the service running, and SMOKE_PROJECT (default pathguard-smoke) is the
# compose project, separate from a running `docker compose up` so the test never touches it.
set -euo pipefail

cd "$(dirname "$0")/.."
PROJECT="${SMOKE_PROJECT:-pathguard-smoke}"
PORT="${SMOKE_PORT:-18000}"
TIMEOUT="${SMOKE_TIMEOUT:-240}"
export PATHGUARD_HOST_PORT="$PORT"
BASE="http://127.0.0.1:$PORT"

say() { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then
  COMPOSE=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' found"
fi
command -v curl >/dev/null || fail "curl not found on the host"
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f compose.yaml "$@"; }

# The bundle compose will mount (PATHGUARD_BUNDLE_DIR or compose.yaml's default), read from the
# resolved config: v1 prints `- SRC:/bundle:ro`, v2 the long syntax with source/target.
bundle_dir=$(compose config 2>/dev/null | awk '
  /:\/bundle:ro/ { sub(/^[ \t]*-[ \t]*/, ""); sub(/:\/bundle:ro.*$/, ""); print; exit }
  /source:/      { src = $2 }
  /target: \/bundle$/ { print src; exit }')
[ -n "$bundle_dir" ] || fail "could not find the /bundle mount in '${COMPOSE[*]} config'"
# Checked here because a missing bind-mount source would be created (empty, root-owned).
[ -f "$bundle_dir/manifest.json" ] || fail "no bundle at $bundle_dir (set PATHGUARD_BUNDLE_DIR)"
say "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')); bundle: $bundle_dir; port: $PORT"

tmp=$(mktemp -d)
cleanup() {
  status=$?
  if [ "$status" -ne 0 ] && [ -n "${cid:-}" ]; then
    say "last service logs:"; compose logs --tail 40 pathguard >&2 || true
  fi
  if [ "${SMOKE_KEEP:-0}" = 1 ]; then
    say "SMOKE_KEEP=1: leaving project $PROJECT running on $BASE"
  else
    compose down --volumes --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  if [ "$status" -eq 0 ]; then say "PASS"; else say "FAILED (exit $status)"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${SMOKE_BUILD:-1}" != 0 ]; then
  say "building the image"
  start=$SECONDS
  compose build pathguard >"$tmp/build.log" 2>&1 || { tail -40 "$tmp/build.log" >&2; fail "build failed"; }
  say "built in $((SECONDS - start)) s"
fi

say "starting the service"
compose up -d pathguard >"$tmp/up.log" 2>&1 || { cat "$tmp/up.log" >&2; fail "compose up failed"; }
cid=$(compose ps -q pathguard)
[ -n "$cid" ] || fail "no container for the service"

start=$SECONDS
while :; do
  state=$(docker inspect -f '{{.State.Status}} {{.State.Health.Status}} {{.RestartCount}}' "$cid")
  case "$state" in
    "running healthy "*) break ;;
    running\ *\ 0) ;;
    *) fail "container is not running as it should (status, health, restarts: $state)" ;;
  esac
  [ $((SECONDS - start)) -lt "$TIMEOUT" ] || fail "not healthy after ${TIMEOUT} s ($state)"
  sleep 2
done
say "healthy after $((SECONDS - start)) s"

uid=$(docker exec "$cid" id -u)
[ "$uid" != 0 ] || fail "the service runs as root"
say "runs as uid $uid"

code=$(curl -sS -o "$tmp/ready.json" -w '%{http_code}' "$BASE/v2/health/ready")
[ "$code" = 200 ] || fail "GET /v2/health/ready from the host: $code"

# A real test image: from the shared data set that matches the bundle's input (MNIST for
# 1x28x28, CIFAR-10 for 3x32x32; SMOKE_DATA_DIR, default ../shared/data, streamed into the
# container, which has numpy and Pillow), else a digit from scikit-learn's bundled set sized
# and coloured for the input (as is for 8x8 models, centred MNIST-style otherwise).
gen=$(cat <<'PY'
import io, json, sys
import numpy as np
from PIL import Image

manifest = json.load(open("/bundle/manifest.json"))
c, h, w = manifest["input_shape"]
i = int(sys.argv[1])
if len(sys.argv) > 2:  # an .npz on stdin: x_test (N, H, W[, 3]) uint8, y_test, classes
    data = np.load(io.BytesIO(sys.stdin.buffer.read()))
    img = Image.fromarray(data["x_test"][i])
    label, source = str(data["classes"][data["y_test"][i]]), f"{sys.argv[2]} x_test[{i}]"
else:
    from sklearn.datasets import load_digits
    digits = load_digits()
    img = Image.fromarray((digits.images[i] / 16 * 255).round().astype(np.uint8), "L")
    label, source = str(digits.target[i]), f"scikit-learn digits[{i}]"
    if (h, w) != (8, 8):
        side = max(1, round(min(h, w) * 20 / 28))
        canvas = Image.new("L", (w, h))
        canvas.paste(img.resize((side, side), Image.BILINEAR), ((w - side) // 2, (h - side) // 2))
        img = canvas
img = img.convert("RGB" if c == 3 else "L")
img.save(sys.stdout.buffer, "PNG")
print(f"label={label}", file=sys.stderr)
print(f"desc={source}, label {label}, {img.width}x{img.height} {img.mode} PNG for input {[c, h, w]}",
      file=sys.stderr)
PY
)
expected=""
if [ -n "${SMOKE_IMAGE:-}" ]; then
  cp "$SMOKE_IMAGE" "$tmp/image.png"
  say "image: $SMOKE_IMAGE"
else
  shape=$(docker exec "$cid" python -c 'import json; print(*json.load(open("/bundle/manifest.json"))["input_shape"])')
  data_dir="${SMOKE_DATA_DIR:-../shared/data}"
  case "$shape" in
    "1 28 28") npz="$data_dir/mnist.npz" ;;
    "3 32 32") npz="$data_dir/cifar10.npz" ;;
    *) npz="" ;;
  esac
  index="${SMOKE_INDEX:-0}"
  if [ -n "$npz" ] && [ -f "$npz" ]; then
    docker exec -i "$cid" python -c "$gen" "$index" "$(basename "$npz")" <"$npz" >"$tmp/image.png" 2>"$tmp/image.txt" \
      || { cat "$tmp/image.txt" >&2; fail "could not make a test image from $npz"; }
  else
    docker exec -i "$cid" python -c "$gen" "$index" </dev/null >"$tmp/image.png" 2>"$tmp/image.txt" \
      || { cat "$tmp/image.txt" >&2; fail "could not make a test image"; }
  fi
  expected=$(sed -n 's/^label=//p' "$tmp/image.txt")
  say "image: $(sed -n 's/^desc=//p' "$tmp/image.txt")"
fi

code=$(curl -sS -o "$tmp/classify.json" -w '%{http_code}' \
  -F "file=@$tmp/image.png;type=image/png" "$BASE/classify?top_k=3")
[ "$code" = 200 ] || { cat "$tmp/classify.json" >&2; echo >&2; fail "POST /classify: HTTP $code"; }
check=$(cat <<'PY'
import json, sys
r = json.load(sys.stdin)
p, a, path = r['prediction'], r['adversarial'], r['path']
assert isinstance(p['index'], int) and isinstance(p['label'], str), p
assert 0.0 <= p['confidence'] <= 1.0 and p['top_k'], p
assert isinstance(a['score'], float) and 0.0 <= a['score'] <= 1.0, a
assert a['verdict'] in ('clean', 'adversarial') and isinstance(a['flagged'], bool), a
assert 0.0 <= path['open_fraction'] <= 1.0 and path['layers'], path
assert all({'name', 'open', 'total', 'anomaly'} <= set(l) for l in path['layers']), path
print(f"prediction {p['label']} ({p['confidence']:.3f}), adversarial score {a['score']:.3f}"
      f" -> {a['verdict']} (threshold {a['threshold']:.3f}), path open"
      f" {path['open_fraction']:.3f} over {len(path['layers'])} layers, model"
      f" {r['model']['name']} {r['model']['version']}, {r['timing']['total_ms']:.1f} ms")
PY
)
docker exec -i "$cid" python -c "$check" <"$tmp/classify.json" >"$tmp/summary.txt" 2>&1 || { cat "$tmp/summary.txt" "$tmp/classify.json" >&2; echo >&2; fail "unexpected /classify response"; }
say "POST /classify -> 200: $(cat "$tmp/summary.txt")"
if [ -n "$expected" ]; then
  predicted=$(sed -n 's/^prediction \(.*\) ([0-9.]*), adversarial.*/\1/p' "$tmp/summary.txt")
  if [ "$predicted" = "$expected" ]; then say "prediction matches the label ($expected)"
  else say "note: predicted '$predicted', the image's label is '$expected' (not a failure)"; fi
fi

printf 'this is not an image\n' >"$tmp/bad.txt"
code=$(curl -sS -o "$tmp/bad.json" -w '%{http_code}' \
  -F "file=@$tmp/bad.txt;type=text/plain" "$BASE/classify")
case "$code" in 4??) ;; *) cat "$tmp/bad.json" >&2; echo >&2; fail "text upload: expected 4xx, got $code" ;; esac
grep -q '"code"' "$tmp/bad.json" || fail "text upload: no error code in $(cat "$tmp/bad.json")"
say "POST /classify (text file) -> $code: $(cat "$tmp/bad.json")"
