#!/usr/bin/env bash
# Run every bench, one after another, each writing its JSON to bench/results/<UTC time>/<bench>.json.
#   bench/run_all.sh           full runs (tens of minutes; nothing else should load the machine)
#   bench/run_all.sh --smoke   tiny runs that only check the scripts work (a few minutes in all)
# Prints each result's path; exits 1 if any bench failed (the others still run).
set -uo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"

if [[ "${1:-}" == "--smoke" ]]; then
  setup=(--cycles 3)
  media=(--sessions 2 --seconds 2 --pipelines passthrough,edges --slow-seconds 5)
  teardown=(--cycles 2)
  capacity=(--max-sessions 3 --seconds 2 --pin)
  batching=(--sessions 1,2 --seconds 2 --pin)
  churn=(--cycles 20 --checkpoint 10)
  neighbours=(--steady 2 --seconds 10 --pin)
  gpu_check=(--frames 10)
  marker_off=(--targets embedded,bare --sessions 1 --seconds 2 --pipelines passthrough --slow-seconds 5)
  whep_viewers=(--smoke --pin)
else
  setup=(--cycles 30) media=() teardown=(--cycles 30) capacity=(--runs 3 --pin) batching=(--runs 3 --pin)
  churn=() neighbours=(--runs 2 --pin) gpu_check=() whep_viewers=(--runs 3 --pin)
  marker_off=(--targets embedded,bare --sessions 1 --seconds 20 --pipelines passthrough,invert --slow-seconds 10)
fi

status=0
run() {
  # run <result name> <bench module> <args...>
  local name=$1 module=$2
  shift 2
  if "$python" -m "bench.$module" "$@" >"$out/$name.json" 2>"$out/$name.log"; then
    echo "$out/$name.json"
  else
    echo "FAILED: bench.$module (see $out/$name.log)" >&2
    status=1
  fi
}

run setup setup "${setup[@]}"
run media media "${media[@]}"
# The control for the marker-bit release: the project with aiortc's stock jitter buffer.
SCOPE_RELEASE_ON_MARKER=0 run media_marker_off media "${marker_off[@]}"
run teardown teardown "${teardown[@]}"
run capacity capacity "${capacity[@]}"
run batching batching "${batching[@]}"
run churn churn "${churn[@]}"
run neighbours neighbours "${neighbours[@]}"
run gpu_check gpu_check "${gpu_check[@]}"
run whep_viewers whep_viewers "${whep_viewers[@]}"
# The same with a camera-weight stream (noise below the code): about five RTP packets a frame, not one.
run whep_viewers_noise whep_viewers --noise "${whep_viewers[@]}"
exit $status
