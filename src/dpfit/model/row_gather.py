"""Gather of embedding rows into the padded (atom, neighbor slot) layout, with a cheap backward.

Most slots take their own row of the source (a one-to-one map); padded slots share a few table rows
and a reverse pair's second slot reuses its partner's row. The generic backward of a gather scatters
every slot's gradient; here the one-to-one part is a plain gather with the inverse map and only the
other slots are summed into their rows.
"""

from __future__ import annotations

import torch


class GatherRows(torch.autograd.Function):
    """``out[i, j] = source[index[i, j]]`` where source row r < len(inverse) is used by flat slot
    ``inverse[r]``, and the remaining flat slots ``pad_slots`` use rows ``pad_rows`` (any rows)."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pad_slots: torch.Tensor,
                pad_rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse, pad_slots, pad_rows)
        ctx.n_source = source.shape[0]
        return torch.nn.functional.embedding(index, source)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inverse, pad_slots, pad_rows = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        n_own = inverse.shape[0]
        if torch.is_grad_enabled():  # create_graph: differentiable ops only (a second derivative)
            out = torch.cat([flat.index_select(0, inverse), flat.new_zeros(ctx.n_source - n_own, flat.shape[1])])
            if pad_slots.numel():
                out = out.index_add(0, pad_rows, flat.index_select(0, pad_slots))
            return out, None, None, None, None
        out = flat.new_empty(ctx.n_source, flat.shape[1])
        torch.index_select(flat, 0, inverse, out=out[:n_own])
        out[n_own:].zero_()
        if pad_slots.numel():
            out.index_add_(0, pad_rows, flat.index_select(0, pad_slots))
        return out, None, None, None, None


def gather_rows(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pad_slots: torch.Tensor,
                pad_rows: torch.Tensor) -> torch.Tensor:
    """:class:`GatherRows` while autograd records, else a plain gather (also under TorchScript)."""
    if not torch.jit.is_scripting():
        if torch.is_grad_enabled() and source.requires_grad:
            return _gather_rows_autograd(source, index, inverse, pad_slots, pad_rows)
    return torch.nn.functional.embedding(index, source)


@torch.jit.unused
def _gather_rows_autograd(source: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, pad_slots: torch.Tensor,
                          pad_rows: torch.Tensor) -> torch.Tensor:
    return GatherRows.apply(source, index, inverse, pad_slots, pad_rows)
