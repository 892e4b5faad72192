#!/usr/bin/env bash
# Proves on a GPU everything the CPU cannot (DESIGN section 5), from a fresh checkout, in stages
# that fit one short call each:
#
#   bash benchmarks/gpu_proof.sh OUTDIR quick            # <= 5 min, build included: parity, fuzz,
#                                                        # no host sync, graphs, loaders, memcheck,
#                                                        # racecheck, the headline benchmark rows
#   bash benchmarks/gpu_proof.sh OUTDIR full:profile     # kernels, graph, host (eager path and
#                                                        # ops), ncu per kernel beside the model
#   bash benchmarks/gpu_proof.sh OUTDIR full:tests       # every GPU test (<= 9 min)
#   bash benchmarks/gpu_proof.sh OUTDIR full:sanitize    # the sanitizers' other tools and loader
#   bash benchmarks/gpu_proof.sh OUTDIR full:bench-encode   # benchmark rows, records and plots
#   bash benchmarks/gpu_proof.sh OUTDIR full:bench-other      # (varlen, expand; host time per call first)
#   bash benchmarks/gpu_proof.sh OUTDIR full:bench-compiled   # (torch.compile baselines)
#   bash benchmarks/gpu_proof.sh OUTDIR full             # the full stages back to back (each in a
#                                                        # folder of its own; more than one call)
#   ... --plan       the jobs, their order and deadlines, without running anything (no GPU needed)
#   ... --rehearse   the stage on the CPU: the cpu backend and Triton's interpreter (CI runs it)
#
# The build is offline (pip --no-build-isolation --no-deps --no-index) for the arch of the GPU
# present. OUTDIR gets at most 8 files: summary.txt (printed last), proof.json, machine.txt,
# logs.tar.gz, and bench.json or calibration.txt and calibration.json. benchmarks/proof.py is the scheduler; PYTHON picks the interpreter
# (default python3). Exits 0 when everything ran and passed (PASS); FAIL and INCOMPLETE exit 1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
exec "${PYTHON:-python3}" -m benchmarks.proof "$@"
