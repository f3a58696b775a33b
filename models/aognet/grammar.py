"""The And-Or grammar (AOG) of one AOGNet block: nodes, binary splits, laterals, path counts and order.

Reference: X. Li, X. Song, T. Wu, "AOGNets: Compositional Grammatical Architectures for Deep Learning", CVPR
2019, as configured by the Attentive Normalization paper's AOGNet-12M/40M (docs/AN.md 3.2, 3.4).

A block's channels are a 1 x D grid of primitives. For a span ``[a-b]`` of primitives:

- ``T[a-b]``: terminal node; its op reads the input channels of the span.
- ``OR[a-b]``: children ``T[a-b]`` and one ``AND[a-b]/k`` per kept binary split (sum of the children).
- ``AND[a-b]/k``: split after ``k`` primitives; children ``OR[a-(a+k-1)]`` and ``OR[(a+k)-b]`` (concat).

This module builds that graph as plain data; :mod:`models.aognet.net` turns it into modules. Everything is
deterministic and explicit; the rules below reproduce the wiring the reference code produces (listed node by
node in docs/AN.md 3.4 and pinned by ``tests/test_models_aognet.py``):

1. **Creation order (node ids).** Breadth-first from the root ``OR[0-(D-1)]``. An OR node creates its T-node,
   then its AND-nodes in split order: ascending, or descending for ``remove_symmetric=2``. An AND node creates
   (or reuses: one node per span) its left, then its right OR child.
2. **Symmetric splits.** ``remove_symmetric=0`` keeps every split ``k``; ``1`` keeps ``k <= L - k`` (the first
   of each mirror pair ``(k, L - k)``), ``2`` keeps ``k >= L - k`` (the first in the reversed list).
3. **Child order** (concat order of AND-nodes, summation and traversal order of OR-nodes).
   ``'natural'``: creation order, i.e. left before right. ``'official'`` (default): the order in which the
   reference code iterated its children, which were a Python ``set`` of node ids: ids are placed, in
   creation order, into an 8-slot table at ``id mod 8``, a taken slot ``i`` moving on to ``(5 i + 1 + (id >>
   5)) mod 8``, and read in slot order. Written out here so it no longer depends on the interpreter; it
   reproduces the two reversed concats of the trace (stage 3 ``AND[1-3]/1``, stage 4 ``AND[2-3]/1``). Defined
   for nodes of at most 4 children (every D <= 4; larger grids need ``'natural'``).
4. **Laterals.** OR-nodes of equal span length are chained left to right (by start); AND-nodes of equal span
   length are chained by descending start, and by ascending split within one span. Each node in a chain also
   receives its predecessor's output (its lateral source), always added to its op input. It is added to the
   residual input too only when the node and its lateral source have no (syntactic) parent in common: siblings
   already meet at their shared parent, so a lateral between them only feeds the op (``OR[1-1]`` from
   ``OR[0-0]``, both children of ``AND[0-1]/1``; the two full-width AND-nodes, both children of the root),
   while a lateral between different parts of the graph also joins the shortcut (``OR[2-2]`` from ``OR[1-1]``;
   ``AND[0-1]/1`` from ``AND[2-3]/1``). The rule holds for OR- and AND-nodes alike.
5. **Path counts.** ``npaths`` = number of root-to-node paths over syntactic edges. A parent whose ``npaths`` is
   smaller than its child's scales that child's output by their ratio in the *residual* input only.
6. **Evaluation order.** Depth-first post-order from the root over each node's inputs (children in child
   order, then the lateral source); then all T-nodes are moved to the front, keeping their relative order.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from functools import cache

__all__ = ["AOG", "Node", "build_aog"]

T, AND, OR = "T", "AND", "OR"
CHILD_ORDERS = ("official", "natural")


@dataclass(frozen=True)
class Node:
    """One node of an AOG.

    Attributes:
        id: Creation index (rule 1).
        kind: ``'T'``, ``'AND'`` or ``'OR'``.
        start: First primitive of the span.
        end: Last primitive of the span (inclusive).
        split: AND-nodes: primitives in the left part; 0 otherwise.
        children: Ids of the syntactic children in child order (rule 3).
        lateral: Id of the lateral source (rule 4) or None.
        npaths: Number of root-to-node paths (rule 5).
        res_scales: Residual scale of each child, aligned with ``children``.
        res_lateral: Whether the lateral source is added to the residual input too (rule 4).
    """

    id: int
    kind: str
    start: int
    end: int
    split: int = 0
    children: tuple[int, ...] = ()
    lateral: int | None = None
    npaths: int = 1
    res_scales: tuple[float, ...] = ()
    res_lateral: bool = False

    @property
    def length(self) -> int:
        """Number of primitives in the span."""
        return self.end - self.start + 1

    @property
    def name(self) -> str:
        """``'T[0-3]'``, ``'AND[0-3]/1'`` or ``'OR[0-3]'`` (the notation of docs/AN.md 3.4)."""
        base = f"{self.kind}[{self.start}-{self.end}]"
        return f"{base}/{self.split}" if self.kind == AND else base

    @property
    def key(self) -> str:
        """A module-name-safe version of :attr:`name`: ``'t0_3'``, ``'and0_3s1'``, ``'or0_3'``."""
        base = f"{self.kind.lower()}{self.start}_{self.end}"
        return f"{base}s{self.split}" if self.kind == AND else base


@dataclass(frozen=True)
class AOG:
    """An AOG over ``dims`` primitives.

    Attributes:
        dims: Number of primitives D.
        nodes: All nodes, indexed by id.
        order: Node ids in evaluation order (rule 6).
        root: Id of the root OR-node.
    """

    dims: int
    nodes: tuple[Node, ...]
    order: tuple[int, ...]
    root: int = 0

    def is_full(self, node: Node) -> bool:
        """Whether the node covers the whole grid (where AOGNet puts AN)."""
        return node.length == self.dims

    def by_name(self, name: str) -> Node:
        """The node called ``name`` (e.g. ``'AND[0-3]/1'``)."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


