"""Locality-sensitive hashing of behaviors: ETA's SimHash retrieval and SDIM's hash-bucket pooling.

Both hash a vector ``x`` with fixed random rotations (SimHash, Charikar 2002): bit ``j`` of a code is
``[x · r_j >= 0]`` with ``r_j ~ N(0, I)``, so two vectors agree on a bit with probability ``1 - θ/π`` (θ their angle).
The rotations are buffers drawn once from ``seed`` and saved with the model (a trained model keeps its hashes).

* `SimHashGSU` (ETA, Chen et al., arXiv 2108.04468; models.md §7.2): ``hash_bits`` bits per behavior and target; the
  K behaviors at the smallest Hamming distance, ties to the most recent. With codes as ±1 vectors,
  ``hamming = (m − s_t · s_i) / 2``, so the top-K of the dot product of the ±1 codes (`kernels.gsu_topk`, which
  orders equal scores by recency) is exactly that selection. Codes are computed without gradient: the hash is not
  differentiable, and the selected behaviors reach the ESU with their live embeddings.
* `SimHashBucketPool` (SDIM, Cao et al., CIKM 2022; models.md §7.3): ``num_hashes`` hash functions of ``hash_bits``
  bits; per function, the sum of the behaviors whose bucket (the code read as an integer) equals the target's,
  optionally L2-normalized, then the mean over the functions. No attention, no top-K: the behaviors' buckets do not
  depend on the target, so they can be computed offline once per behavior (the paper's BSE server).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import native
from .gsu import Selection, gsu_topk


def _rotations(dim: int, bits: int, seed: int, groups: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(groups, dim, bits, generator=gen)


class SimHashGSU(nn.Module):
    """ETA's GSU: top-K behaviors by Hamming distance of ``hash_bits``-bit SimHash codes to the target's."""

    def __init__(self, dim: int, hash_bits: int = 32, seed: int = 0, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.register_buffer("rotation", _rotations(dim, hash_bits, seed)[0])  # [dim, bits], saved with the model

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        """The code of each row of ``x`` as ±1 floats ``[..., bits]`` (bit = x · r >= 0)."""
        return torch.where(x.float() @ self.rotation >= 0, 1.0, -1.0)

    def hamming(self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The Hamming distance of every jagged behavior to its sample's target, ``[total_L]`` int64 (reference)."""
        sample = torch.repeat_interleave(
            torch.arange(target.shape[0], device=target.device), offsets[1:] - offsets[:-1], output_size=len(behaviors)
        )
        return (self.signs(target)[sample] != self.signs(behaviors)).sum(-1)

    @torch.no_grad()
    def forward(
        self, offsets: torch.Tensor, target: torch.Tensor, behaviors: torch.Tensor, k: int, max_len: int | None = None
    ) -> Selection:
        bits = self.rotation.shape[1]
        positions, scores = gsu_topk(
            offsets,
            k,
            mode="dot",
            target=self.signs(target),
            behavior_vectors=self.signs(behaviors),
            max_len=max_len,
            backend=self.backend,
        )
        # score = bits - 2 * hamming: report the Hamming distance of each slot (empty slots: 0)
        distance = torch.where(positions >= 0, (bits - scores) / 2, torch.zeros_like(scores))
        return Selection(positions=positions, scores=distance)


