"""The graph view captured with torch.export: calls, names, edges, the model left untouched, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from quantrain import QATQuantizer
from quantrain.graph import CallKind, CaptureError, capture


def _names(graph):
    return [call.name for call in graph.calls]


def test_a_chain_gives_one_call_per_module_with_its_edges():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))
    graph = capture(model, torch.randn(1, 1, 5, 5))
    assert _names(graph) == ["input_0", "0", "1", "2", "3", "4", "output"]
    conv, bn = graph.find("0"), graph.find("1")
    assert conv.kind is CallKind.MODULE and conv.module_type is nn.Conv2d and conv.aten == ("conv2d",)
    assert conv.inputs == [graph.calls[0]] and conv.users == [bn] and bn.inputs == [conv]
    assert graph.find("output").inputs == [graph.find("4")]


class SharedReLU(nn.Module):
    """torchvision's BasicBlock style: one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.relu = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Tanh())

    def forward(self, x):
        return self.block(self.block(x))


def test_a_module_called_twice_gives_two_calls_each_with_its_index():
    graph = capture(SharedReLU(), torch.randn(1, 2, 3, 3))
    assert _names(graph) == ["input_0", "conv1", "relu", "conv2", "add:0", "relu@1", "output"]
    assert graph.call_counts() == {"conv1": 1, "relu": 2, "conv2": 1}
    assert [c.index for c in graph.module_calls("relu")] == [0, 1]
    assert graph.find("relu@1").inputs == [graph.find("add:0")]
    nested = capture(Twice(), torch.randn(2, 4))  # the children of a block called twice are called twice too
    # a module without parameters (Tanh) shows its op, counted across the calls of its scope
    assert _names(nested) == [
        "input_0",
        "block.0",
        "block.1",
        "block.2.tanh:0",
        "block.0@1",
        "block.1@1",
        "block.2.tanh:1",
        "output",
    ]
    assert nested.find("block.0@1").inputs == [nested.find("block.2.tanh:0")]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = Residual()
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.layer(x)
        z = torch.cat([F.relu6(y), self.act(y), F.hardtanh(y, 0.0, 6.0)], dim=1)
        return z.mean(dim=1)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x) + x
        y += x
        return torch.sigmoid(y) * y


def test_functional_ops_are_named_by_their_scope_op_and_index():
    graph = capture(Functional(), torch.randn(2, 4))
    names = _names(graph)
    assert names == [
        "input_0",
        "layer.fc",
        "layer.add:0",
        "layer.add:1",
        "layer.sigmoid:0",
        "layer.mul:0",
        "relu6:0",
        "act",
        "hardtanh:0",
        "cat:0",
        "mean:0",
        "output",
    ]
    second = graph.find("layer.add:1")
    assert second.target == "add_" and second.in_place and second.op_type == "add" and second.scope == "layer"
    assert second.inputs == [graph.find("layer.add:0"), graph.calls[0]]
    assert graph.find("hardtanh:0").constants == (0.0, 6.0)
    assert graph.find("act").aten == ("hardtanh",)  # nn.ReLU6 is a unit: its op stays inside it
    assert graph.find("cat:0").inputs == [graph.find("relu6:0"), graph.find("act"), graph.find("hardtanh:0")]


def test_units_keep_a_module_with_children_as_one_call():
    graph = capture(Functional(), torch.randn(2, 4), units=frozenset({"layer"}))
    assert _names(graph)[:3] == ["input_0", "layer", "relu6:0"]
    assert graph.find("layer").aten == ("linear", "add", "add_", "sigmoid", "mul")


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [
            (name, m.training, sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
            for name, m in model.named_modules()
        ],
    )


def test_capturing_leaves_the_model_exactly_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Dropout(0.5))
    model[0].eval()  # a mixed training state must survive too
    state, modules = _snapshot(model)
    capture(model, torch.randn(4, 1, 5, 5))
    after_state, after_modules = _snapshot(model)
    assert after_modules == modules
    assert state.keys() == after_state.keys() and all(torch.equal(state[k], after_state[k]) for k in state)
    assert model[1].num_batches_tracked.item() == 0


