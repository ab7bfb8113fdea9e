"""Plain-text tables (the CLI runs on devices too, so no rich here)."""

from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def acc_matrix(names: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> str:
    rows = [[f"after {names[i]}"] + [None if a is None else f"{a:.3f}" for a in row]
            for i, row in enumerate(matrix)]
    return render(["R[i][j]"] + list(names), rows)