class SimHashBucketPool(nn.Module):
    """SDIM's long-term interest: per hash function, the sum of the behaviors in the target's bucket; the mean over
    ``num_hashes`` functions. ``normalize``: L2-normalize each function's sum first (FuxiCTR's option)."""

    def __init__(self, dim: int, num_hashes: int = 2, hash_bits: int = 4, seed: int = 0, normalize: bool = False):
        super().__init__()
        if hash_bits > 62:
            raise ValueError(f"hash_bits={hash_bits}: a bucket id must fit in int64 (at most 62 bits)")
        self.normalize = normalize
        self.register_buffer("rotation", _rotations(dim, hash_bits, seed, num_hashes))  # [m, dim, bits]
        self.register_buffer("powers", 2 ** torch.arange(hash_bits, dtype=torch.int64), persistent=False)

    def bits(self, x: torch.Tensor) -> torch.Tensor:
        """The sign bits of each row of ``x`` under each hash function, ``[N, num_hashes, hash_bits]`` bool. All
        functions' rotations in one product, with the rows as its long output dimension, ``[m bits, dim] x [dim, N]``:
        ``[N, dim] x [dim, m bits]`` (a few outputs per row) ran 4x slower on the CPU, one product per function
        slower still."""
        m, dim, bits = self.rotation.shape
        rotation = self.rotation.permute(0, 2, 1).reshape(m * bits, dim)
        return (rotation @ x.detach().float().t() >= 0).t().reshape(-1, m, bits)

    def buckets(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket id of each row of ``x`` under each hash function, ``[N, num_hashes]`` int64 (Σ_b bit_b 2^b)."""
        return (self.bits(x).long() * self.powers).sum(-1)

    def match_share(
        self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor, sample: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[N]`` float: for each behavior (jagged by ``offsets [B + 1]``; ``sample [N]``: each row's sample, if
        known), the share of the hash functions under which its bucket is its sample's target's. The eager form's sign
        bits are `bits`' (the same products, so the same buckets), a bucket id summed in float32, exact up to 24 bits
        (int64 beyond); natively (`simhash.cpp`) each row's m x bits products in cache, the share written alone."""
        m, _, nbits = self.rotation.shape
        x, t = behaviors.detach().float().contiguous(), target.detach().float().contiguous()
        if native.applies(x, t, self.rotation):
            return torch.ops.ctr_native.simhash_share(x, t, offsets.long().contiguous(), self.rotation)
        if sample is None:
            lengths = offsets[1:] - offsets[:-1]
            sample = torch.repeat_interleave(torch.arange(t.shape[0], device=x.device), lengths, output_size=x.shape[0])
        wide = torch.float32 if nbits <= 24 else torch.int64

        def codes(x: torch.Tensor) -> torch.Tensor:  # [m, rows]: the code of each row under each function
            rotation = self.rotation.permute(0, 2, 1).reshape(m * nbits, -1)
            signs = (rotation @ x.detach().float().t() >= 0).view(m, nbits, -1).to(wide)
            return (signs * self.powers.to(wide).view(1, nbits, 1)).sum(1)

        # the targets' codes gathered as [N, m] rows (a gather along the columns of [m, B] is a slow strided path)
        same = codes(behaviors) == codes(target).t().contiguous().index_select(0, sample).t()  # [m, N]
        return same.sum(0, dtype=torch.float32) / m

    def forward(
        self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, D]``: target ``[B, D']`` and behaviors jagged ``[total_L, D']`` by ``offsets [B + 1]`` are hashed;
        ``values`` (default: the behaviors) ``[total_L, D]`` are pooled and keep their gradient (the hash has none)."""
        values = behaviors if values is None else values
        if not self.normalize:
            # the mean over functions of the bucket sums is one weighted sum per sample, w_i = the share of the
            # functions that put behavior i in its target's bucket: natively, the shares and the sum in one pass over
            # the rows (`native.simhash_pool`), not a gather of the (row, function) matches and a sum by slot whose
            # backward scatters
            pooled = native.simhash_pool(target, behaviors, offsets, self.rotation, values)
            if pooled is not None:
                return pooled
        b, n = target.shape[0], behaviors.shape[0]
        sample = torch.repeat_interleave(
            torch.arange(b, device=target.device), offsets[1:] - offsets[:-1], output_size=n
        )
        # same bucket: [N, m]. Compared as bucket ids (all bits equal), the target's gathered as [B, m] int64: a gather
        # of the [B, m, bits] bool bits took 2.5 ms at 43K behaviors (PyTorch's bool index_select is not vectorized)
        match = self.buckets(behaviors) == self.buckets(target).index_select(0, sample)
        m = match.shape[1]
        # only the matching (row, function) pairs are added (about N m / 2^bits of them), all functions in one pass:
        # pair (i, h) goes to slot sample_i * m + h
        row, h = match.nonzero().unbind(1)
        slot = sample.index_select(0, row) * m + h
        pooled = native.sum_rows(native.gather_rows(values, row), slot, b * m).view(b, m, -1)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled.mean(1)
