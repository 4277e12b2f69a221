#!/usr/bin/env bash
# Runs every benchmark, one at a time, with --device "${DEVICE:-cpu}"; each one's output goes to
# benchmarks/results/logs/<name>[_cuda][_quick].log. A benchmark that fails is reported and the others still run;
# the script ends with a summary and exits 1 when any failed (2 on a bad setting or name).
#
#   bash benchmarks/run_all.sh                      # every benchmark, full runs, on the CPU
#   DEVICE=cuda bash benchmarks/run_all.sh          # the same on the GPU (results in <name>_cuda.json where the
#                                                   # benchmark keeps CPU and GPU results apart)
#   QUICK=1 bash benchmarks/run_all.sh long_sequence ranking   # smoke runs of the named benchmarks only
#
# Settings (environment): DEVICE (cpu or cuda), QUICK (1: each benchmark's smoke run; a benchmark without one is
# skipped and listed), PYTHON (default .venv/bin/python), LOGS (default benchmarks/results/logs).
# Order: quantizers first (speed, quality, convergence, MMQ, SIDE tables), then the modules (SID modules, long
# histories), training (speed, ranking tables, history padding), serving, scale; runs from the repository root.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE=${DEVICE:-cpu}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-.venv/bin/python}
LOGS=${LOGS:-benchmarks/results/logs}

# name | how to run it (after $PYTHON, from the repository root) | its smoke-run arguments ("-": none)
BENCHMARKS=(
  "quantizer_speed|benchmarks/quantizer_speed.py|--quick"
  "quantizer_quality|benchmarks/quantizer_quality.py|--quick"
  "convergence|benchmarks/convergence.py|--quick"
  "mmq_stage1|benchmarks/mmq_stage1.py|--quick"
  "side_tables|benchmarks/side_tables.py|--quick"
  "sid_modules|benchmarks/sid_modules.py|--quick"
  "long_sequence|benchmarks/long_sequence.py|--quick"
  "train_speed|benchmarks/train_speed.py|--quick"
  "ranking|benchmarks/ranking.py|--quick"
  "ranking_evidence|benchmarks/ranking_evidence.py|--quick"
  "history_padding|benchmarks/history_padding.py|-"
  "serving|benchmarks/serving.py|--quick"
  "scale|-m benchmarks.scale|--quick"
)

die() { echo "run_all.sh: $*" >&2; exit 2; }
[[ $DEVICE == cpu || $DEVICE == cuda ]] || die "DEVICE must be cpu or cuda, got '$DEVICE'"
[[ $QUICK == 0 || $QUICK == 1 ]] || die "QUICK must be 0 or 1, got '$QUICK'"
[[ -x $PYTHON ]] || die "PYTHON '$PYTHON' is not an executable (make the virtualenv first: see README)"
names=()
for entry in "${BENCHMARKS[@]}"; do names+=("${entry%%|*}"); done
for wanted in "$@"; do
  [[ " ${names[*]} " == *" $wanted "* ]] || die "no benchmark '$wanted'; known: ${names[*]}"
done

mkdir -p "$LOGS"
suffix=$([[ $DEVICE == cuda ]] && echo _cuda)$([[ $QUICK == 1 ]] && echo _quick)
passed=() failed=() skipped=()
started=$SECONDS
echo "run_all.sh: DEVICE=$DEVICE QUICK=$QUICK, logs in $LOGS ($(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg))"
for entry in "${BENCHMARKS[@]}"; do
  IFS='|' read -r name target quick_args <<<"$entry"
  if (($# > 0)) && [[ " $* " != *" $name "* ]]; then continue; fi
  extra=()
  if [[ $QUICK == 1 ]]; then
    if [[ $quick_args == - ]]; then
      skipped+=("$name (no smoke run)")
      echo "-- $name: skipped (no smoke run)"
      continue
    fi
    read -r -a extra <<<"$quick_args"
  fi
  read -r -a command <<<"$target"
  log="$LOGS/$name$suffix.log"
  echo "-- $name: $PYTHON ${command[*]} --device $DEVICE ${extra[*]} > $log"
  begin=$SECONDS
  "$PYTHON" "${command[@]}" --device "$DEVICE" "${extra[@]}" >"$log" 2>&1
  code=$?
  if ((code == 0)); then
    passed+=("$name ($((SECONDS - begin)) s)")
    echo "   ok in $((SECONDS - begin)) s"
  else
    failed+=("$name (exit $code after $((SECONDS - begin)) s; see $log)")
    echo "   FAILED: exit $code after $((SECONDS - begin)) s; last lines of $log:"
    tail -n 5 "$log" | sed 's/^/     /'
  fi
done

echo
echo "run_all.sh: $((SECONDS - started)) s; ${#passed[@]} passed, ${#failed[@]} failed, ${#skipped[@]} skipped"
for line in "${passed[@]}"; do echo "  passed   $line"; done
for line in "${skipped[@]}"; do echo "  skipped  $line"; done
for line in "${failed[@]}"; do echo "  FAILED   $line"; done
((${#failed[@]} == 0))
