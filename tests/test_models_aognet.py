"""AOGNet grammar and network: the wiring of AN_SPEC 5.4, node counts, widths, determinism.

The expected listings below are transcribed from AN_SPEC 5.4 (a torch.fx trace of the reference code), in
evaluation order. Notation: ``<-`` op input, ``; res`` residual input (written out even where it equals the op
input), ``cat(...)`` channel concat in order, ``½X`` X scaled by 0.5, ``AN`` the node's 3x3 norm is AN.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

import an
from models import create_model
from models._norms import make_norm_layers
from models.aognet import AOGBlock, NodeOp, build_aog
from models.aognet.grammar import AND, OR, T, legacy_set_order
from models.aognet.net import block_widths, slice_bounds

D2 = """
T[0-1] AN
T[0-0]
T[1-1]
OR[0-0] <- T[0-0] ; res T[0-0]
OR[1-1] <- T[1-1] + OR[0-0] ; res T[1-1]
AND[0-1]/1 AN <- cat(OR[0-0], OR[1-1]) ; res cat(OR[0-0], OR[1-1])
OR[0-1] AN <- T[0-1] + AND[0-1]/1 ; res T[0-1] + AND[0-1]/1
"""

D4_RS1 = """
T[0-3] AN
T[0-0]
T[1-3]
T[2-3]
T[2-2]
T[1-1]
T[3-3]
T[0-1]
OR[0-0] <- T[0-0] ; res T[0-0]
OR[1-1] <- T[1-1] + OR[0-0] ; res T[1-1]
OR[2-2] <- T[2-2] + OR[1-1] ; res T[2-2]
OR[3-3] <- T[3-3] + OR[2-2] ; res T[3-3]
AND[2-3]/1 <- cat(OR[2-2], OR[3-3]) ; res cat(OR[2-2], OR[3-3])
AND[0-1]/1 <- cat(OR[0-0], OR[1-1]) + AND[2-3]/1 ; res cat(½OR[0-0], ½OR[1-1]) + AND[2-3]/1
OR[0-1] <- T[0-1] + AND[0-1]/1 ; res T[0-1] + AND[0-1]/1
OR[2-3] <- T[2-3] + AND[2-3]/1 + OR[0-1] ; res T[2-3] + AND[2-3]/1
AND[1-3]/1 <- cat(OR[2-3], OR[1-1]) ; res cat(½OR[2-3], ½OR[1-1])
OR[1-3] <- T[1-3] + AND[1-3]/1 ; res T[1-3] + AND[1-3]/1
AND[0-3]/1 AN <- cat(OR[0-0], OR[1-3]) ; res cat(½OR[0-0], OR[1-3])
AND[0-3]/2 AN <- cat(OR[0-1], OR[2-3]) + AND[0-3]/1 ; res cat(OR[0-1], ½OR[2-3]) + AND[0-3]/1
OR[0-3] AN <- T[0-3] + AND[0-3]/1 + AND[0-3]/2 ; res T[0-3] + AND[0-3]/1 + AND[0-3]/2
"""

D4_RS2 = """
T[0-3] AN
T[0-2]
T[0-1]
T[0-0]
T[1-1]
T[3-3]
T[2-2]
T[2-3]
OR[0-0] <- T[0-0] ; res T[0-0]
OR[1-1] <- T[1-1] + OR[0-0] ; res T[1-1]
OR[2-2] <- T[2-2] + OR[1-1] ; res T[2-2]
OR[3-3] <- T[3-3] + OR[2-2] ; res T[3-3]
AND[2-3]/1 <- cat(OR[3-3], OR[2-2]) ; res cat(½OR[3-3], ½OR[2-2])
AND[0-1]/1 <- cat(OR[0-0], OR[1-1]) + AND[2-3]/1 ; res cat(OR[0-0], OR[1-1]) + AND[2-3]/1
OR[0-1] <- T[0-1] + AND[0-1]/1 ; res T[0-1] + AND[0-1]/1
AND[0-2]/2 <- cat(OR[0-1], OR[2-2]) ; res cat(½OR[0-1], ½OR[2-2])
OR[0-2] <- T[0-2] + AND[0-2]/2 ; res T[0-2] + AND[0-2]/2
OR[2-3] <- T[2-3] + AND[2-3]/1 + OR[0-1] ; res T[2-3] + AND[2-3]/1
AND[0-3]/2 AN <- cat(OR[0-1], OR[2-3]) ; res cat(½OR[0-1], OR[2-3])
AND[0-3]/3 AN <- cat(OR[0-2], OR[3-3]) + AND[0-3]/2 ; res cat(OR[0-2], ½OR[3-3]) + AND[0-3]/2
OR[0-3] AN <- T[0-3] + AND[0-3]/3 + AND[0-3]/2 ; res T[0-3] + AND[0-3]/3 + AND[0-3]/2
"""

LISTINGS = {(2, 1): D2, (2, 2): D2, (4, 1): D4_RS1, (4, 2): D4_RS2}


def _term(name: str, scale: float) -> str:
    return ("½" if scale == 0.5 else "" if scale == 1.0 else f"{scale}*") + name


def render(aog) -> str:
    """The grammar in the listing notation, from the grammar's own data."""
    lines = []
    for i in aog.order:
        n = aog.nodes[i]
        head = n.name + (" AN" if aog.is_full(n) else "")
        if n.kind == T:
            lines.append(head)
            continue
        kids = [aog.nodes[c].name for c in n.children]
        lat = [aog.nodes[n.lateral].name] if n.lateral is not None else []
        res_kids = [_term(k, s) for k, s in zip(kids, n.res_scales)]
        if n.kind == AND:
            op = " + ".join([f"cat({', '.join(kids)})", *lat])
            res = " + ".join([f"cat({', '.join(res_kids)})", *lat])
        else:
            op = " + ".join(kids + lat)
            res = " + ".join(res_kids)
        lines.append(f"{head} <- {op} ; res {res}")
    return "\n".join(lines)