class Output:
    """Not a pytree: export could not return it, capture must not care."""

    def __init__(self, logits, extra):
        self.logits, self.extra = logits, extra


class KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return {"out": Output(self.head(hidden), hidden), "hidden": hidden}


def test_keyword_inputs_and_outputs_that_are_no_pytree():
    ids = torch.randint(0, 10, (2, 5))
    graph = capture(KeywordModel(), {"input_ids": ids, "attention_mask": torch.ones(2, 5)})
    assert _names(graph) == ["input_0", "input_1", "embed", "unsqueeze:0", "mul:0", "head", "output"]
    assert graph.find("mul:0").inputs == [graph.find("embed"), graph.find("unsqueeze:0")]
    assert graph.find("output").inputs == [graph.find("mul:0")]  # `hidden` is all the dict holds as a tensor


def test_a_forward_checking_its_input_size_is_captured():
    model, example = zoo.mnist_cnn()
    graph = capture(model, example)
    modules = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten:0", "fc1", "relu3", "fc2"]
    assert _names(graph) == ["input_0", *modules, "output"]
    with pytest.raises(
        CaptureError, match=r"could not capture the graph of MnistCnn with torch.export \(ValueError: expected 28x28"
    ):
        capture(model, torch.randn(2, 1, 32, 32))


def test_a_quantized_model_is_captured_as_its_float_graph_and_tracks_nothing():
    model, example = zoo.mnist_cnn()
    float_graph = capture(model, example)
    config = [{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight", "_output_"]}]
    QATQuantizer(model, config, fuse="auto", example_inputs=example)
    model(example)
    state = copy.deepcopy(model.state_dict())
    graph = capture(model, example)
    assert _names(graph) == _names(float_graph)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in state.items())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_what_cannot_be_captured_says_why_and_what_to_do():
    with pytest.raises(CaptureError, match=r"^could not capture the graph of DataDependent with torch.export \(\w+") as caught:
        capture(DataDependent(), torch.randn(1, 2))
    assert isinstance(caught.value, ValueError) and "example inputs" in str(caught.value)
    with pytest.raises(TypeError, match=r"^example_inputs must be a tensor, a tuple or list .* got str"):
        capture(DataDependent(), "x")


def _eager_call_counts(model, example):
    """Independent reference: how many times each module without children that is a unit (one with parameters or
    buffers of its own, or a ReLU, pooling, flatten, identity or dropout) runs, by forward hooks."""
    from quantrain.graph.capture import LEAF_UNITS

    counts = {}
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)

    def counter(name):
        return lambda module, args, output: counts.__setitem__(name, counts.get(name, 0) + 1)

    def unit(module):
        own = list(module.parameters(recurse=False)) or list(module.buffers(recurse=False))
        return not list(module.children()) and (own or isinstance(module, LEAF_UNITS))

    leaves = [module for module in model.modules() if unit(module)]
    handles = [module.register_forward_hook(counter(names[id(module)])) for module in leaves]
    try:
        with torch.no_grad():
            zoo.run(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_is_captured_with_every_module_call(name):
    model, example = zoo.build(name)
    graph = capture(model, example)
    expected = _eager_call_counts(model, example)
    # A module whose forward runs no ATen op that computes a tensor (an Identity, a Dropout at p=0) has no node.
    empty = {n for n in expected if not any(True for c in graph.module_calls(n))}
    for module_name in empty:
        module = model.get_submodule(module_name)
        assert isinstance(module, (nn.Identity, nn.Dropout)), f"{name}: {module_name} ({type(module).__name__}) is missing"
    assert graph.call_counts() == {n: c for n, c in expected.items() if n not in empty}


class Indexing(nn.Module):
    def forward(self, x):
        return x[:, 1:3, 0] * 2.0, F.pad(x, (1, 1)).float()


def test_one_torch_call_is_one_op_whatever_aten_ops_it_runs():
    graph = capture(Indexing(), torch.randn(2, 4, 3))
    assert _names(graph) == ["input_0", "getitem:0", "mul:0", "pad:0", "float:0", "output"]
    assert graph.find("getitem:0").aten == ("slice", "select") and graph.find("getitem:0").inputs == [graph.calls[0]]
    assert graph.find("pad:0").constants == ([1, 1],)
