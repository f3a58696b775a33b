"""AOGNet grammar and network: the block wiring of docs/AN.md 3.4, node tables, widths, determinism.

``tests/assets/aognet_wiring.txt`` holds the node-by-node wiring of the reference implementation's three block
types (docs/AN.md 3.4, obtained there by tracing the reference model with torch.fx), transcribed as data in the
same notation, in evaluation order:

- ``NODE [AN] <- OP`` : the node's op input; ``| res RES`` its residual (shortcut) input, written only where it
  differs from the op input, exactly as in the listing; ``AN`` marks nodes whose 3x3 norm is AN.
- ``x[a-b]`` the block input's channels of primitives a..b; ``A + B`` a sum in that order; ``cat(A, B)`` a
  channel concat in that order; ``½A`` A scaled by 1/2 (the path-count correction of docs/AN.md 3.2).

The tests check them against what the built :class:`AOGBlock` computes -- its torch.fx graph (symbolically:
operands, order, scales) and its eager forward on random inputs (numerically) -- never against the grammar's
own fields. The official node tables (ids, spans, splits) come from ``tests/assets/official_layouts.json.gz``.
"""

from __future__ import annotations

import gzip
import json
import operator
import re
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import Tensor

import an
from models import create_model
from models._norms import make_norm_layers
from models.aognet import AOGBlock, NodeOp, build_aog
from models.aognet.grammar import AND, OR, T, legacy_set_order
from models.aognet.net import block_widths, slice_bounds

ASSETS = Path(__file__).resolve().parent / "assets"
LAYOUTS = ASSETS / "official_layouts.json.gz"
WIRING = ASSETS / "aognet_wiring.txt"


def read_listings(path: Path) -> dict[tuple[int, int], str]:
    """``(dims, remove_symmetric) -> listing`` from the wiring file; consecutive headers share one listing."""
    listings: dict[tuple[int, int], list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        header = re.fullmatch(r"## dims=(\d) remove_symmetric=(\d)", line)
        if header:
            if current is None or current:  # consecutive headers share one listing
                current = []
            listings[int(header[1]), int(header[2])] = current
        elif line and not line.startswith("#"):
            assert current is not None, f"{path}: listing line before any header: {line}"
            current.append(line)
    return {key: "\n".join(lines) for key, lines in listings.items()}


LISTINGS = read_listings(WIRING)
BLOCK_TYPES = sorted(LISTINGS)

_LINE = re.compile(r"^(?P<name>\S+)(?P<an> AN)? <- (?P<op>.+?)(?: \| res (?P<res>.+))?$")


def parse_listing(text: str) -> list[dict]:
    """One dict per node, in order: name, an (bool), op, res (the op input where the listing gives none)."""
    nodes = []
    for line in text.strip().splitlines():
        m = _LINE.match(line)
        assert m, f"bad listing line: {line}"
        nodes.append({"name": m["name"], "an": bool(m["an"]), "op": m["op"], "res": m["res"] or m["op"]})
    return nodes


def make_block(dims: int, rs: int, norm: str = "an") -> tuple[AOGBlock, int]:
    """A small block of the given type, with uneven input slices (cin = 4 dims + 1) to catch slice mistakes."""
    torch.manual_seed(0)
    cin, cout = 4 * dims + 1, 8 * dims
    norms = make_norm_layers("test", norm, [10])
    return AOGBlock(cin, cout, build_aog(dims, rs), norms, norms.stages[0]).train(), cin


def op_names(block: AOGBlock) -> dict[str, str]:
    """Module key of every node op -> its name in the listing notation (read from the built block's ops)."""
    return {n.key: n.name for n in block.aog.nodes}


# ---------------------------------------------------------------------------------------------------
# Symbolic check: the block's torch.fx graph, rendered in the listing notation.
# ---------------------------------------------------------------------------------------------------


class _NodeOpLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, NodeOp) or super().is_leaf_module(m, qualname)


