"""Symbolic tracing with ``torch.fx`` that keeps the train / eval mode live (see :func:`trace`)."""

from __future__ import annotations

import fnmatch
import sys
from typing import Any

from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import GraphError
from ..prune.mask import ChannelMask
from ..quant.quantizers import ActQuantizer
from .ops import LAYER_TYPES

MODE_ATTR = "training"


def is_mode_node(n: Any) -> bool:
    """True for a ``get_attr`` node reading a module's ``training`` flag at run time (see :func:`trace`)."""
    return isinstance(n, fx.Node) and n.op == "get_attr" and str(n.target).rsplit(".", 1)[-1] == MODE_ATTR


def _mode_flags(n: fx.Node) -> set[str]:
    """Paths of the modules whose ``training`` flag ``n`` is computed from (``""``: the root)."""
    out: set[str] = set()
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if is_mode_node(m):
            out.add(str(m.target).rpartition(".")[0])
        else:
            todo.extend(m.all_input_nodes)
    return out


def _mode_functions() -> tuple[list[Any], list[Any]]:
    """Functions that branch on their mode argument, recorded as one op each, and the modules exposing them.

    torchvision's ``ops.stochastic_depth`` (``if not training: return input``) is wrapped by torchvision
    only where ``StochasticDepth`` calls it; user code calling ``torchvision.ops.stochastic_depth(...,
    self.training)`` or importing it by name reaches it too. Looked up only if torchvision is imported.
    """
    ops = sys.modules.get("torchvision.ops")
    fn = getattr(ops, "stochastic_depth", None)
    if ops is None or not callable(fn):
        return [], []
    return [fn], [m for m in (ops, sys.modules.get("torchvision.ops.stochastic_depth")) if m is not None]


