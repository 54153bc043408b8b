"""The registered op torch.ops.copylora.merge_group itself: schema, fake kernel, contract, errors."""

from __future__ import annotations

import pytest
import torch

from copylora.engine import ops, reference
from copylora.engine.jobs import ModuleJob, SvdOptions
from tests.test_engine import requires_ext

pytestmark = requires_ext


def group_args(modules=2, out=12, in_features=20, input_ranks=(3, 2), ranks=(4, 2), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(out, r, generator=gen) for _ in range(modules) for r in input_ranks]
    downs = [torch.randn(r, in_features, generator=gen) for _ in range(modules) for r in input_ranks]
    scales = torch.randn(modules, len(input_ranks), generator=gen)
    return ups, downs, scales, list(ranks)


@pytest.mark.parametrize(
    "args",
    [
        (*group_args(), 0.99, False),
        (*group_args(modules=1, out=6, in_features=40, input_ranks=(8,), ranks=(3,)), 1.0, True),  # dense
        ([], [], torch.zeros(0, 2), [], 0.99, False),
        (*group_args(), 0.99, False, torch.float16),
        ([], [], torch.zeros(0, 2), [], 0.99, False, torch.bfloat16),
    ],
    ids=["factored", "dense", "empty", "fp16-out", "empty-bf16-out"],
)
def test_opcheck(args):
    torch.library.opcheck(torch.ops.copylora.merge_group.default, args)


