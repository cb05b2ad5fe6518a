"""TensorRT LoRA refit with fused weights: the CPU-side logic (no TensorRT result is faked).

What TensorRT itself does with these lists (which weights it fused, whether the refit then
succeeds) is checked on a GPU host only: tests/test_lora.py::test_tensorrt_refit_supplies_fused_partner_weights.
Here: which of the refitter's missing names get supplied, where their values come from (the
values being refitted, else the engine's own graph file, read as stored), and the error that
names what cannot be supplied.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from sdopt.engines.trt import PARTNER_ROUNDS, missing_partners_error, partners_to_supply
from sdopt.runtime.lora_refit import base_values, partner_values


def test_partners_to_supply_sorts_missing_names():
    plan = partners_to_supply(
        ["b.bias", "", "w.weight", "b.bias", "folded_const", "", "c.bias"],
        given={"w.weight"},
        refittable={"w.weight", "b.bias", "c.bias"},
    )
    assert plan.supply == ["b.bias", "c.bias"]  # refitter order, once, without those already given
    assert plan.unnamed == 2
    assert plan.unknown == ["folded_const"]
    assert partners_to_supply([], set(), {"a"}).supply == []
    assert PARTNER_ROUNDS >= 2  # a partner's own partners get a round too


def test_partner_values_prefers_the_values_being_refitted():
    current = {"w": np.full(3, 2.0, np.float32)}
    asked: list[set[str]] = []

    def base(names: set[str]) -> dict[str, np.ndarray]:
        asked.append(set(names))
        return {n: np.zeros(3, np.float32) for n in names if n != "nowhere"}

    got = partner_values(["w", "b", "nowhere"], current, base)
    assert asked == [{"b", "nowhere"}]  # only what the refit does not set is read
    assert got["w"] is current["w"] and not got["b"].any()
    assert "nowhere" not in got  # left out: the refit then fails naming it
    assert partner_values(["w"], current, base) == {"w": current["w"]} and len(asked) == 1


def test_base_values_are_the_graph_initializers_as_stored(tiny_artifact):
    """A GEMM bias (the usual fused partner) read from model.onnx equals what onnx reads."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    graph = tiny_artifact("tiny") / "unet" / "model.onnx"
    model = onnx.load(str(graph))  # the tiny graph keeps its weights inline
    want = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    biases = sorted(n for n in want if n.endswith("to_out.0.bias"))[:2]
    assert biases, "the tiny U-Net graph names its attention output biases"
    got = partial(partner_values, current={}, base=partial(base_values, graph))(biases + ["not-in-graph"])
    assert sorted(got) == biases
    for name in biases:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])


def test_missing_partners_error_names_what_cannot_be_supplied():
    err = missing_partners_error(["a.bias", "", "a.bias", ""], supplied=["x.bias"])
    assert "a.bias and 2 unnamed weight(s)" in err.problem
    assert "after 1 fused partner weight(s) were supplied" in err.problem
    assert "--refittable" in err.fix and "--lora" in err.fix
    many = missing_partners_error([f"w{i}" for i in range(11)], supplied=[])
    assert "w7 and 3 more" in many.problem and "after" not in many.problem
