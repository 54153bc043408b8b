"""The safetensors format's dtype names, shared by copylora's reader and writer."""

from __future__ import annotations

import torch

# safetensors' dtype names, in the order of its Dtype enum: it writes tensors by dtype, last of
# these first, then by name (tests/test_serialization.py checks this against safetensors itself).
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