def traced_wiring(block: AOGBlock, cin: int) -> list[tuple[str, str, str]]:
    """``(node name, op input, residual input)`` of every node-op call in the traced graph, in call order."""
    graph = _NodeOpLeafTracer().trace(block)
    names = op_names(block)
    bounds = slice_bounds(cin, block.aog.dims)
    primitive_of = {b: i for i, b in enumerate(bounds)}

    def render(n) -> str:
        if isinstance(n, (int, float)):
            return repr(n)
        if n.op == "placeholder":
            return "x"
        if n.op == "call_module" and n.target.startswith("nodes."):
            return names[n.target.split(".", 1)[1]]
        if n.op == "call_function" and n.target is operator.getitem:
            src, (rows, cols) = n.args
            assert render(src) == "x" and rows == slice(None) and cols.step is None, n.format_node()
            return f"x[{primitive_of[cols.start]}-{primitive_of[cols.stop] - 1}]"
        if n.op == "call_function" and n.target is torch.cat:
            parts, dim = n.args
            assert dim == 1, n.format_node()
            return f"cat({', '.join(render(p) for p in parts)})"
        if n.op == "call_function" and n.target is operator.mul:
            t, s = n.args
            assert s == 0.5, n.format_node()
            return f"½{render(t)}"
        if n.op == "call_function" and n.target is operator.add:
            a, b = n.args
            return f"{render(a)} + {render(b)}"
        raise AssertionError(f"unexpected operation in the block's graph: {n.format_node()}")

    calls = []
    for n in graph.nodes:
        if n.op == "call_module" and n.target.startswith("nodes."):
            u, r = n.args
            calls.append((names[n.target.split(".", 1)[1]], render(u), render(r)))
    return calls


@pytest.mark.parametrize(("dims", "rs"), BLOCK_TYPES)
def test_traced_block_follows_listing(dims, rs):
    """Every node's op input, residual input, ½ scaling and concat/sum order, as the block's graph computes them."""
    block, cin = make_block(dims, rs)
    expected = parse_listing(LISTINGS[(dims, rs)])
    got = traced_wiring(block, cin)
    assert [g[0] for g in got] == [e["name"] for e in expected], "evaluation order"
    for (name, op, res), e in zip(got, expected):
        assert op == e["op"], f"{name}: op input"
        assert res == e["res"], f"{name}: residual input"


@pytest.mark.parametrize(("dims", "rs"), BLOCK_TYPES)
def test_an_sits_at_the_listed_nodes(dims, rs):
    block, _ = make_block(dims, rs)
    names = op_names(block)
    got = {names[k] for k, op in block.nodes.items() if isinstance(op.bn2, an.AttentiveNorm2d)}
    assert got == {e["name"] for e in parse_listing(LISTINGS[(dims, rs)]) if e["an"]}
    other_norms = [m for op in block.nodes.values() for m in (op.bn1, op.bn3)]
    assert not any(isinstance(m, an.AttentiveNorm2d) for m in other_norms)


# ---------------------------------------------------------------------------------------------------
# Numeric check: the eager forward's node-op inputs equal the listing evaluated on the node outputs.
# ---------------------------------------------------------------------------------------------------

_TERM = re.compile(r"^(½)?(\S+)$")


def evaluate(expr: str, x: Tensor, bounds: list[int], outs: dict[str, Tensor]) -> Tensor:
    """A listing expression (sum of terms; a term is a node, ½node, x[a-b] or cat(...)) on actual tensors."""

    def term(t: str) -> Tensor:
        m = _TERM.match(t)
        assert m, t
        scale = 0.5 if m[1] else 1.0
        if m[2].startswith("x["):
            a, b = map(int, m[2][2:-1].split("-"))
            return x[:, bounds[a] : bounds[b + 1]]
        return scale * outs[m[2]]

    total = None
    for part in expr.split(" + "):
        value = torch.cat([term(t) for t in part[4:-1].split(", ")], 1) if part.startswith("cat(") else term(part)
        total = value if total is None else total + value
    return total


@pytest.mark.parametrize(("dims", "rs"), [(2, 1), (4, 1), (4, 2)])
def test_block_forward_follows_listing(dims, rs):
    block, cin = make_block(dims, rs)
    names = op_names(block)
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    outs: dict[str, Tensor] = {}

    def pre_hook(module, args):
        seen[names[module.hook_key]] = tuple(a.clone() for a in args)

    def hook(module, args, y):
        outs[names[module.hook_key]] = y.clone()

    for key, op in block.nodes.items():
        op.hook_key = key
        op.register_forward_pre_hook(pre_hook)
        op.register_forward_hook(hook)
    x = torch.randn(2, cin, 6, 6)
    block(x)
    bounds = slice_bounds(cin, dims)
    for e in parse_listing(LISTINGS[(dims, rs)]):
        u, r = seen[e["name"]]
        torch.testing.assert_close(u, evaluate(e["op"], x, bounds, outs), msg=f"{e['name']}: op input")
        torch.testing.assert_close(r, evaluate(e["res"], x, bounds, outs), msg=f"{e['name']}: residual input")
        if e["res"] != e["op"]:  # the two inputs really differ (the listing's res notes are not no-ops here)
            assert not torch.allclose(u, r), e["name"]