def test_contract_shapes_and_padding():
    """up (B, out, K), down (B, K, in), S (B, m); columns past ranks[b] and past m are zero."""
    ups, downs, scales, _ = group_args(modules=3, out=12, in_features=20, input_ranks=(3, 2))
    ranks = [2, 7, 5]  # m = 5: module 1 asks for more than exists
    up, down, s = ops.merge_group(ups, downs, scales, ranks, 0.99, False)
    assert up.shape == (3, 12, 7) and down.shape == (3, 7, 20) and s.shape == (3, 5)
    assert up.dtype == down.dtype == s.dtype == torch.float32
    assert torch.count_nonzero(up[0, :, 2:]) == 0 and torch.count_nonzero(down[0, 2:]) == 0
    assert torch.count_nonzero(up[1, :, 5:]) == 0 and torch.count_nonzero(down[1, 5:]) == 0
    assert torch.count_nonzero(up[2, :, 5:]) == 0 and torch.count_nonzero(down[2, 5:]) == 0
    assert torch.all(s[:, :-1] >= s[:, 1:])
    for b, rank in enumerate(ranks):
        job = ModuleJob(f"m{b}", ups[2 * b : 2 * b + 2], downs[2 * b : 2 * b + 2], scales[b].tolist(), rank)
        ref = reference.merge_module(job, SvdOptions())
        torch.testing.assert_close(up[b, :, :rank], ref.up, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(down[b, :rank], ref.down, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_and_strides():
    """fp16/bf16 inputs and non-contiguous views are read in place and cast in the assembly."""
    ups, downs, scales, ranks = group_args()
    mixed_ups = [u.half() if i % 2 else u.t().contiguous().t() for i, u in enumerate(ups)]
    mixed_downs = [d.bfloat16() if i % 2 else d for i, d in enumerate(downs)]
    up, down, s = ops.merge_group(mixed_ups, mixed_downs, scales, ranks, 0.99, False)
    cast_up, cast_down, cast_s = ops.merge_group(
        [u.float().contiguous() for u in mixed_ups], [d.float() for d in mixed_downs], scales, ranks, 0.99, False
    )
    assert torch.equal(up, cast_up) and torch.equal(down, cast_down) and torch.equal(s, cast_s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("clamp_quantile", [0.99, 1.0])
@pytest.mark.parametrize(("out", "in_features", "ranks"), [(12, 20, (4, 2)), (300, 2000, (5, 3))], ids=["small", "sampled"])
def test_out_dtype_is_the_float32_result_cast_once(dtype, clamp_quantile, out, in_features, ranks):
    """up and down in out_dtype are the float32 result rounded once (the CPU kernel converts each
    module from its float32 scratch); S stays float32."""
    ups, downs, scales, _ = group_args(out=out, in_features=in_features, ranks=ranks)
    up, down, s = ops.merge_group(ups, downs, scales, list(ranks), clamp_quantile, False)
    cast_up, cast_down, cast_s = ops.merge_group(ups, downs, scales, list(ranks), clamp_quantile, False, dtype)
    assert cast_up.dtype == cast_down.dtype == dtype and cast_s.dtype == torch.float32
    assert torch.equal(cast_up, up.to(dtype)) and torch.equal(cast_down, down.to(dtype)) and torch.equal(cast_s, s)


def test_fake_kernel_matches_real_shapes():
    args = (*group_args(modules=2, out=9, in_features=5, input_ranks=(4, 4), ranks=(3, 6)), 0.99, False, torch.float16)
    real = ops.merge_group(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [
            [mode.from_tensor(t) for t in args[0]],
            [mode.from_tensor(t) for t in args[1]],
            mode.from_tensor(args[2]),
            *args[3:],
        ]
        fake = ops.merge_group(*fake_args)
    assert [f.shape for f in fake] == [r.shape for r in real]
    assert [f.dtype for f in fake] == [r.dtype for r in real] == [torch.float16, torch.float16, torch.float32]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.update(ranks=[1]), "B = len\\(ranks\\)"),
        (lambda a: a.update(scales=a["scales"].double()), "float32"),
        (lambda a: a.update(downs=a["downs"][:-1]), "ups but"),
        (lambda a: a["ups"].__setitem__(2, torch.randn(11, 3)), "factor pair 2"),
        (lambda a: a["downs"].__setitem__(1, torch.randn(2, 21)), "factor pair 1"),
        (lambda a: a["ups"].__setitem__(0, torch.ones(12, 3, dtype=torch.int32)), "floating point"),
        (lambda a: a.update(ranks=[-1, 2]), ">= 0"),
        (lambda a: a.update(clamp_quantile=-0.5), "clamp_quantile"),
        (lambda a: a.update(out_dtype=torch.int32), "out_dtype"),
        (lambda a: a["ups"][1].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda a: a["downs"][3].__setitem__((1, 4), float("inf")), "NaN or Inf"),
        (lambda a: a["scales"].__setitem__((0, 1), 3e38), "NaN or Inf"),  # scaled up past float32
    ],
)
def test_bad_arguments_are_named(mutate, message):
    ups, downs, scales, ranks = group_args()
    args = dict(ups=ups, downs=downs, scales=scales, ranks=ranks, clamp_quantile=0.99, sqrt_split=False)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        ops.merge_group(**args)


@pytest.mark.parametrize("quantile", [0.99, 0.9, 0.5, 0.01, 0.0])
@pytest.mark.parametrize(("out", "in_features"), [(50, 70), (300, 2000)], ids=["small", "sampled"])
def test_clamp_level_is_the_linear_quantile(quantile, out, in_features):
    """The clamp level is exactly torch.quantile's (small modules select on a full copy, large
    ones through a sampled bracket)."""
    ups, downs, scales, ranks = group_args(modules=1, out=out, in_features=in_features, input_ranks=(6, 6), ranks=(9,))
    up, down, _ = ops.merge_group(ups, downs, scales, ranks, 1.0, False)
    joined = torch.cat([up[0, :, :9].flatten(), down[0, :9].flatten()])
    level = torch.quantile(joined, quantile)
    clamped_up, clamped_down, _ = ops.merge_group(ups, downs, scales, ranks, quantile, False)
    torch.testing.assert_close(clamped_up, up.clamp(-level, level), rtol=0, atol=0)
    torch.testing.assert_close(clamped_down, down.clamp(-level, level), rtol=0, atol=0)
