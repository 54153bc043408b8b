"""torch.quantile's linear interpolation by selection instead of sorting.

torch.quantile sorts the whole input and refuses more than 2**24 elements (sd-scripts#1485);
two order statistics (kthvalue) give the same value in O(n) and work at any size.
"""

from __future__ import annotations

import torch


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a flat tensor with torch.quantile's default ('linear') semantics.

    The arithmetic is done in the tensor's dtype, the way torch.quantile does it, so the
    result equals torch.quantile(values, q) where that works.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    position = torch.tensor(q, dtype=flat.dtype, device=flat.device) * (n - 1)
    below = int(position.floor().item())
    above = int(position.ceil().item())
    value_below = torch.kthvalue(flat, below + 1).values
    value_above = value_below if above == below else torch.kthvalue(flat, above + 1).values
    return torch.lerp(value_below, value_above, position - below)
