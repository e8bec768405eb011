"""MacridVAE (Ma et al., NeurIPS 2019, Eq. 1-7) and its baselines MultVAE / MultDAE (Liang et al. 2018).

Every model scores a sparse batch of user bags through named scorers, each with one contract:
  score_all(indices, offsets)                     -> Output: log scores over all M items (B, M), KL (B,)
  score_candidates(indices, offsets, candidates)  -> Output: over sorted candidate ids (B, C)
  score_own_and_negatives(indices, offsets, candidates, negatives)  (MacridVAE)
                                                  -> OwnAndNegatives: over the shared negatives (B, S) and
                                                     each user's own items (N,)
`forward(scorer, *args)` only dispatches to them by name: DDP synchronises gradients through the wrapped
module's forward, so training calls `train_model("score_all", idx, off)`; everything else calls the scorer
itself. The loss lives in `loss.py`; nothing here does I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from macrid.data.bags import bag_rows
from macrid.config import ModelConfig
from macrid.model.mixture import mixture_scores, wide_matmul


SCORERS = ("score_all", "score_candidates", "score_own_and_negatives")


@dataclass
class Output:
    log_scores: torch.Tensor  # (B, M) or (B, C) log p(i | u) up to a per-user constant
    kl: torch.Tensor  # (B,) KL(q(z|x) || p(z)), zeros for MultDAE
    mu: torch.Tensor  # (B, K, D) the users' representations (K = 1 for Mult*)


@dataclass
class OwnAndNegatives:
    log_neg: torch.Tensor  # (B, S) log A_ui of every user for the S shared negatives
    log_pos: torch.Tensor  # (N,) log A_ui of each user's own items
    kl: torch.Tensor  # (B,)
    mu: torch.Tensor  # (B, K, D)


class _NamedScorers:
    """forward(scorer, *args) runs the named scorer: the one entry DDP hooks, with one contract per name."""

    def forward(self, scorer: str, *args: torch.Tensor):
        if scorer not in SCORERS or not hasattr(self, scorer):
            raise ValueError(f"{type(self).__name__} has no scorer {scorer!r} (scorers: {SCORERS})")
        return getattr(self, scorer)(*args)


class MacridVAE(_NamedScorers, nn.Module):
    # The M x D item tables. With `row_sparse` set (sampled softmax) a step reads only the rows of its
    # candidates and inputs, and their gradients are sparse (row ids + rows): see macrid/model/row_sparse.py.
    item_tables = ("h", "t")
    item_params = ("h", "t", "item_bias")  # every parameter indexed by item (a warm start remaps their rows)
    decoder_params = ("h", "m", "item_bias")  # what a decoder pass of optim.alternate updates; the rest: encoder

    def __init__(self, n_items: int, *, K: int = 7, D: int = 100, tau: float = 0.1, sigma0: float = 0.1,
                 dropout: float = 0.5, gumbel: bool = True, sample: bool = True, row_sparse: bool = False,
                 similarity: str = "cosine", prior: str = "standard", encoder_layers: int = 0,
                 item_bias: bool = False, concept_tau: float = 0.0):
        super().__init__()
        self.K, self.D, self.tau, self.sigma0, self.dropout, self.gumbel = K, D, tau, sigma0, dropout, gumbel
        self.concept_tau = concept_tau or tau  # Eq. 6's temperature; the decoder keeps tau
        self.sample, self.row_sparse, self.similarity, self.prior = sample, row_sparse, similarity, prior
        self._old: list[MacridVAE] = []  # the composite prior's frozen encoder (a list: not a submodule)
        self.h = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, D)))  # item embeddings h_i
        self.t = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, D)))  # context embeddings t_i
        self.t_bias = nn.Parameter(torch.zeros(D))
        self.m = nn.Parameter(nn.init.xavier_uniform_(torch.empty(K, D)))  # prototypes m_k
        self.f_nn = nn.Linear(D, 2 * D)  # shared across the K components, Eq. 7
        self.deep = nn.ModuleList(nn.Linear(D, D) for _ in range(encoder_layers))  # residual layers before f_nn
        # b_i added to log p(i|u) (model.item_bias); None keeps the paper's decoder and its checkpoints' keys
        self.item_bias = nn.Parameter(torch.zeros(n_items)) if item_bias else None

    def item_rows(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """h_i of all items, or of the given ones (C,); a sparse gradient in row-sparse mode. (M or C, D)."""
        return self.h if items is None else F.embedding(items, self.h, sparse=self.row_sparse)

    def concept_logits(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """s_ik = cos(h_i, m_k) / tau_c, Eq. 6, for the item rows h (default: all items). Returns (M or C, K).
        tau_c is model.concept_tau, or tau (the paper: one temperature) when it is 0.

        With similarity "inner" (the Fig. 2e ablation): s_ik = h_i . m_k / tau_c."""
        h = self.h if h is None else h
        with torch.autocast(device_type=h.device.type, enabled=False):  # fp32: small, and 1/tau amplifies rounding
            if self.similarity == "inner":
                return h.float() @ self.m.float().T / self.concept_tau
            return F.normalize(h.float(), dim=1) @ F.normalize(self.m.float(), dim=1).T / self.concept_tau

    def concepts(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """c_i: a relaxed one-hot Gumbel-softmax sample in training, the softmax in evaluation. (M or C, K).

        h: the rows of the items wanted (from `item_rows`); default all items."""
        logits = self.concept_logits(h)
        if self.training and self.gumbel:
            return F.gumbel_softmax(logits, tau=1.0, hard=False, dim=1)
        return torch.softmax(logits, dim=1)

    def encode(self, indices: torch.Tensor, offsets: torch.Tensor, c_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7 on a sparse batch; c_x (N, K) holds c_i of each non-zero (x_ui * c_ik).

        Returns mu (B, K, D) with unit norm, and ln(var / sigma0^2) (B, K, D).
        """
        B, N, K, D = len(offsets) - 1, len(indices), self.K, self.D
        rows = bag_rows(offsets, N)  # (N,)
        norm = c_x.new_zeros(B, K).index_add(0, rows, c_x.square()).sqrt().clamp_min(1e-12)  # (B, K)
        w = F.dropout(c_x / norm[rows], self.dropout, self.training)  # (N, K)
        # One embedding_bag over K*B bags (concept-major): bag k*B+b sums w[n,k] * t_i over user b's items.
        bag_idx = indices.repeat(K)  # (K*N,)
        shift = N * torch.arange(K, device=offsets.device).unsqueeze(1)  # (K, 1)
        bag_off = (offsets[:-1].unsqueeze(0) + shift).reshape(-1)  # (K*B,)
        pooled = F.embedding_bag(bag_idx, self.t, bag_off, mode="sum", per_sample_weights=w.T.reshape(-1),
                                 sparse=self.row_sparse)
        pooled = pooled.view(K, B, D).transpose(0, 1)  # (B, K, D)
        g = torch.tanh(pooled + self.t_bias)  # (B, K, D)
        for layer in self.deep:
            g = g + torch.tanh(layer(g))  # (B, K, D)
        a, b = self.f_nn(g).split(D, dim=-1)  # (B, K, D) each
        # fp32 from here on even under bf16 autocast: sigma = sigma0 * exp(-b/2) and the KL exponentiate b
        return F.normalize(a.float(), dim=-1), -b.float()

    def score_all(self, indices: torch.Tensor, offsets: torch.Tensor) -> Output:
        """log A_ui (+ b_i) over all M items: log_scores (B, M)."""
        return self.score_candidates(indices, offsets, None)

    def score_candidates(self, indices: torch.Tensor, offsets: torch.Tensor, candidates: torch.Tensor | None) -> Output:
        """log A_ui (+ b_i) over `candidates` (C,), sorted item ids that include every input item: (B, C)."""
        p = self._posterior(indices, offsets, candidates)
        log_scores = mixture_scores(p.zn, p.hn, p.c, self.tau).log()  # (B, M or C)
        return Output(log_scores if p.bias is None else log_scores + p.bias, p.kl, p.mu)

    def score_own_and_negatives(self, indices: torch.Tensor, offsets: torch.Tensor, candidates: torch.Tensor,
                                negatives: torch.Tensor) -> OwnAndNegatives:
        """Every user on the shared negatives (positions in `candidates`), log_neg (B, S), and on its own items
        only, log_pos (N,): cost B*S + N instead of B*C."""
        p = self._posterior(indices, offsets, candidates)
        neg = mixture_scores(p.zn, p.hn[negatives], p.c[negatives], self.tau)  # (B, S)
        rows, h_own = bag_rows(offsets, len(indices)), p.hn[p.pos]  # (N,), (N, D)
        # (N, K) cosines of each user with its own items; one (N, D) slice per concept is 6x faster than
        # gathering an (N, K, D) block for a batched matmul (`python benchmarks/scale.py parts`)
        cos = torch.stack([(p.zn[:, k].index_select(0, rows) * h_own).sum(1) for k in range(self.K)], 1)
        own = (p.c[p.pos] * torch.exp(cos / self.tau)).sum(1)  # (N,)
        if p.bias is None:
            return OwnAndNegatives(neg.log(), own.log(), p.kl, p.mu)
        return OwnAndNegatives(neg.log() + p.bias[negatives], own.log() + p.bias[p.pos], p.kl, p.mu)

    def _posterior(self, indices: torch.Tensor, offsets: torch.Tensor, candidates: torch.Tensor | None) -> "_Posterior":
        """What every scorer starts from: the item rows and concepts (M or C), Eq. 7's posterior and its sample z."""
        h = self.item_rows(candidates)  # (M or C, D)
        c = self.concepts(h)  # (M or C, K)
        pos = indices if candidates is None else torch.searchsorted(candidates, indices)  # (N,)
        mu, lnvar = self.encode(indices, offsets, c[pos])  # (B, K, D)
        z = mu
        if self.training and self.sample:
            z = mu + torch.randn_like(mu) * self.sigma0 * torch.exp(0.5 * lnvar)  # (B, K, D)
        zn, hn = F.normalize(z, dim=-1), F.normalize(h, dim=1)
        if self._old and self.training and self.sample:
            kl = self._composite_kl(indices, offsets, z, mu, lnvar)  # (B,)
        else:  # the authors' KL against N(0, sigma0^2) drops the mu^2 term, because mu is normalised
            kl = 0.5 * (-lnvar + lnvar.exp() - 1.0).sum(dim=(1, 2))  # (B,)
        return _Posterior(c=c, pos=pos, mu=mu, zn=zn, hn=hn, kl=kl, bias=self._bias(candidates))

    def _bias(self, items: torch.Tensor | None) -> torch.Tensor | None:
        """b_i of all items or of the given ones (C,), or None without model.item_bias."""
        if self.item_bias is None or items is None:
            return self.item_bias
        return self.item_bias[items]

    @torch.no_grad()
    def freeze_old_posterior(self) -> None:
        """model.prior = "composite": snapshot the encoder (and h, m for c_i) as q_old for the next epoch."""
        old = MacridVAE(n_items=self.h.shape[0], K=self.K, D=self.D, tau=self.tau, sigma0=self.sigma0, dropout=0.0,
                        gumbel=False, sample=False, similarity=self.similarity, encoder_layers=len(self.deep),
                        item_bias=self.item_bias is not None, concept_tau=self.concept_tau).to(self.h.device)
        old.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()})
        self._old = [old.eval().requires_grad_(False)]

    def _composite_kl(self, indices, offsets, z, mu, lnvar) -> torch.Tensor:
        """log q(z|x) - log p(z) at the sample z, summed over K and D, with RecVAE's per-dimension mixture prior."""
        old = self._old[0]
        with torch.no_grad():
            mu_old, lnvar_old = old.encode(indices, offsets, old.concepts(old.h[indices]))  # (B, K, D) each
        var0 = self.sigma0 ** 2
        log_q = _log_normal(z, mu, var0 * lnvar.exp())
        zero = torch.zeros_like(z)
        prior = torch.stack([_log_normal(z, zero, torch.full_like(z, var0)) + math.log(3 / 20),
                             _log_normal(z, mu_old, var0 * lnvar_old.exp()) + math.log(3 / 4),
                             _log_normal(z, zero, torch.full_like(z, math.exp(10.0))) + math.log(1 / 10)])
        return (log_q - torch.logsumexp(prior, dim=0)).sum(dim=(1, 2))  # (B,)

    @torch.no_grad()
    def represent(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Evaluation-mode users' representations mu (B, K, D), touching only the input items."""
        items = torch.unique(indices)
        c = self.concepts(self.h[items])  # (C, K)
        return self.encode(indices, offsets, c[torch.searchsorted(items, indices)])[0]

    @torch.no_grad()
    def score(self, mu: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """log A_ui for representations mu (B, K, D) and item ids (C,) -> (B, C). For chunked ranking."""
        h = self.h[items]  # (C, D)
        log_scores = mixture_scores(F.normalize(mu, dim=-1), F.normalize(h, dim=1), self.concepts(h), self.tau).log()
        b = self._bias(items)
        return log_scores if b is None else log_scores + b  # (B, C)


@dataclass
class _Posterior:
    c: torch.Tensor  # (M or C, K) c_i of the scored items
    pos: torch.Tensor  # (N,) each input item's row among them
    mu: torch.Tensor  # (B, K, D) Eq. 7's mean, unit norm
    zn: torch.Tensor  # (B, K, D) the (sampled in training) representation, unit norm
    hn: torch.Tensor  # (M or C, D) the item rows, unit norm
    kl: torch.Tensor  # (B,)
    bias: torch.Tensor | None  # (M or C,) b_i, or None


def item_concept(c: torch.Tensor) -> torch.Tensor:
    """An item's concept: the mode of p(C | i), argmax_k c_ik (Sec. 2.2: "we use the mode of p_theta(C) as C").
    c (..., K) -> (...). The one definition that steering, the export's `concept` columns and explanations share."""
    return c.argmax(-1)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, var)."""
    return -0.5 * (math.log(2 * math.pi) + var.log() + (x - mean).square() / var)


class MultVAE(_NamedScorers, nn.Module):
    """beta-MultVAE (variational=True) or MultDAE (False) with the paper's ~2*M*D parameter budget.

    Encoder: L2-normalised bag -> dropout -> M x hidden table -> tanh -> (mu, logvar) or a code.
    Decoder: a D x M output layer.
    """

    item_tables = ()  # dense gradients always: the baselines keep the simple path
    item_params = ("t", "h", "h_bias")
    decoder_params = ("h", "h_bias")

    def __init__(self, n_items: int, *, D: int = 100, hidden: int = 100, dropout: float = 0.5, variational: bool = True,
                 sample: bool = True):
        super().__init__()
        self.D, self.dropout, self.variational, self.sample = D, dropout, variational, sample
        self.t = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, hidden)))
        self.t_bias = nn.Parameter(torch.zeros(hidden))
        self.f_nn = nn.Linear(hidden, 2 * D if variational else D)
        self.h = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, D)))
        self.h_bias = nn.Parameter(torch.zeros(n_items))

    def encode(self, indices: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> z (B, D) (mu in eval mode), mu (B, D), kl (B,), all fp32."""
        B = len(offsets) - 1
        rows = bag_rows(offsets, len(indices))  # (N,)
        lengths = offsets.diff().clamp_min(1).to(self.t.dtype)  # (B,)
        w = F.dropout(lengths.rsqrt()[rows], self.dropout, self.training)  # (N,)
        hidden = torch.tanh(F.embedding_bag(indices, self.t, offsets[:-1], mode="sum", per_sample_weights=w)
                            + self.t_bias)  # (B, hidden)
        out = self.f_nn(hidden).float()  # fp32 under bf16 autocast: the KL exponentiates logvar
        if self.variational:
            mu, logvar = out.split(self.D, dim=-1)  # (B, D)
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training and self.sample else mu
            kl = 0.5 * (-logvar + logvar.exp() + mu.square() - 1.0).sum(dim=1)  # (B,)
        else:
            mu = z = torch.tanh(out)  # (B, D)
            kl = out.new_zeros(B)
        return z, mu, kl

    def score_all(self, indices: torch.Tensor, offsets: torch.Tensor) -> Output:
        """h_i . z_u + b_i over all M items: log_scores (B, M)."""
        return self.score_candidates(indices, offsets, None)

    def score_candidates(self, indices: torch.Tensor, offsets: torch.Tensor, candidates: torch.Tensor | None) -> Output:
        """h_i . z_u + b_i over `candidates` (C,): (B, C)."""
        z, mu, kl = self.encode(indices, offsets)
        h, h_bias = (self.h, self.h_bias) if candidates is None else (self.h[candidates], self.h_bias[candidates])
        logits = wide_matmul(z, h)  # (B, M or C) fp32; under bf16 autocast from bf16 operands, never rounded
        return Output(logits + h_bias, kl, mu.unsqueeze(1))  # (B, M or C), fp32 for the loss

    @torch.no_grad()
    def represent(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.encode(indices, offsets)[1].unsqueeze(1)  # (B, 1, D): mu, without the (B, M) decoder

    @torch.no_grad()
    def score(self, mu: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return mu[:, 0] @ self.h[items].T + self.h_bias[items]  # (B, C)


def build_model(cfg: ModelConfig, n_items: int, row_sparse: bool = False) -> nn.Module:
    """row_sparse (MacridVAE with sampled softmax): sparse gradients for the item tables."""
    if cfg.name == "macridvae":
        return MacridVAE(n_items=n_items, K=cfg.K, D=cfg.D, tau=cfg.tau, sigma0=cfg.sigma0, dropout=cfg.dropout,
                         gumbel=cfg.gumbel, sample=cfg.sample, row_sparse=row_sparse, similarity=cfg.similarity,
                         prior=cfg.prior, encoder_layers=cfg.encoder_layers, item_bias=cfg.item_bias,
                         concept_tau=cfg.concept_tau)
    return MultVAE(n_items=n_items, D=cfg.D, hidden=cfg.hidden, dropout=cfg.dropout, variational=cfg.name == "multvae",
                   sample=cfg.sample)