class _ModeBranch(fx.proxy.TraceError):
    """Python control flow on ``self.training`` (``if self.training:``) met while tracing."""

    def __init__(self, flags: set[str]):
        super().__init__("forward() branches on self.training (Python control flow on the train / eval mode)")
        self.flags = flags  # the modules whose flags the condition reads


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps leaves, records the module of each op and keeps the mode live.

    While tracing, every module's ``training`` attribute is a proxy of a ``get_attr`` node reading the
    *GraphModule's* flag at the same path, so ``F.dropout(x, p, self.training)``,
    ``stochastic_depth(..., self.training)`` or ``F.batch_norm(..., training=self.training)`` (also
    with a child's flag, ``self.drop.training``) receive the mode at run time instead of the constant
    it had while tracing. Python control flow on it raises :class:`_ModeBranch` (see :func:`trace`),
    except on the flags in ``frozen``, which are constants (``{module path: flag}``).
    """

    def __init__(self, leaves: set[str] | None = None, frozen: dict[str, bool] | None = None):
        fns, where = _mode_functions()
        super().__init__(autowrap_functions=tuple(fns))
        self._autowrap_search.extend(where)  # also patched there while tracing (fx's own list of modules)
        self.leaves = leaves or set()
        self.frozen = frozen or {}
        self.stack: list[str] = []
        self.failed_at: str | None = None
        self.modes: list[tuple[nn.Module, Any]] = []  # (module, its own flag) while a proxy replaces it

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (ChannelMask, ActQuantizer)) or parametrize.is_parametrized(m):
            return True
        if qualname in self.leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        finally:
            while self.modes:  # the model gets its own flags back whatever happened
                m, was = self.modes.pop()
                m.__dict__[MODE_ATTR] = was

    def create_args_for_root(self, fn, is_module, concrete_args=None):
        out = super().create_args_for_root(fn, is_module, concrete_args)
        if is_module:  # every module's flag, read at its path when the graph runs (unused ones erased)
            for path, m in self.root.named_modules():
                was = m.__dict__.get(MODE_ATTR)
                if not isinstance(was, bool):
                    continue
                self.modes.append((m, was))
                if path in self.frozen:
                    m.__dict__[MODE_ATTR] = self.frozen[path]
                else:
                    target = f"{path}.{MODE_ATTR}" if path else MODE_ATTR
                    m.__dict__[MODE_ATTR] = self.create_proxy("get_attr", target, (), {})
        return out

    def to_bool(self, obj: fx.Proxy) -> bool:
        flags = _mode_flags(obj.node)
        if flags:
            raise _ModeBranch(flags)
        return super().to_bool(obj)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.stack:
            node.meta["pq_module"] = self.stack[-1]  # the module whose forward made this op
        return node

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = path  # the innermost module whose forward raised
            raise
        finally:
            self.stack.pop()


def _holds_layers(m: nn.Module) -> bool:
    """Whether ``m`` is or contains a conv / linear layer."""
    return any(isinstance(s, LAYER_TYPES) for s in m.modules())


def trace(model: nn.Module, exclude: list[str] | tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; a clear :class:`GraphError` when it cannot be traced.

    A submodule that cannot be traced may be named in ``exclude`` (an fnmatch pattern matching its
    path): it is then kept as one opaque call (not pruned, not quantized inside).

    The traced model follows ``.train()`` / ``.eval()`` like the original: every read of a module's
    ``training`` in traced code becomes a ``get_attr`` node of the flag at that module's path in the
    GraphModule (``"training"`` for the root), which ``.train()`` / ``.eval()`` set. Python control
    flow on the mode (``if self.training:``) cannot be recorded that way. A submodule whose
    ``forward`` branches on it is kept as one opaque call (it then runs eagerly with its own flag) when
    it holds no conv / linear layer. Otherwise the flags it branches on are traced as constants, which
    is exact only if the graph is the same with each of them flipped (``if self.training and
    self.aux_logits:`` with ``aux_logits`` False): that is checked by tracing again, and
    :class:`GraphError` names the module when the graphs differ.
    """
    if isinstance(model, fx.GraphModule):
        return model
    leaves: set[str] = set()
    frozen: dict[str, bool] = {}  # flags Python control flow reads: constants, checked below
    branch_at: dict[str, str] = {}  # frozen flag -> the module whose forward branched on it
    for _ in range(100):
        tracer = _Tracer(leaves, frozen)
        try:
            graph = tracer.trace(model)
            break
        except Exception as e:  # fx raises many types; all mean "not traceable"
            where = tracer.failed_at or ""
            branch = isinstance(e, _ModeBranch)
            if where and where not in leaves and (
                    any(fnmatch.fnmatchcase(where, p) for p in exclude)
                    or branch and not _holds_layers(model.get_submodule(where))):
                leaves.add(where)
                continue
            if branch and not e.flags <= frozen.keys():
                for p in e.flags:
                    frozen.setdefault(p, model.get_submodule(p).training)
                    branch_at.setdefault(p, where)
                continue
            raise _untraceable(model, e, where) from e
    for p, value in frozen.items():
        try:
            same = str(_Tracer(leaves, {**frozen, p: not value}).trace(model)) == str(graph)
        except Exception:  # the other mode's branch does not even trace
            same = False
        if not same:
            where = branch_at[p]
            kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
            loc = f"module '{where}' ({kind})" if where else f"{kind}.forward"
            fix = (f" Add '{where}' to prune.exclude to keep it as one opaque block that follows train() / "
                   "eval() (not pruned, not quantized inside), or pass" if where else " Pass")
            holds = " and holds conv / linear layers" if where else ""
            raise GraphError(
                f"cannot trace {type(model).__name__} with torch.fx: {loc} branches on self.training "
                f"(Python control flow on the train / eval mode){holds}, and its graph differs between the "
                f"two modes: one fx graph cannot follow train() / eval() there.{fix} the flag to an op "
                "instead (e.g. F.dropout(x, p, training=self.training))."
            )
    for n in list(graph.nodes):
        if is_mode_node(n) and not n.users:
            graph.erase_node(n)  # modules that never read their flag
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.pq_original_class = type(model).__name__
    gm.pq_leaves = sorted(leaves)
    return gm


def _untraceable(model: nn.Module, e: Exception, where: str) -> GraphError:
    """The error for a model fx cannot trace, naming the innermost module that failed."""
    kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
    loc = f"in module '{where}' ({kind})" if where else f"in {kind}.forward"
    hint = (f" Add '{where}' to prune.exclude to keep that module as one opaque block (not "
            "pruned, not quantized inside)." if where else "")
    return GraphError(
        f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {e} ({loc}). "
        f"Data-dependent control flow in forward() is not supported.{hint}"
    )

