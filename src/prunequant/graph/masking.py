"""Where a site's :class:`~prunequant.prune.mask.ChannelMask` goes into the traced graph.

After the site's activation (gathering statistics), after tied depthwise activations and a group's
member outputs (the same mask, no statistics), at a group's statistics points (its row), and inside
every LayerNorm over the site's channels: such a LayerNorm becomes
:func:`~prunequant.prune.mask.masked_layer_norm`, computed on the kept channels, which is what the
physically smaller network computes (:func:`prunequant.graph.shrink` turns it back into
``F.layer_norm`` with the kept parameters).
"""

from __future__ import annotations

from torch import fx

from ..prune.mask import masked_layer_norm
from .ops import arg
from .plan import Site


def place_mask(gm: fx.GraphModule, site: Site, inserts: list[tuple], layer_norms: list[fx.Node]) -> None:
    """Insert the calls of ``site.mask`` at ``inserts`` (``(node, collect[, dim])``) and mask
    ``layer_norms``."""
    graph = gm.graph
    for node, collect, *dim in inserts:
        with graph.inserting_after(node):
            # Tied (depthwise) points and a group's member outputs reuse the module without gathering
            # statistics (collect=False); a group's points pass their row; dim: a channels-last tensor.
            args = (node,) if collect is True and not dim else (node, collect, *dim)
            new = graph.call_module(site.mask, args)
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    for ln in layer_norms:
        with graph.inserting_before(ln):
            mask = graph.get_attr(f"{site.mask}.mask")
            if ln.op == "call_module":
                m = gm.get_submodule(str(ln.target))
                w = graph.get_attr(f"{ln.target}.weight") if m.weight is not None else None
                b = graph.get_attr(f"{ln.target}.bias") if m.bias is not None else None
                args = (ln.args[0], tuple(m.normalized_shape), w, b, m.eps, mask)
            else:
                args = (ln.args[0], tuple(arg(ln, 1, "normalized_shape")), arg(ln, 2, "weight"),
                        arg(ln, 3, "bias"), arg(ln, 4, "eps", 1e-5), mask)
            new = graph.call_function(masked_layer_norm, args)
        new.meta.update(ln.meta)
        ln.replace_all_uses_with(new)
        graph.erase_node(ln)


__all__ = ["place_mask"]
