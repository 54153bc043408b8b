"""torch.quantile's linear interpolation by selection instead of sorting.

torch.quantile sorts the whole input and refuses more than 2**24 elements (sd-scripts#1485);
two order statistics (kthvalue) give the same value in O(n) and work at any size, for one module
or, along the last dimension, for a batch of them.
"""

from __future__ import annotations

import torch


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile along the last dimension, with torch.quantile's default ('linear') semantics.

    A 1-D tensor gives a 0-dim result; (..., n) gives (...), one quantile per row. The arithmetic
    is done in the tensor's dtype, the way torch.quantile does it, so the result equals
    torch.quantile(values, q, dim=-1) where that works.
    """
    n = values.shape[-1] if values.dim() else 1
    if values.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    position = torch.tensor(q, dtype=values.dtype, device=values.device) * (n - 1)
    below = int(position.floor().item())
    above = int(position.ceil().item())
    value_below = torch.kthvalue(values, below + 1, dim=-1).values
    value_above = value_below if above == below else torch.kthvalue(values, above + 1, dim=-1).values
    return torch.lerp(value_below, value_above, position - below)
