"""A small dense simplex (two phases, Bland's rule) for the suppression audit.

Solves ``max c·x  s.t.  A x = b, x ≥ 0`` with ``b ≥ 0``. Sizes here are a connected group of
suppressed cells (tens, rarely hundreds), so a dense numpy tableau is fast enough and avoids a
solver dependency. Inputs are scaled by the caller so that values are of order 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["FeasibleRegion"]

_TOL = 1e-9
Matrix = NDArray[np.float64]


def _pivot(t: Matrix, row: int, col: int) -> None:
    t[row] /= t[row, col]
    column = t[:, col].copy()
    column[row] = 0.0
    t -= np.outer(column, t[row])


class FeasibleRegion:
    """``{x ≥ 0 : A x = b}`` after phase 1; ``maximize`` runs phase 2 for any objective."""

    def __init__(self, a: Matrix, b: Matrix) -> None:
        m, n = a.shape
        self.n = n
        t = np.zeros((m + 1, n + m + 1))
        t[:m, :n] = a
        t[:m, n : n + m] = np.eye(m)
        t[:m, -1] = b
        t[m, :n] = -a.sum(axis=0)
        t[m, -1] = -b.sum()
        basis = list(range(n, n + m))
        self._run(t, basis, n + m)
        if t[m, -1] < -1e-7 * max(1.0, float(np.abs(b).max(initial=0.0))):
            raise ValueError("infeasible system (the true values must satisfy it)")
        # drive artificial variables out of the basis; drop redundant rows
        keep: list[int] = []
        for i in range(m):
            if basis[i] >= n:
                cols = np.nonzero(np.abs(t[i, :n]) > _TOL)[0]
                if cols.size == 0:
                    continue
                _pivot(t, i, int(cols[0]))
                basis[i] = int(cols[0])
            keep.append(i)
        self._t = np.vstack([t[keep][:, :n], np.zeros((1, n))])
        self._rhs = np.append(t[keep, -1], 0.0)
        self._basis = [basis[i] for i in keep]

    @staticmethod
    def _run(t: Matrix, basis: list[int], n_cols: int) -> bool:
        """Pivot until optimal; False when unbounded. Last row holds reduced costs."""
        m = t.shape[0] - 1
        while True:
            entering = np.nonzero(t[m, :n_cols] < -_TOL)[0]
            if entering.size == 0:
                return True
            col = int(entering[0])
            best: int | None = None
            best_ratio = 0.0
            for i in range(m):
                if t[i, col] > _TOL:
                    ratio = t[i, -1] / t[i, col]
                    if (
                        best is None
                        or ratio < best_ratio - _TOL
                        or (abs(ratio - best_ratio) <= _TOL and basis[i] < basis[best])
                    ):
                        best, best_ratio = i, ratio
            if best is None:
                return False
            _pivot(t, best, col)
            basis[best] = col

    def maximize(self, c: Matrix) -> float:
        """max c·x over the region; ``inf`` when unbounded."""
        m = len(self._basis)
        t = np.hstack([self._t, self._rhs[:, None]])
        t[m, : self.n] = -c
        t[m, -1] = 0.0
        for i, j in enumerate(self._basis):
            if c[j] != 0.0:
                t[m] += c[j] * t[i]
        basis = list(self._basis)
        if not self._run(t, basis, self.n):
            return float("inf")
        return float(t[m, -1])