def _kept_splits(length: int, remove_symmetric: int) -> list[int]:
    splits = list(range(1, length))
    if remove_symmetric == 1:
        return [k for k in splits if k <= length - k]
    if remove_symmetric == 2:
        return [k for k in reversed(splits) if k >= length - k]
    return splits


def legacy_set_order(ids: list[int]) -> list[int]:
    """Iteration order of a small Python set of non-negative ints built by adding ``ids`` in order (rule 3).

    Raises:
        ValueError: For more than 4 ids (the table would grow; that case was never traced).
    """
    if len(ids) > 4:
        raise ValueError(
            f"child_order='official' is defined for nodes with at most 4 children, got {len(ids)}; "
            "use child_order='natural' for grids larger than 4 primitives"
        )
    table: list[int | None] = [None] * 8
    for i in ids:
        slot, perturb = i & 7, i
        while table[slot] is not None:
            perturb >>= 5
            slot = (slot * 5 + 1 + perturb) & 7
        table[slot] = i
    return [i for i in table if i is not None]


def build_aog(dims: int, remove_symmetric: int = 0, lateral: bool = True, child_order: str = "official") -> AOG:
    """Builds the AOG of one block (binary splits).

    Args:
        dims: Number of primitives D (>= 1).
        remove_symmetric: 0 keeps all splits, 1 / 2 drop mirror splits (rule 2).
        lateral: Add the lateral connections (rule 4; AOGNet's ``extra_node_hierarchy = 4``).
        child_order: ``'official'`` or ``'natural'`` (rule 3).

    Returns:
        The graph, with path counts, residual scales and evaluation order.
    """
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f"AOG dims must be an integer >= 1, got {dims!r}")
    if remove_symmetric not in (0, 1, 2):
        raise ValueError(f"remove_symmetric must be 0, 1 or 2, got {remove_symmetric!r}")
    if child_order not in CHILD_ORDERS:
        raise ValueError(f"child_order must be one of {', '.join(CHILD_ORDERS)}, got {child_order!r}")

    # Rule 1: breadth-first creation.
    specs: list[tuple[str, int, int, int]] = []  # (kind, start, end, split) per id
    index: dict[tuple[str, int, int, int], int] = {}
    children: list[list[int]] = []

    def get(kind: str, start: int, end: int, split: int = 0) -> int:
        key = (kind, start, end, split)
        if key not in index:
            index[key] = len(specs)
            specs.append(key)
            children.append([])
        return index[key]

    queue = [get(OR, 0, dims - 1)]
    head = 0
    while head < len(queue):
        i = queue[head]
        head += 1
        kind, start, end, split = specs[i]
        if kind == OR:
            kids = [get(T, start, end)]
            kids += [get(AND, start, end, k) for k in _kept_splits(end - start + 1, remove_symmetric)]
        elif kind == AND:
            kids = [get(OR, start, start + split - 1), get(OR, start + split, end)]
        else:
            kids = []
        for k in kids:
            if k not in children[i]:
                children[i].append(k)
            if k not in queue:
                queue.append(k)

    # Rule 3: child order.
    ordered = [legacy_set_order(c) if child_order == "official" else list(c) for c in children]

    # Rule 4: laterals.
    laterals: dict[int, int] = {}
    if lateral:
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, (kind, start, end, _) in enumerate(specs):
            if kind != T:
                groups[(kind, end - start + 1)].append(i)
        for (kind, _), members in groups.items():
            if kind == OR:
                members.sort(key=lambda i: specs[i][1])
            else:
                members.sort(key=lambda i: (-specs[i][1], specs[i][3]))
            for prev, cur in itertools.pairwise(members):
                laterals[cur] = prev

    # Rule 5: path counts over syntactic edges (memoised over parents).
    parents: list[list[int]] = [[] for _ in specs]
    for i, kids in enumerate(children):
        for k in kids:
            parents[k].append(i)

    @cache
    def npaths(i: int) -> int:
        return 1 if not parents[i] else sum(npaths(p) for p in parents[i])

    # Rule 6: depth-first post-order over inputs, then T-nodes first.
    post: list[int] = []
    state = [0] * len(specs)  # 0 new, 1 on the stack, 2 done

    def visit(i: int) -> None:
        state[i] = 1
        inputs = ordered[i] + ([laterals[i]] if i in laterals else [])
        for j in inputs:
            if state[j] == 1:
                raise ValueError(f"AOG has a cycle through node {_name(specs[j])} (laterals)")
            if state[j] == 0:
                visit(j)
        state[i] = 2
        post.append(i)

    visit(0)
    order = tuple([i for i in post if specs[i][0] == T] + [i for i in post if specs[i][0] != T])

    nodes = []
    for i, (kind, start, end, split) in enumerate(specs):
        scales = tuple(npaths(i) / npaths(c) if npaths(i) < npaths(c) else 1.0 for c in ordered[i])
        lat = laterals.get(i)
        res_lateral = lat is not None and not set(parents[i]) & set(parents[lat])  # rule 4
        nodes.append(Node(i, kind, start, end, split, tuple(ordered[i]), lat, npaths(i), scales, res_lateral))
    return AOG(dims, tuple(nodes), order)


def _name(spec: tuple[str, int, int, int]) -> str:
    kind, start, end, split = spec
    return f"{kind}[{start}-{end}]" + (f"/{split}" if kind == AND else "")
