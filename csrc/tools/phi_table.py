"""Generate ``kPhiTab`` in ``csrc/energy_cpu.cpp``: the AVX-512 build's table of the normal CDF for gelu.

Phi(-x) for 0 <= x < 7.75 is cut into 16 intervals ``[(i - 1/2)/2, (i + 1/2)/2]`` (i = 0..15, one per lane
of a ``vpermps`` table), and on each a degree-5 polynomial in ``u = 2x - i`` (``u`` in ``[-1/2, 1/2]``) is fitted
by least squares at 400 Chebyshev nodes in float64 against ``scipy.special.ndtr``, then rounded to float.
Interval 0 fits the smooth Phi(-x) over ``[-1/4, 1/4]`` although the kernel evaluates it on ``[0, 1/4]`` only.

    python csrc/tools/phi_table.py          # prints the table's rows as they appear in the source
    python csrc/tools/phi_table.py --check  # also prints the largest error of the float evaluation
"""
from __future__ import annotations

import sys

import numpy as np

DEGREE, INTERVALS, NODES, LIMIT = 5, 16, 400, 7.75


def coefficients() -> np.ndarray:
    """``[DEGREE + 1, INTERVALS]`` float32: row j holds the u**j coefficient of every interval."""
    from scipy.special import ndtr

    k = np.arange(NODES)
    u = 0.5 * np.cos(np.pi * (k + 0.5) / NODES)
    c = np.zeros((DEGREE + 1, INTERVALS), dtype=np.float32)
    for i in range(INTERVALS):
        fit = np.linalg.lstsq(np.vander(u, DEGREE + 1, increasing=True), ndtr(-(u + i) / 2), rcond=None)[0]
        c[:, i] = fit.astype(np.float32)
    return c


def rows(c: np.ndarray) -> list[str]:
    return ["  {" + ", ".join(float(v).hex() + "f" for v in row) + "}," for row in c]


def max_error(c: np.ndarray) -> float:
    """Largest |Phi(-x) - table| over [0, LIMIT), Horner in float32 as the kernel evaluates it (without fma)."""
    from scipy.special import ndtr

    x = np.linspace(0, LIMIT, 200001, endpoint=False).astype(np.float32)
    i = np.rint(2 * x).astype(np.int64)
    u = (2 * x - i).astype(np.float32)
    q = c[DEGREE][i]
    for j in range(DEGREE - 1, -1, -1):
        q = (q * u + c[j][i]).astype(np.float32)
    return float(np.max(np.abs(q.astype(np.float64) - ndtr(-x.astype(np.float64)))))


if __name__ == "__main__":
    table = coefficients()
    print("\n".join(rows(table)))
    if "--check" in sys.argv[1:]:
        print(f"max |error| {max_error(table):.3g}", file=sys.stderr)
