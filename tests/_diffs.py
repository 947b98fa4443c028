"""Comparisons of the parity tests: largest differences to a peer, recorded per (case, quantity)
while asserting them and printed at the end of a test module (visible with ``pytest -s``) for the
project's closing notes; and bitwise equality, of arrays and of pytrees' leaves by path."""

import jax
import numpy as np


def assert_same_bits(a, b, what=""):
    """``a`` and ``b`` have one dtype and shape and the same bytes."""
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), what
    assert a.tobytes() == b.tobytes(), f"{what}: not bitwise equal"


def leaves(tree) -> dict:
    """{path string: leaf as a numpy array} of a pytree."""
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


class DiffLog:
    def __init__(self, title: str):
        self.title = title
        self.largest: dict[tuple[str, str], float] = {}

    def assert_close(self, case: str, quantity: str, ours, theirs, atol: float) -> None:
        """Record max |ours - theirs| under (case, quantity), then assert it is within atol."""
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert ours.shape == theirs.shape, (
            f"{case} {quantity}: shape {ours.shape} != {theirs.shape}"
        )
        assert ours.dtype == theirs.dtype, (
            f"{case} {quantity}: dtype {ours.dtype} != {theirs.dtype}"
        )
        diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
        self.largest[(case, quantity)] = max(self.largest.get((case, quantity), 0.0), diff)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol, err_msg=f"{case}: {quantity}")

    def report(self) -> None:
        if not self.largest:
            return
        print(f"\n\n{self.title}")
        width = max(len(case) for case, _ in self.largest)
        for (case, quantity), diff in sorted(self.largest.items()):
            print(f"  {case:<{width}}  {quantity:<34}  {diff:.3e}")
