"""Replay a module's forward as CUDA graphs, one per input signature (a text encoder: one per padded length).

Why: a text encoder runs a few hundred tokens through a few hundred linears. Each fp8 linear then costs more host
time (Python, the dispatcher, the launches) than GPU work (bench/NOTES.md has the figures), so the encoder spends
most of its time launching kernels. A CUDA graph records one forward's kernels once and replays them with one launch.

What makes a graph valid, and what is checked before each replay:
- the same input signature: tensor shapes, dtypes and devices, and the non-tensor arguments, exactly;
- the same parameters: every parameter and buffer of the module at the address it had when captured, on the
  input's GPU (a model moved, offloaded or LoRA-patched gets new graphs, or runs eagerly where it is not all on
  the GPU);
- no per-call weight functions (ComfyUI's lowvram patches) on any submodule.
Otherwise the forward runs as usual. The first call of a signature captures its graph (after a warm-up run on a
side stream, whose output it returns), so a signature seen twice already pays. Outputs are copied out of the
graph's memory, so a later replay cannot change what a caller holds. A forward that cannot be captured (host
synchronisation inside it) is logged once and runs eagerly from then on. ``ignored``: keyword arguments the forward
does not read (ComfyUI's T5 takes ``num_tokens`` and ignores it): left out of the signature, so prompts of one
padded length share a graph.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import prepared

logger = logging.getLogger(__name__)

MAX_GRAPHS = 8  # per module: prompt lengths in use at once (each graph holds its activations' memory)


class GraphedForward:
    """A callable that stands in for ``module.forward``: eager where a graph cannot serve, else a replay."""

    def __init__(
        self,
        module: nn.Module,
        forward: Callable[..., Any] | None,
        max_graphs: int = MAX_GRAPHS,
        ignored: tuple = (),
        ready: Callable[[], str | None] | None = None,
        max_captures_in_a_row: int | None = None,
        may_hold: Callable[[int], bool] | None = None,
    ) -> None:
        """``forward``: what ``__call__`` runs (``run`` takes one per call instead); ``ready``: a reason not to
        capture or replay now (e.g. layers still calibrating), or ``None``; ``max_captures_in_a_row``: give up
        (until ``drop``) when that many calls in a row each needed a new graph, inputs that never repeat;
        ``may_hold(bytes)``: whether a new graph may hold that much memory in its inputs and outputs (the bytes of
        its tensor inputs, twice); where not, give up until ``drop``."""
        self.module = module
        self.forward = forward
        self.max_graphs = max_graphs
        self.ignored = frozenset(ignored)
        self.ready = ready
        self.max_captures_in_a_row = max_captures_in_a_row
        self.may_hold = may_hold
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.weights: tuple | None = None
        self.pool = None
        self.disabled = False  # a capture failed: this forward cannot be captured, it runs eagerly from now on
        self.failure = ""  # why, with the capture's error
        self.gave_up: str | None = None  # inputs that do not repeat: eager until ``drop``
        self.reason: str | None = None  # why the last call ran eagerly (``None``: it captured or replayed)
        self.replays = 0
        self.captures = 0
        self._captures_in_a_row = 0
        self.previous: Callable[..., Any] | None = None  # an instance forward the module had before

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.forward, *args, **kwargs)

    def run(self, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``forward(*args, **kwargs)``, replayed from a graph where one serves (captured the first time)."""
        if self.ignored:
            kwargs = {key: value for key, value in kwargs.items() if key not in self.ignored}
        leaves, spec = pytree.tree_flatten((args, kwargs))
        device = next((leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor)), None)
        reason, weights = self._why_eager(device)
        self.reason = reason
        if reason is not None:
            return forward(*args, **kwargs)
        if weights != self.weights:  # moved or patched: old graphs point at old memory
            self.graphs.clear()
            self.weights = weights
        key = (spec, torch.is_inference_mode_enabled(), *(_leaf_key(leaf) for leaf in leaves))
        graph = self.graphs.get(key)
        if graph is None:
            captured = self._capture(forward, key, leaves, spec, device)
            if captured is None:
                return forward(*args, **kwargs)
            self.weights = self._weights(device)[0]  # the warm-up may have prepared layers' calls
            return captured.warmup_output
        self.graphs.move_to_end(key)
        self.replays += 1
        self._captures_in_a_row = 0
        return graph.replay(leaves)

    def _why_eager(self, device: torch.device | None) -> tuple[str | None, tuple | None]:
        """(why this call runs eagerly or ``None``, the parameters' addresses where it may replay)."""
        if self.disabled:
            return self.failure, None
        if self.gave_up is not None:
            return self.gave_up, None
        if device is None or device.type != "cuda":
            return "the inputs are not on a CUDA device", None
        if torch.compiler.is_compiling():
            return "it runs under torch.compile", None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return "gradients are enabled", None
        weights, reason = self._weights(device)
        if reason is not None:
            return reason, None
        not_ready = self.ready() if self.ready is not None else None
        return not_ready, weights

    def drop(self) -> None:
        """Forget the graphs (their memory goes back to the allocator) and start afresh; a forward that could not be
        captured stays eager."""
        self.graphs.clear()
        self.weights, self.pool, self.gave_up = None, None, None
        self._captures_in_a_row = 0

    def _weights(self, device: torch.device) -> tuple[tuple | None, str | None]:
        """(the parameters' addresses, ``None``) where the module can be captured as it is now, else (``None``, why
        not): a tensor elsewhere than ``device``, per-call weight functions (ComfyUI's lowvram patches), or forward
        hooks, whose Python a replay would skip."""
        addresses = []
        for tensor in [*self.module.parameters(), *self.module.buffers()]:
            if tensor.device != device:
                return None, "weights are not all on the GPU (lowvram or offloaded)"
            addresses.append(tensor.data_ptr())
        if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return None, "a global forward hook watches the modules"
        for submodule in self.module.modules():
            if getattr(submodule, "weight_function", None) or getattr(submodule, "bias_function", None):
                return None, "weights are patched per call (lowvram)"
            if submodule._forward_hooks or submodule._forward_pre_hooks:
                return None, "a forward hook watches a layer"
        # Prepared calls replaced since (``prepared.generation``): the derived tensors a graph reads may be freed.
        return (*addresses, prepared.generation()), None

    def _capture(
        self, forward: Callable[..., Any], key: tuple, leaves: list, spec: Any, device: torch.device
    ) -> _Graph | None:
        limit = self.max_captures_in_a_row
        if limit is not None and self._captures_in_a_row >= limit:
            self.gave_up = f"its inputs changed at each of {limit} calls in a row"
            self.reason = self.gave_up
            self.graphs.clear()
            return None
        if self.may_hold is not None:
            held = 2 * sum(leaf.nbytes for leaf in leaves if isinstance(leaf, torch.Tensor))
            if not self.may_hold(held):
                default = "its graphs would hold more GPU memory than allowed (a large step keeps the GPU busy)"
                self.gave_up = self.gave_up or default  # ``may_hold`` may have said why
                self.reason = self.gave_up
                return None
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph = _Graph.capture(forward, leaves, spec, device, self.pool)
        except Exception as error:  # any failure to capture means: run eagerly
            self.disabled = True
            self.failure = f"its forward cannot be captured ({' '.join(str(error).split())[:300]})"
            self.reason = self.failure
            name = type(self.module).__name__
            logger.warning("%s: CUDA graph capture failed (%s); the forward runs eagerly", name, error)
            return None
        self.graphs[key] = graph
        self.captures += 1
        self._captures_in_a_row += 1
        return graph


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs: Any, warmup_output: Any) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        self.warmup_output = warmup_output  # the capturing call's own result (the warm-up's, outside the graph)

    @classmethod
    def capture(cls, forward: Callable, leaves: list, spec: Any, device: torch.device, pool) -> _Graph:
        inputs = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(inputs, spec)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            warmup_output = forward(*args, **kwargs)  # lazy state and kernel choices happen here, not in the graph
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = forward(*args, **kwargs)
        return cls(graph, inputs, outputs, warmup_output)

    def replay(self, leaves: list) -> Any:
        for static, leaf in zip(self.inputs, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        self.graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.outputs)


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return repr(leaf)


def graph_forward(module: nn.Module, max_graphs: int = MAX_GRAPHS, ignored: tuple = ()) -> GraphedForward:
    """Make ``module``'s forward replay CUDA graphs (one per input signature, at most ``max_graphs`` kept; keyword
    arguments in ``ignored`` are not passed on); returns the installed callable (its ``replays`` counts replays).
    Undo with ``ungraph_forward``."""
    current = module.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(module, current or module.forward, max_graphs, ignored)
    graphed.previous = current
    module.forward = graphed
    return graphed


def ungraph_forward(module: nn.Module) -> None:
    """The forward the module had before ``graph_forward`` (its graphs are dropped)."""
    current = module.__dict__.get("forward")
    if isinstance(current, GraphedForward):
        if current.previous is None:
            del module.forward
        else:
            module.forward = current.previous
