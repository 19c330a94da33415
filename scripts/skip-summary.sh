#!/usr/bin/env bash
# Skipped tests, summed from pytest's short summary (`-ra`: "SKIPPED [N] FILE:LINE: REASON") in
# the log given (or stdin), so that a run that skipped tests says so at its very end:
#   serve tests skipped: 7 (7: the Orthanc binary is not on PATH; ...)
#   tests skipped in all: 8 (tests/test_serve.py: 7, tests/test_ddp.py: 1)
# Prints "serve tests skipped: 0" when none were; never fails the run.
set -euo pipefail
awk '
  /^SKIPPED \[[0-9]+\] / {
    n = substr($2, 2, length($2) - 2) + 0
    rest = substr($0, index($0, "] ") + 2)
    file = rest; sub(/:.*/, "", file)
    reason = rest; sub(/^[^:]*:[0-9]+: /, "", reason)
    total += n; by_file[file] += n
    if (file ~ /test_serve\.py$/) { serve += n; why[reason] += n }
  }
  END {
    line = "serve tests skipped: " serve + 0
    if (serve) {
      sep = " ("
      for (r in why) { line = line sep why[r] ": " r; sep = "; " }
      line = line ")"
    }
    print line
    line = "tests skipped in all: " total + 0
    if (total) {
      sep = " ("
      for (f in by_file) { line = line sep f ": " by_file[f]; sep = ", " }
      line = line ")"
    }
    print line
  }
' "${1:--}"
