"""One GPU: the FlexAttention path with block tables built from the documents' extents.

The CPU tests check the tables position by position against the dense rule and the kernel's forward
on the CPU; what needs a GPU is the compiled kernel itself, forward and backward, over a long stream of
documents as a micro batch is packed: here it is compared with the same kernel under a block mask that
`create_block_mask` builds by evaluating the rule at every position, and with dense-mask attention in
float64. Not run in CI (no GPU there); written for the gpu tier.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from ds_train.attention import attend, block_mask, dense_mask, make_mask_mod

pytestmark = pytest.mark.gpu


def stream(T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """doc ids of one stream of whole documents (lengths 8-600) with padding at its tail, and prefixes."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.full((1, T), -1, dtype=torch.int32)
    prefix = torch.zeros(1, T, dtype=torch.bool)
    t, d = 0, 0
    while True:
        n = int(torch.randint(8, 600, (1,), generator=g))
        if t + n > T - 40:
            break
        doc_ids[0, t : t + n] = d
        prefix[0, t : t + int(torch.randint(0, n // 2, (1,), generator=g))] = True
        t, d = t + n, d + 1
    return doc_ids.cuda(), prefix.cuda()


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("with_prefix", [False, True])
def test_extent_tables_give_the_scanned_masks_outputs_and_gradients(window, with_prefix):
    T, heads, width = 4096, 4, 64
    doc_ids, prefix = stream(T, seed=3)
    prefix = prefix if with_prefix else None
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    scanned = create_block_mask(make_mask_mod(doc_ids, prefix, window), 1, None, T, T, device="cuda")
    results = {}
    for name, mask in (("extents", block_mask(doc_ids, prefix, window)), ("scanned", scanned)):
        out = attend(q, k, v, mask)
        out.float().square().sum().backward()
        results[name] = (out.detach(), *(x.grad.detach().clone() for x in (q, k, v)))
        for x in (q, k, v):
            x.grad = None
    for got, want in zip(results["extents"], results["scanned"]):
        # The same kernel; blocks may be visited as partial instead of full (or in another order), which
        # can move the bf16 rounding of a result, not its value.
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    dense = attend(*(x.detach().double() for x in (q, k, v)), dense_mask(doc_ids, prefix, window))
    torch.testing.assert_close(results["extents"][0].double(), dense, rtol=2e-2, atol=2e-2)  # bf16 inputs