@pytest.mark.parametrize(("dims", "rs"), sorted(LISTINGS))
def test_grammar_matches_traced_wiring(dims, rs):
    assert render(build_aog(dims, rs)) == LISTINGS[(dims, rs)].strip()


def test_node_counts_and_names():
    for dims, total, kinds in [(2, 7, {T: 3, AND: 1, OR: 3}), (4, 21, {T: 8, AND: 5, OR: 8})]:
        for rs in (1, 2):
            aog = build_aog(dims, rs)
            assert len(aog.nodes) == total == len(aog.order) == len(set(aog.order))
            assert {k: sum(n.kind == k for n in aog.nodes) for k in (T, AND, OR)} == kinds
    assert build_aog(4, 1).by_name("AND[0-3]/1").key == "and0_3s1"


def test_child_order_rules():
    # 'natural' = left before right everywhere; 'official' reverses exactly the two traced AND nodes.
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


_TERM = re.compile(r"^(½)?(\S+)$")


def _parse(expr: str) -> list[list[tuple[float, str]]]:
    """'A + cat(½B, C)' -> [[(1, 'A')], [(0.5, 'B'), (1, 'C')]] (a sum of concats)."""
    out = []
    for part in expr.split(" + "):
        items = part[4:-1].split(", ") if part.startswith("cat(") else [part]
        out.append([(0.5 if m[1] else 1.0, m[2]) for m in map(_TERM.match, items)])
    return out


def _evaluate(expr: str, outs: dict[str, Tensor]) -> Tensor:
    return sum(torch.cat([s * outs[n] for s, n in cat], 1) for cat in _parse(expr))


@pytest.mark.parametrize(("dims", "rs"), [(2, 1), (4, 1), (4, 2)])
def test_block_forward_follows_listing(dims, rs):
    """Each node op receives exactly the listing's op and residual inputs (checked on tensors, via hooks)."""
    torch.manual_seed(0)
    aog = build_aog(dims, rs)
    cin, cout = 4 * dims, 8 * dims
    norms = make_norm_layers("test", "an", [10])
    block = AOGBlock(cin, cout, aog, norms, norms.stages[0]).train()
    names = {aog.nodes[i].key: aog.nodes[i].name for i in aog.order}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    outs: dict[str, Tensor] = {}
    order: list[str] = []

    def pre_hook(module: NodeOp, args: tuple[Tensor, Tensor]) -> None:
        seen[module.node_name] = args

    def hook(module: NodeOp, args: tuple[Tensor, Tensor], y: Tensor) -> None:
        outs[module.node_name] = y
        order.append(module.node_name)

    for key, op in block.nodes.items():
        op.node_name = names[key]
        op.register_forward_pre_hook(pre_hook)
        op.register_forward_hook(hook)
    x = torch.randn(2, cin, 6, 6)
    block(x)
    lines = LISTINGS[(dims, rs)].strip().splitlines()
    assert order == [ln.split()[0] for ln in lines]
    in_b = slice_bounds(cin, dims)
    for line in lines:
        name = line.split()[0]
        node = aog.by_name(name)
        is_an = isinstance(block.nodes[node.key].bn2, an.AttentiveNorm2d)
        assert is_an == (" AN" in line.split("<-")[0]), name
        u, r = seen[name]
        if "<-" not in line:  # T-node: its input slice
            torch.testing.assert_close(u, x[:, in_b[node.start] : in_b[node.end + 1]])
            assert r is u
            continue
        op_expr, res_expr = line.split(" <- ")[1].split(" ; res ")
        torch.testing.assert_close(u, _evaluate(op_expr, outs), msg=f"{name}: op input")
        torch.testing.assert_close(r, _evaluate(res_expr, outs), msg=f"{name}: residual input")


def test_node_op_shapes():
    norms = make_norm_layers("t", "bn", [1])
    op = NodeOp(16, 40, norms.norm, norms.norm, norms.shortcut)
    assert op.conv1.out_channels == 10 and op.shortcut is not None
    assert NodeOp(618, 618, norms.norm, norms.norm, norms.shortcut).conv1.out_channels == 155  # 154.5 rounds up
    assert NodeOp(8, 8, norms.norm, norms.norm, norms.shortcut).shortcut is None
