"""Drawings of an MPO graph: graphviz DOT source, rendered files, terminal text.

Each core T_k[d_{k-1}, i_k, j_k, d_k] is a node; bond k (dimension d_k) is an
edge between T_k and T_{k+1}; the dangling legs i_k (input factor, top) and j_k
(output factor, bottom) end in small point nodes. The central tensor
(``mpo.central_index``) is highlighted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tnlm.core import MPO

__all__ = ["ascii_diagram", "render", "to_dot"]


def _quote(text: str) -> str:
    """A DOT string literal (quotes escaped; ``\\n`` escapes are kept as line breaks)."""
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(mpo: MPO, name: str = "MPO") -> str:
    """Graphviz DOT source (an undirected ``graph``) of the MPO.

    Core nodes are named after the tensornetwork nodes (``T0``, ``T1``, ...) and
    labelled with the core shape ``d_{k-1}x i_k x j_k x d_k``; the central one is
    filled and labelled "(central)". Bond edges carry their dimension as label;
    leg nodes ``in{k}`` / ``out{k}`` are points with xlabels ``i{k}=dim`` / ``j{k}=dim``.
    Needs no graphviz installation.
    """
    c = mpo.central_index
    lines = [
        f"graph {_quote(name)} {{",
        "  rankdir=TB;",
        f"  label={_quote(f'{name}: {mpo.shape[0]} x {mpo.shape[1]}, {mpo.num_params:,} params')};",
        "  node [shape=box, style=rounded, fontname=Helvetica];",
        "  edge [fontname=Helvetica];",
    ]
    names = []
    for k, node in enumerate(mpo.nodes):
        tid = node.name
        names.append(tid)
        shape = "x".join(str(int(d)) for d in node.tensor.shape)
        label = _quote(tid + (" (central)" if k == c else "") + "\\n" + shape)
        attrs = f"label={label}"
        if k == c:
            attrs += ', style="rounded,filled,bold", fillcolor="#f6c85f", penwidth=2'
        lines.append(f"  {_quote(tid)} [{attrs}];")
        lines.append(f'  "in{k}" [shape=point, width=0.06, xlabel="i{k}={mpo.in_shape[k]}"];')
        lines.append(f'  "out{k}" [shape=point, width=0.06, xlabel="j{k}={mpo.out_shape[k]}"];')
        lines.append(f'  "in{k}" -- {_quote(tid)};')
        lines.append(f'  {_quote(tid)} -- "out{k}";')
    lines.append("  { rank=same; " + " ".join(_quote(n) + ";" for n in names) + " }")
    for k, d in enumerate(mpo.bond_dims):
        lines.append(f'  {_quote(names[k])} -- {_quote(names[k + 1])} [label="{d}", penwidth=1.5];')
    lines.append("}")
    return "\n".join(lines) + "\n"


#: graphviz formats spelled two ways (the suffix and ``format=`` may use either)
_SAME_FORMAT = {"jpg": "jpeg", "jpe": "jpeg", "tif": "tiff", "gv": "dot"}


def _render_format(path: Path, format: str | None, formats: frozenset[str]) -> str:
    """The output format of :func:`render`: ``format`` if given, else the one ``path``'s
    suffix names (``svg`` without a suffix); a suffix naming another format is refused."""
    suffix = path.suffix.lower().removeprefix(".")

    def same(a: str, b: str) -> bool:
        return _SAME_FORMAT.get(a, a) == _SAME_FORMAT.get(b, b)

    if format is not None:
        if not isinstance(format, str):
            raise TypeError(f"format must be a str such as 'svg', got {format!r}")
        if format.lower() not in formats:
            raise ValueError(f"format must be a graphviz output format such as 'svg', 'png' "
                             f"or 'pdf', got {format!r}")
        if suffix in formats and not same(suffix, format.lower()):
            raise ValueError(f"path {str(path)!r} names format {suffix!r} but format is "
                             f"{format!r}: the file would hold {format} under a .{suffix} "
                             f"name (drop format= or change the suffix)")
        return format.lower()
    if not suffix:
        return "svg"
    if suffix not in formats:
        raise ValueError(f"path {str(path)!r}: cannot tell the output format from the suffix "
                         f".{suffix} (use .svg, .png or .pdf, or pass format=)")
    return suffix


def render(mpo: MPO, path: str | Path, format: str | None = None) -> Path:
    """Render :func:`to_dot` to ``path`` (e.g. ``"mpo.svg"``) and return the path.

    The format is ``format`` if given, else the one the suffix of ``path`` names
    (``"mpo.png"`` gives a PNG; ``svg`` for a path without a suffix). The file is
    rendered in a temporary folder beside ``path`` and renamed over it: nothing else
    beside ``path`` is written, and a failed render leaves an existing ``path`` as it was.
    A symbolic link at ``path`` is written through (its target is replaced), and an
    existing file keeps its permissions.

    Raises:
        TypeError: ``format`` is not a str.
        ValueError: ``format`` is not a graphviz output format, or differs from the one
            the suffix of ``path`` names, or the suffix names no format (before rendering).
        RuntimeError: if the graphviz ``dot`` program (or the ``graphviz`` python
            package) is missing; :func:`to_dot` and :func:`ascii_diagram` still work.
    """
    hint = (
        "install Graphviz (apt install graphviz, brew install graphviz, or "
        "conda install graphviz); to_dot() still returns the DOT source and "
        "ascii_diagram() a text drawing without it"
    )
    if shutil.which("dot") is None:
        raise RuntimeError(f"rendering needs the graphviz 'dot' program, not found on PATH: {hint}")
    try:
        import graphviz
    except ImportError as err:
        raise RuntimeError(f"rendering needs the graphviz python package: {hint}") from err
    path = Path(path)
    fmt = _render_format(path, format, frozenset(graphviz.FORMATS))
    if path.is_symlink():  # write through the link, as writing the file in place did
        path = path.resolve()
    source = to_dot(mpo)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        out = graphviz.Source(source).render(staging / "source.gv", outfile=staging / f"out.{fmt}",
                                             format=fmt, cleanup=True)
        if path.is_file():
            shutil.copymode(path, out)
        os.replace(out, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ascii_diagram(mpo: MPO) -> str:
    """A terminal drawing of the chain; the central tensor is marked ``[*Tk*]``.

    Bond k is drawn ``--d_k--`` between its sites; ``i{k}``/``j{k}`` are the input and
    output leg dimensions. For a 64 x 48 matrix with shapes (4, 4, 4) x (4, 4, 3)::

        i0=4       i1=4       i2=4
          |          |          |
        [T0]--16--[*T1*]--12--[T2]
          |          |          |
        j0=4       j1=4       j2=3
        W 64 x 48, 3,472 params, * = central
    """
    c = mpo.central_index
    boxes = [f"[*T{k}*]" if k == c else f"[T{k}]" for k in range(mpo.n_sites)]
    tops = [f"i{k}={d}" for k, d in enumerate(mpo.in_shape)]
    bottoms = [f"j{k}={d}" for k, d in enumerate(mpo.out_shape)]
    bonds = [f"--{d}--" for d in mpo.bond_dims]
    # column of each site's centre: boxes joined by their bonds, labels kept 2 apart
    centres = [max(len(tops[0]), len(bottoms[0]), len(boxes[0])) // 2]
    for k in range(1, mpo.n_sites):
        prev = centres[-1]
        need_box = prev + (len(boxes[k - 1]) + 1) // 2 + len(bonds[k - 1]) + len(boxes[k]) // 2
        need_lab = prev + max(
            (len(tops[k - 1]) + 1) // 2 + 2 + len(tops[k]) // 2,
            (len(bottoms[k - 1]) + 1) // 2 + 2 + len(bottoms[k]) // 2,
        )
        centres.append(max(need_box, need_lab))
    width = centres[-1] + max(len(boxes[-1]), len(tops[-1]), len(bottoms[-1])) + 1

    def place(row: list[str], text: str, centre: int) -> None:
        start = centre - len(text) // 2
        row[start : start + len(text)] = text

    top, bar, mid, bottom = ([" "] * width for _ in range(4))
    for k, x in enumerate(centres):
        place(top, tops[k], x)
        place(bottom, bottoms[k], x)
        bar[x] = "|"
        place(mid, boxes[k], x)
        if k:
            start = centres[k - 1] - len(boxes[k - 1]) // 2 + len(boxes[k - 1])
            end = x - len(boxes[k]) // 2
            label = str(mpo.bond_dims[k - 1])
            seg = list("-" * (end - start))
            off = (len(seg) - len(label)) // 2
            seg[off : off + len(label)] = label
            mid[start:end] = seg
    rows = ["".join(r).rstrip() for r in (top, bar, mid, bar, bottom)]
    rows.append(f"W {mpo.shape[0]} x {mpo.shape[1]}, {mpo.num_params:,} params, * = central")
    return "\n".join(rows)
