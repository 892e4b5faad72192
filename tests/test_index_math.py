"""The shared index math of csrc/include/vtok/index_math.h, compiled and checked exhaustively
on small sizes against its definition (the CPU and CUDA kernels both use it)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INCLUDE = Path(__file__).resolve().parents[1] / "csrc" / "include"

PROGRAM = r"""
#include "vtok/index_math.h"
#include <cstdio>
int main() {
  int bad = 0;
  for (int in = 1; in < 40; ++in)
    for (int out = 1; out <= in; ++out)
      for (int pos = 0; pos < in; ++pos) {
        const vtok::Bin holding = vtok::bins_holding(pos, in, out);
        for (int i = 0; i < out; ++i) {
          const vtok::Bin bin = vtok::adaptive_bin(i, in, out);
          const bool holds = bin.start <= pos && pos < bin.end;
          bad += holds != (holding.start <= i && i < holding.end);
        }
      }
  for (int frames = 1; frames < 12; ++frames)
    for (int fpt = 1; fpt < 5; ++fpt)
      for (int key = 0; key < frames; ++key) {
        int covered = 0;
        for (int g = 0; g < vtok::num_groups(frames, fpt); ++g) {
          const vtok::GroupBounds b = vtok::group_bounds(g, frames, fpt);
          for (int r = b.first; r < b.last; ++r) {
            const int t = vtok::nonkey_frame(r, key);
            bad += t == key || vtok::group_of_frame(t, key, fpt) != g;
            ++covered;
          }
        }
        bad += covered != frames - 1;
      }
  vtok::SoftmaxState a = vtok::softmax_init(), b = vtok::softmax_init();
  float w;
  vtok::softmax_push(a, 1.0f, w);
  vtok::softmax_push(b, 3.0f, w);
  vtok::softmax_merge(a, b);
  const float expected = 3.0f + std::log(1.0f + std::exp(-2.0f));
  bad += std::fabs(vtok::softmax_lse(a) - expected) > 1e-6f;
  std::printf("%d\n", bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_index_math_exhaustively(tmp_path):
    source = tmp_path / "index_math_check.cpp"
    source.write_text(PROGRAM)
    binary = tmp_path / "index_math_check"
    subprocess.run(["g++", "-std=c++17", f"-I{INCLUDE}", str(source), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, f"{result.stdout.strip()} mismatches"
