#!/usr/bin/env bash
# CUDA compiler launcher (CMakeLists.txt): runs the nvcc command it is given and keeps ptxas's resource report
# (registers, spills, shared memory per kernel and architecture, from --resource-usage) next to the object
# file as <object>.resources.txt, for the emulator's cost projection (lib/projection.ts). Everything else
# nvcc prints (warnings, errors) passes through.
out=""
prev=""
for arg in "$@"; do
  [[ $prev == "-o" ]] && out=$arg
  prev=$arg
done
log=$(mktemp)
"$@" 2>"$log"
rc=$?
report='^ptxas info|^ +[0-9]+ bytes stack frame'
if [[ -n $out ]]; then grep -E "$report" "$log" >"$out.resources.txt" || true; fi
grep -vE "$report" "$log" >&2 || true
rm -f "$log"
exit $rc
