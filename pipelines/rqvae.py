"""RQ-VAE semantic IDs (TIGER, Rajput et al., NeurIPS 2023; as used for ranking by Singh et al., RecSys '24,
models-wave2.md B.2): ``ctr sid --method rq-vae``.

Model (frozen content embedding x ∈ R^D)::

    z = E(x)                      E: Linear(D, hidden) -> ReLU -> Linear(hidden, latent)   ("1-layer", width 256)
    r_1 = z;  c_l = argmin_k ||r_l - e^l_k||,  r_{l+1} = r_l - e^l_{c_l}      l = 1..L
    ẑ = Σ_l e^l_{c_l};   x̂ = D(z + sg(ẑ - z))   D: Linear(latent, hidden) -> ReLU -> Linear(hidden, D)
    loss = ||x - x̂||² + Σ_l [ β·||r_l - sg(e^l_{c_l})||² + ||sg(r_l) - e^l_{c_l}||² ],   β = 0.25

(squared norms averaged over the batch and the dimension). The straight-through estimator carries the decoder's
gradient to the encoder. **Dead-code reset** (SoundStream; the paper's sources report it "significantly improved
codebook utilization"): after every step, each code of level l that no item of the batch chose is replaced by a
random residual ``r_l`` of the batch. Codebooks start as random residuals of the first batch at their level.

Choices (ours, documented): Adam (lr 1e-3), batches of 1,024 items drawn with replacement, ``steps`` updates (default
3,000), latent width ``min(D, 32)`` for our 64-d embeddings (the paper maps 2,048 -> 256), hidden width 256. The
codes of every item come from the trained encoder and codebooks in eval mode (deterministic argmin). The error the
`semantic_ids` block reports per level is the quantization error of the *latent* (``||z - ẑ_l||² / latent``), and
``decoder_mse`` the reconstruction of x through the decoder (``||x - D(ẑ)||² / D``).

Deterministic under a seed on one machine (the draws and the init come from it; float sums may differ across BLAS
builds or thread counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METHOD = "rq-vae"


@dataclass
class RQVAE:
    """A trained RQ-VAE: encoder, decoder and codebooks (torch modules and a tensor), and its training record."""

    encoder: Any
    decoder: Any
    codebooks: Any  # torch [L, K, latent]
    scale: float  # inputs are divided by it (their std) before the encoder
    loss_first: float  # the training loss of the first and of the last step
    loss_last: float
    resets: list[int]  # dead codes reset per level over the whole training

    @property
    def latent_dim(self) -> int:
        return int(self.codebooks.shape[2])

    def encode(self, x: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [N, D] -> (codes [N, L] int32, ||z - ẑ_l||² after each level [N, L] float64, ||z - ẑ|| [N]): the same
        contract as `pipelines.sid.ResidualQuantizer.encode`, in the latent space."""
        import torch

        levels = int(self.codebooks.shape[0])
        n = len(x)
        codes = np.empty((n, levels), dtype=np.int32)
        sq_err = np.empty((n, levels), dtype=np.float64)
        with torch.no_grad():
            for s in range(0, n, chunk):
                r = self.encoder(torch.from_numpy(np.asarray(x[s : s + chunk], dtype=np.float32)) / self.scale)
                for lvl in range(levels):
                    c = torch.cdist(r, self.codebooks[lvl]).argmin(1)
                    r = r - self.codebooks[lvl][c]
                    codes[s : s + chunk, lvl] = c.numpy()
                    sq_err[s : s + chunk, lvl] = (r.double() ** 2).sum(1).numpy()
        return codes, sq_err, np.sqrt(sq_err[:, -1]) if levels else np.zeros(n)

    def decoder_mse(self, x: np.ndarray, chunk: int = 65536) -> float:
        """Mean ``||x - D(ẑ)||² / D`` over the rows of x, in x's units."""
        import torch

        total = 0.0
        with torch.no_grad():
            for s in range(0, len(x), chunk):
                xb = torch.from_numpy(np.asarray(x[s : s + chunk], dtype=np.float32))
                r = self.encoder(xb / self.scale)
                quant = torch.zeros_like(r)
                for book in self.codebooks:
                    e = book[torch.cdist(r, book).argmin(1)]
                    quant += e
                    r = r - e
                total += float(((self.decoder(quant) * self.scale - xb).double() ** 2).sum())
        return total / max(1, x.size)


def train_rq_vae(
    x: np.ndarray,
    levels: int = 8,
    codebook_size: int = 256,
    *,
    seed: int = 0,
    steps: int = 3000,
    batch: int = 1024,
    latent_dim: int | None = None,
    hidden: int = 256,
    beta: float = 0.25,
    lr: float = 1e-3,
    dead_code_reset: bool = True,
) -> RQVAE:
    """Train an RQ-VAE on ``x [N, D]`` (see the module docstring); encode with the returned `RQVAE`."""
    import torch
    from torch import nn

    if levels < 1 or codebook_size < 1:
        raise ValueError(f"levels and codebook_size must be >= 1, got {levels} and {codebook_size}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need a non-empty [N, D] matrix of embeddings, got shape {x.shape}")
    n, dim = x.shape
    latent = latent_dim or min(dim, 32)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, latent))
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    xt = torch.from_numpy(x)
    scale = float(xt.std()) or 1.0  # train on unit-scale inputs; the decoder MSE is reported in the input's units
    xt = xt / scale
    books = torch.empty(levels, codebook_size, latent)
    opt_params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(opt_params, lr=lr)
    book_opt: torch.optim.Optimizer | None = None
    resets = [0] * levels
    first = last = float("nan")
    for step in range(steps):
        xb = xt[torch.randint(n, (batch,), generator=gen)]
        z = enc(xb)
        if step == 0:  # codebooks from the first batch's residuals, level by level
            with torch.no_grad():
                r = z.detach().clone()
                for lvl in range(levels):
                    books[lvl] = r[torch.randint(len(r), (codebook_size,), generator=gen)]
                    r -= books[lvl][torch.cdist(r, books[lvl]).argmin(1)]
            books = nn.Parameter(books)
            book_opt = torch.optim.Adam([books], lr=lr)
        r = z
        quant = torch.zeros_like(z)
        commit = z.new_zeros(())
        chosen = []
        for lvl in range(levels):
            c = torch.cdist(r.detach(), books[lvl].detach()).argmin(1)
            e = books[lvl][c]
            commit = commit + beta * ((r - e.detach()) ** 2).mean() + ((r.detach() - e) ** 2).mean()
            quant = quant + e
            chosen.append((c, r.detach()))
            r = r - e.detach()
        z_st = z + (quant - z).detach()
        loss = ((dec(z_st) - xb) ** 2).mean() + commit
        opt.zero_grad()
        assert book_opt is not None
        book_opt.zero_grad()
        loss.backward()
        opt.step()
        book_opt.step()
        if dead_code_reset:
            with torch.no_grad():
                for lvl, (c, res) in enumerate(chosen):
                    dead = torch.ones(codebook_size, dtype=torch.bool)
                    dead[c] = False
                    k = int(dead.sum())
                    if k:
                        books[lvl][dead] = res[torch.randint(len(res), (k,), generator=gen)]
                        resets[lvl] += k
        if step == 0:
            first = float(loss)
        last = float(loss)
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("rq-vae step %d/%d: loss %.5f", step + 1, steps, last)

    enc.eval()
    dec.eval()
    return RQVAE(enc, dec, books.detach(), scale, first, last, resets)
