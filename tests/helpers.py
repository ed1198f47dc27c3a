"""Random inputs and encodings for the op tests (never zeros)."""
from __future__ import annotations

import math

import pytest

import torch

from pyquant.ops import _reference as ref


def rand_input(shape, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    # heavy tail so that clipping happens on both ends
    x += torch.distributions.Laplace(0.0, 1.0).sample(shape) * (torch.rand(shape, generator=g) < 0.05)
    return x.to(dtype).to(device)


def activation(x, lo, hi):
    """The torch module a fused activation stands for: ReLU for (0, None or inf), else Hardtanh(lo, hi)."""
    if hi is None or hi == float("inf"):
        return torch.relu(x)
    return torch.nn.functional.hardtanh(x, lo, hi)


def rand_params(x, s_shape, bitwidth, signed, seed=1):
    """Scales that put most of x inside the grid (some clipping), and integer offsets on the grid."""
    g = torch.Generator().manual_seed(seed)
    n_levels = 2**bitwidth - 1
    span = 2.0 * float(x.float().abs().amax()) if x.numel() else 1.0
    base = max(span / n_levels, 1e-6)
    s = base * (0.5 + torch.rand(s_shape, generator=g))
    if signed:
        o = torch.zeros(s_shape)
    else:
        o = -torch.randint(0, 2**bitwidth, s_shape, generator=g).float()
    return s.to(x.device), o.to(x.device)


def grid(bitwidth, signed):
    if signed:
        return -(2 ** (bitwidth - 1)), 2 ** (bitwidth - 1) - 1
    return 0, 2**bitwidth - 1


def block_shape(shape, blocks):
    return tuple(n // b for n, b in zip(shape, blocks))


def lsq_scale(numel, nscale, qmax):
    return 1.0 / math.sqrt(max(numel // nscale, 1) * qmax)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is plenty, and on a busy machine OpenMP's barriers would dominate.
    Use as `from helpers import one_thread` plus `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fashion_mnist_or_skip():
    """(trained Fashion-MNIST CNN, train images, test images, test labels), or skip the test when the
    data set is not installed."""
    from pyquant._assets import AssetMissingError
    try:
        from pyquant.datasets.fashion_mnist import fashion_mnist_tensors
        from pyquant.models import fashion_cnn
        model = fashion_cnn()
        xtr, _ = fashion_mnist_tensors("train")
        xte, yte = fashion_mnist_tensors("test")
    except AssetMissingError as exc:
        pytest.skip(str(exc))
    return model, xtr, xte, yte


def ds_tolerance(g, x, s, o, qmin, qmax, s_shape):
    """Bound for the reduction error of ds/do: 1e-5 (about 80 float32 ulps) of the sum of |terms| that the
    kernel adds up, each term taken from the reference's own per-element derivatives."""
    _, d_scale, d_offset = ref.fake_quant_derivatives(x, s, o, qmin, qmax)
    t = x.float() / ref.expand(s, x.shape)
    # both derivatives, plus an ulp of t for the division's rounding
    mag = g.float().abs() * (d_scale.abs() + d_offset + t.abs() * 2.0**-23)
    return 1e-5 * ref.reduce_to(mag, s_shape).float() + 1e-12


def assert_onnx_runs_simulation(sim, onnx_path, inputs: dict, step_tol: float = 1e-3, *,
                                 module_weights: bool = False) -> dict[str, torch.Tensor]:
    """Checks that an exported QDQ graph, run as written by onnxruntime, computes `sim.model` segment by
    segment: the graph and the simulation run in lockstep, each segment between quantizers starting in
    the simulation from the graph's own quantized tensors. Asserts that

    * every enabled quantizer the simulation calls is one QuantizeLinear/DequantizeLinear pair in the graph
      (named after the quantizer's module), and the graph quantizes nothing else;
    * each quantizer of the simulation, applied to the graph's input of that pair, gives the pair's output
      bit for bit (same scale, zero point, rounding and clamping);
    * each quantizer's input, computed by the simulation from the graph's upstream tensors, is within
      `step_tol` quantization steps of the graph's (float summation order only);
    * the graph's outputs are the simulation's.

    `module_weights`: the simulation was captured with torch.fx, so its weight quantizers run inside the
    modules (parametrizations) rather than as graph nodes; their QDQ pairs are then counted (one per enabled
    weight quantizer of a module) instead of stepped through, and every segment's input agreeing within
    `step_tol` steps shows that the graph's quantized weights are the simulation's.

    An end-to-end comparison cannot ask for more than float noise before each quantizer: the two runtimes
    add up a matmul in different orders (and write attention, GELU, bias adds with different float ops), so
    a value on a rounding boundary can land one step apart, and every later quantizer sees that step.
    Returns {quantizer name: where its code in the simulation, from its own input, differs from the graph's}:
    the rounding flips of float noise (the simulation run alone equals the graph wherever none came before)."""
    import onnx
    import onnxruntime as ort
    import torch.fx as fx
    from torch.utils import _pytree

    from pyquant.quant import QuantizeDequantize

    model = onnx.load(str(onnx_path))
    pairs: dict[str, dict[str, str]] = {}
    weight_pairs = 0
    for n in model.graph.node:
        parts = n.name.split("/")
        if module_weights and "/weight.0/" in n.name and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            weight_pairs += n.op_type == "QuantizeLinear"  # a parametrization's quantizer, inside its module
            continue
        if n.op_type == "QuantizeLinear" and len(parts) >= 2:
            pairs.setdefault(parts[-2], {})["in"] = n.input[0]
        elif n.op_type == "DequantizeLinear" and len(parts) >= 2:
            pairs.setdefault(parts[-2], {})["out"] = n.output[0]
    present = {o.name for o in model.graph.output}
    for p in pairs.values():
        for name in p.values():
            if name not in present:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                present.add(name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name].detach().cpu().numpy() for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    graph = dict(zip(names, (torch.from_numpy(v) for v in sess.run(None, feeds))))

    seen, flips = [], {}

    class Lockstep(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            mod = self.fetch_attr(target)
            if not (isinstance(mod, QuantizeDequantize) and mod.enabled):
                return super().call_module(target, args, kwargs)
            assert not kwargs, f"{target}: a fused activation has no QDQ pair of its own"
            assert target in pairs and len(pairs[target]) == 2, f"{target} ({mod.name}): no QDQ pair in the graph"
            x, g_in, g_out = args[0], graph[pairs[target]["in"]], graph[pairs[target]["out"]]
            assert g_in.shape == x.shape, (f"{mod.name}: the graph quantizes a {tuple(g_in.shape)} "
                                            f"tensor, the simulation a {tuple(x.shape)} one")
            torch.testing.assert_close(mod(g_in), g_out, rtol=0, atol=0,
                                       msg=lambda m: f"{mod.name}: QDQ differs from the quantizer\n{m}")
            step = mod.get_encoding().scale.reshape(mod.shape)
            err = ((x - g_in).abs() / step).max().item()
            assert err <= step_tol, f"{mod.name}: input {err:.3g} steps from the graph's"
            flips[mod.name] = mod(x) != g_out
            seen.append(target)
            return g_out  # the next segment starts from the graph's tensors

    with torch.no_grad():
        args = [inputs.get(n.target) for n in sim.model.graph.nodes if n.op == "placeholder"]
        outs = _pytree.tree_leaves(Lockstep(sim.model).run(*args))
    assert set(seen) == set(pairs), f"QDQ pairs the simulation does not call: {sorted(set(pairs) - set(seen))}"
    if module_weights:
        in_modules = [n for n, p in sim.placement.items()
                      if p.is_param and p.graph_weight is None and sim.quantizer(n).enabled]
        assert weight_pairs == len(in_modules), f"{weight_pairs} weight QDQ pairs for {len(in_modules)} weight quantizers"
    graph_outs = [graph[o.name] for o in sess.get_outputs()[:len(outs)]]
    for i, (a, b) in enumerate(zip(outs, graph_outs)):
        torch.testing.assert_close(b, a, msg=lambda m, i=i: f"graph output {i}\n{m}")
    return flips