# ---------------------------------------------------------------------------------------------------
# The official node tables; counts, widths, determinism.
# ---------------------------------------------------------------------------------------------------


def _official_node_tables() -> dict[str, dict[str, list[dict]]]:
    with gzip.open(LAYOUTS, "rt") as f:
        models = json.load(f)["models"]
    return {row: m["aog_nodes"] for row, m in models.items() if "aog_nodes" in m}


def test_grammar_ids_match_the_official_node_tables():
    """Our creation order (node ids) reproduces the official ids of every block of every released AOGNet."""
    tables = _official_node_tables()
    assert set(tables) == {"aog12bn", "aog12an", "aog40bn", "aog40an"}
    for row, blocks in tables.items():
        for block_path, table in blocks.items():
            stage = int(re.match(r"stage(\d)\.", block_path)[1])
            aog = build_aog((2, 2, 4, 4)[stage], (1, 2, 1, 2)[stage])
            ours = [
                {"id": n.id, "type": n.kind, "span": [n.start, n.end], "split": n.split if n.kind == AND else None}
                for n in aog.nodes
            ]
            assert ours == table, f"{row} {block_path}"


def test_node_counts_and_names():
    for dims, total, kinds in [(2, 7, {T: 3, AND: 1, OR: 3}), (4, 21, {T: 8, AND: 5, OR: 8})]:
        for rs in (1, 2):
            aog = build_aog(dims, rs)
            assert len(aog.nodes) == total == len(aog.order) == len(set(aog.order))
            assert {k: sum(n.kind == k for n in aog.nodes) for k in (T, AND, OR)} == kinds
    assert build_aog(4, 1).by_name("AND[0-3]/1").key == "and0_3s1"


def test_child_order_rules():
    # 'natural' = left before right everywhere; 'official' reverses exactly the two concats of the listings.
    nat = build_aog(4, 2, child_order="natural")
    kids = nat.by_name("AND[2-3]/1").children
    assert [nat.nodes[c].name for c in kids] == ["OR[2-2]", "OR[3-3]"]
    assert legacy_set_order([15, 7]) == [7, 15] and legacy_set_order([4, 5]) == [4, 5]
    for rs, reversed_node in [(1, "AND[1-3]/1"), (2, "AND[2-3]/1")]:
        off = build_aog(4, rs)
        flipped = [n.name for n in off.nodes if n.kind == AND and off.nodes[n.children[0]].start > n.start]
        assert flipped == [reversed_node]
    assert len(build_aog(8, 0, child_order="natural").nodes) > 0  # larger grids work with natural order
    with pytest.raises(ValueError, match="child_order='natural'"):
        build_aog(8, 0)
    with pytest.raises(ValueError, match="remove_symmetric"):
        build_aog(4, 3)


def test_widths_and_slices():
    assert slice_bounds(10, 4) == [0, 3, 6, 8, 10]  # remainder to the first slices
    assert block_widths(448, 896, 3, 4) == [596, 744, 896]
    for name, widths in [
        ("aognet12m", [[80, 128], [192, 256], [384, 512], [824]]),
        ("aognet40m", [[140, 224], [336, 448], [596, 744, 896], [1400]]),
    ]:
        with torch.device("meta"):
            m = create_model(name)
        got = [[b.norm.num_features for b in getattr(m, f"stage{s + 1}") if isinstance(b, AOGBlock)] for s in range(4)]
        assert got == widths
        assert m.stage2.transition[3].stride == 2 and not hasattr(m.stage1, "transition")


def test_build_is_deterministic():
    kw = {"filter_list": (8, 16, 24, 32, 48)}
    builds = []
    for _ in range(2):
        torch.manual_seed(3)
        builds.append(create_model("aognet12m", "an", num_classes=4, **kw))
    a, b = builds
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    keys = list(a.stage3.block1.nodes)
    assert keys[:8] == ["t0_3", "t0_0", "t1_3", "t2_3", "t2_2", "t1_1", "t3_3", "t0_1"] and keys[-1] == "or0_3"


def test_node_op_shapes():
    norms = make_norm_layers("t", "bn", [1])
    op = NodeOp(16, 40, norms.norm, norms.norm, norms.shortcut)
    assert op.conv1.out_channels == 10 and op.shortcut is not None
    assert NodeOp(618, 618, norms.norm, norms.norm, norms.shortcut).conv1.out_channels == 155  # 154.5 rounds up
    assert NodeOp(8, 8, norms.norm, norms.norm, norms.shortcut).shortcut is None
