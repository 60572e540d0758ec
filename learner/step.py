"""The learner's optimisation step: one policy update from a batch of scored groups.

    learner = Learner(model, AlgorithmConfig(algorithm="grpo", mpo=MPOConfig(k=5)))
    metrics = learner.step(batch)          # flat dict[str, float], namespaced loss/ ratio/ mtp/ …

One update, as pseudocode:

    prepare:   validate; overlong shaping; drop constant-reward groups (DAPO dynamic sampling) and
               samples without response tokens (both counted); GRPO advantages
    π_old:     one no_grad pass over the batch (micro-batched) → main-head log-probs, the MTP
               heads' log-probs MPO needs, main-head entropy — recomputed once per update
    for epoch in epochs:                     (shuffled with a generator seeded by cfg.seed+version)
      for mini-batch in mini_batches:        (one AdamW step each)
        for micro-batch:                     (gradient accumulation; trailing padding trimmed)
          ONE backbone forward and ONE LM-head matmul for all heads (model.token_logprobs)
          loss = policy surrogate (token ratio, or MPO block ratio) × decoupled behaviour weight
               + Σ_k L_MTP,k(λ_k A) (regime; λ inside the clip)
               + c_D Σ_k D(p_main ‖ q_k)     (mtp.distill; gradient into the MTP modules only)
               + β KL_k3 − c_H entropy
          backward                           (normalised by the mini-batch's denominators, so the
                                              sum over micro-batches is the mini-batch loss)
        clip grad norm; if not finite: zero grads, skip, count; else AdamW step
    for batch in the last mtp.distill.replay batches, then this one:
      for head step in mtp.distill.head_steps: (the distillation term alone; backbone without autograd)
        distill loss over the batch → backward into the MTP modules → clip → AdamW step

Device: the policy lives on `cfg.placement(gpu_assigned)` (`learner/device.py`): CPU float32 by
default, a GPU with optional bf16 autocast when asked for or given one. Reward shaping and
advantages run on the host (a few (B,) tensors); the kept batch then moves to the device once per
update; metrics come back as python floats. The mini-batch shuffle's generator stays on the host,
so the sample order is the same on every device.

Temperature: every log-prob the step computes (π_θ, π_old, entropy, MTP heads) is of
softmax(logits / cfg.temperature), the distribution the rollouts sampled from, so the ratios and the
decoupled behaviour weights compare like with like (vLLM returns its log-probs after temperature).

Learner group (``dp``, a `learner.distributed.DataParallel` with world > 1): the policy is
sharded with FSDP2 and every rank runs this same step on the whole batch, computing its
token-balanced share of every global micro-batch's rows; normalisers are the mini-batch's, OCC's
statistics and the loss are summed over ranks, gradients are summed by FSDP and clipped by the
global norm, so the update is the one-process update (docs/scale.md). dp None: one process.

Not covered here: packing of several sequences per row (rows are padded) and reading staleness
limits (the run controller drops too-stale groups).

Determinism: given the same model state, batch and config, the update is bit-for-bit repeatable
on CPU (no dropout in the policy; the only randomness is the seeded mini-batch shuffle). On a GPU
it agrees with the CPU to float32 rounding (fp32) or bf16 rounding (bf16), not bit for bit.

OCC on-policy: until the update's first optimiser step π_θ = π_old, so δ_RL = 0 and λ = 0; the
learner sets δ_RL to exactly 0 there rather than using the recomputed log-ratio, whose float noise
(~1e-7) AdamW would amplify into noise-driven steps of the heads. With `mini_batches=1, epochs=1`
OCC therefore never trains the heads; use ≥ 2 mini-batches or epochs.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque

import torch

from learner.advantages import constant_groups, grpo_advantages, kl_k3, overlong_penalty
from learner.aggregation import Normaliser, aggregate
from learner.batch import TrainBatch
from learner.config import AlgorithmConfig
from learner.device import Placement
from learner.distributed import DataParallel, apply_activation_checkpointing, is_sharded, shard_policy
from learner.mpo import block_log_ratio, block_view, mpo_weights, scale_grad
from learner.mtp_distill import distill_token_loss, distill_tv, top1_agreement
from learner.objectives import decoupled_weights, policy_loss
from learner.occ import (
    mtp_backbone_grad,
    mtp_lm_head_grad,
    mtp_regime_loss,
    occ_lambda_authors,
    occ_lambda_paper,
    response_width,
    response_window,
)


class _Stats:
    """Accumulates weighted means (Σ value·weight / Σ weight) over micro-batches and steps."""

    def __init__(self) -> None:
        self.num: dict[str, float] = defaultdict(float)
        self.den: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float | torch.Tensor, weight: float = 1.0) -> None:
        v = float(value)
        if math.isfinite(v):
            self.num[name] += v * weight
            self.den[name] += weight

    def add_masked(self, prefix: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        """mean and variance (via E[x²]) of x over mask, token-weighted."""
        n = float(mask.sum())
        if n == 0:
            return
        xm = torch.where(mask, x, torch.zeros_like(x))
        self.num[prefix + "_mean"] += float(xm.sum())
        self.den[prefix + "_mean"] += n
        self.num[prefix + "_sqmean"] += float((xm * xm).sum())
        self.den[prefix + "_sqmean"] += n

    def result(self) -> dict[str, float]:
        out = {k: self.num[k] / self.den[k] for k in self.num if self.den[k] > 0}
        for k in list(out):
            if k.endswith("_sqmean"):
                base = k[: -len("_sqmean")]
                out[base + "_var"] = max(out.pop(k) - out[base + "_mean"] ** 2, 0.0)
        return out


def distill_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> TrainBatch:
    """What a batch keeps for ``mtp.distill.replay``: its token rows and masks (host copies); the
    head steps read nothing else, and recompute the teacher under the policy of the day."""
    n = int(input_ids.shape[0])
    return TrainBatch(input_ids=input_ids.cpu().clone(), attention_mask=attention_mask.cpu().clone(),
                      response_mask=response_mask.cpu().clone(), rewards=torch.zeros(n),
                      group_ids=torch.zeros(n, dtype=torch.long))


class Learner:
    """Holds the policy, its AdamW optimiser and the policy version; `step` runs one update.

    The model is moved to the config's device (`cfg.device`; `gpu_assigned` tells `auto` that
    this process was given a GPU) before the optimiser is built, so its state lives there too.
    With ``dp`` (a learner group of world > 1) it is then sharded (`shard_policy`) unless it
    already is."""

    def __init__(self, model: torch.nn.Module, cfg: AlgorithmConfig, gpu_assigned: bool = False,
                 dp: DataParallel | None = None) -> None:
        num_mtp = int(getattr(model, "num_mtp", 0))
        cfg.check_against_model(num_mtp)
        self.placement: Placement = cfg.placement(gpu_assigned)
        self.device = self.placement.device
        self.dp = dp if dp is not None and dp.world > 1 else None
        model = model.to(self.device)
        if self.dp is not None and not is_sharded(model):
            shard_policy(model, bf16_compute=self.placement.autocast_dtype == torch.bfloat16,
                         activation_checkpointing=cfg.activation_checkpointing)
        elif self.dp is None and cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model, self.cfg = model, cfg
        mpo = cfg.mpo
        # K = 1 when MPO is off or its MTP share is 0: exactly token-level, no MTP heads needed.
        self.k = 1 if mpo is None or mpo.mtp_share == 0.0 else mpo.k
        self.w = mpo_weights(self.k, 0.0 if mpo is None else mpo.mtp_share,
                             1.0 if mpo is None else mpo.decay)  # (K,)
        self.n_train = cfg.trained_mtp_heads(num_mtp)  # heads trained by the MTP regime
        self.n_distill = cfg.distill_heads(num_mtp)  # heads trained by mtp.distill
        self.n_heads = max(self.k - 1, self.n_train, self.n_distill)  # MTP heads in the training forward
        # MTP gradient routes of the training forward (see learner.model): into the backbone
        # trunk (regimes ce/policy/occ, mpo.grad full/occ) and into the shared LM head (every
        # regime with an MTP loss, `detach` included; MPO alone with mpo.grad='detach' keeps the
        # backbone's head out, as MPO App. A trains only the MTP modules).
        self.backbone_grad = mtp_backbone_grad(cfg.mtp_regime) or (
            self.k > 1 and mpo is not None and mpo.grad in ("full", "occ")
        )
        self.lm_head_grad = self.backbone_grad or mtp_lm_head_grad(cfg.mtp_regime)
        self.need_lambda = cfg.mtp_regime == "occ" or (
            self.k > 1 and mpo is not None and mpo.grad == "occ"
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        adamw = dict(lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay)
        groups = self.param_groups(model, cfg)
        if self.dp is not None:  # sharded (DTensor) parameters: the foreach implementation
            self.opt = torch.optim.AdamW(groups, **adamw)
        else:
            self.opt = self._plain_adamw(groups, adamw)
        self.version = 0
        self.skipped_nonfinite_total = 0
        # mtp.distill.replay: the token rows of the last update batches, on the host
        self.distill_replay: deque[TrainBatch] = deque(maxlen=cfg.mtp.distill.replay)

    def param_groups(self, model: torch.nn.Module, cfg: AlgorithmConfig) -> list[dict]:
        """AdamW's parameter groups: one at `lr`, or with `mtp.lr` set, the MTP modules apart at
        their own rate (the shared LM head and embeddings are backbone parameters)."""
        if cfg.mtp.lr is None:  # (set without MTP modules: refused by check_against_model above)
            return [{"params": self.params}]
        heads = {id(p) for p in model.mtp.parameters()}
        return [{"params": [p for p in self.params if id(p) not in heads]},
                {"params": [p for p in self.params if id(p) in heads], "lr": cfg.mtp.lr}]

    def _plain_adamw(self, groups: list[dict], adamw: dict) -> torch.optim.Optimizer:
        try:  # the fused kernel is ~3× faster than the per-tensor loop on CPU (135M params: 0.3 s)
            # and one launch instead of thousands on a GPU
            return torch.optim.AdamW(groups, fused=True, **adamw)
        except (RuntimeError, TypeError):  # dtype/device without a fused kernel
            return torch.optim.AdamW(groups, **adamw)

    # ------------------------------------------------------------------ the group's rows
    def row_chunks(self, n: int, size: int) -> list[tuple[torch.Tensor, bool]]:
        """This rank's forwards over rows 0..n-1 (a no-grad pass): one process's chunks of ``size``
        rows, dealt to the ranks in turn, as many forwards on every rank (FSDP's collectives run
        in lock step); a rank with fewer chunks pads with ``(rows[:1], True)`` — a row whose
        result is discarded."""
        chunks = list(torch.split(torch.arange(n, device=self.device), size))
        if self.dp is None:
            return [(c, False) for c in chunks]
        mine = chunks[self.dp.rank :: self.dp.world]
        rounds = -(-len(chunks) // self.dp.world)
        return [(c, False) for c in mine] + [(chunks[0][:1], True)] * (rounds - len(mine))

    def chunk_size(self, b: TrainBatch, heads: int) -> int:
        """Rows per forward of a no-grad pass (`row_chunks`): one process's micro-batch size, so
        each row is computed at the width one process computes it at; with 'auto' that is one
        rank's budget (`micro_size` gives the group's)."""
        size = self.micro_size(b, heads)
        if self.dp is not None and self.cfg.micro_batch_size == "auto":
            size = max(1, size // self.dp.world)
        return size

    def micro_share(self, micro: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's rows of a global micro-batch (all of it for one process); an empty share is
        one padding row (True: its loss is masked to 0)."""
        if self.dp is None:
            return micro, False
        mine = self.dp.share(micro, tokens)
        return (mine, False) if mine.numel() else (micro[:1], True)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the group's ranks (identity for one process)."""
        return t if self.dp is None else self.dp.sum_(t)

    # ------------------------------------------------------------------ prepare
    def prepare(self, batch: TrainBatch) -> tuple[TrainBatch | None, torch.Tensor | None, dict]:
        """Validate, shape rewards, filter, and compute advantages (B,) or (B, T).

        Returns (kept batch or None if nothing is left, advantages of the kept rows, metrics).
        """
        batch.validate()
        cfg, m = self.cfg, {}
        lengths = batch.response_lengths
        rewards = batch.rewards.to(torch.float32)
        m["batch/reward_mean"] = float(rewards.mean())
        if batch.correct is not None:
            m["batch/accuracy"] = float(batch.correct.float().mean())
        m["batch/response_len_mean"] = float(lengths.float().mean())
        m["batch/response_len_max"] = float(lengths.max())
        if batch.policy_versions is not None:
            stale = (self.version - batch.policy_versions).float()
            m["batch/staleness_mean"] = float(stale.mean())
            m["batch/staleness_max"] = float(stale.max())
        if cfg.dapo.overlong_max_len is not None:
            pen = cfg.dapo.overlong_penalty_factor * overlong_penalty(
                lengths, cfg.dapo.overlong_max_len, cfg.dapo.overlong_cache_len)
            rewards = rewards + pen
            m["batch/overlong_penalty_mean"] = float(pen.mean())
        keep = torch.ones(batch.size, dtype=torch.bool)
        m["batch/groups"] = float(torch.unique(batch.group_ids).numel())
        if cfg.dapo.dynamic_sampling:
            const = constant_groups(rewards, batch.group_ids)
            m["batch/groups_dropped_constant"] = float(torch.unique(batch.group_ids[const]).numel())
            keep &= ~const
        if batch.advantages is not None:
            adv = batch.advantages.to(torch.float32)
        else:  # group statistics over all samples of the group, before dropping empty ones
            adv = grpo_advantages(rewards, batch.group_ids, cfg.advantage.normalize_std,
                                  cfg.advantage.eps)
        empty = lengths == 0
        m["batch/samples_dropped_empty"] = float((empty & keep).sum())
        keep &= ~empty
        m["batch/samples"] = float(keep.sum())
        if not keep.any():
            return None, None, m
        idx = torch.nonzero(keep).flatten()
        kept, adv = batch.select(idx), adv[idx]
        m["batch/tokens"] = float(kept.response_mask.sum())
        m["batch/adv_abs_mean"] = float(adv.abs().mean())
        return kept, adv, m

    # ------------------------------------------------------------------ forwards
    def micro_size(self, b: TrainBatch, heads: int) -> int:
        """Samples per (global) micro-batch: ``micro_batch_size``, or with 'auto' the most that keep
        one rank's share of the micro-batch's logits (samples × trimmed width × vocabulary ×
        ``heads``) within ``micro_batch_logits`` (at least 1 per rank)."""
        if self.cfg.micro_batch_size != "auto":
            return int(self.cfg.micro_batch_size)
        per_sample = self._trim(b.input_ids, b.attention_mask) * self.model.config.vocab_size * max(heads, 1)
        ranks = 1 if self.dp is None else self.dp.world  # the budget is each rank's
        return max(1, min(b.size, ranks * (self.cfg.micro_batch_logits // per_sample)))

    @staticmethod
    def _trim(ids: torch.Tensor, attn: torch.Tensor) -> int:
        """Width after dropping trailing columns that are padding in every row."""
        cols = attn.bool().any(0).nonzero()
        return int(cols.max()) + 1 if cols.numel() else 1

    def _forward(self, b: TrainBatch, num_mtp: int, backbone_grad: bool, lm_head_grad: bool,
                 entropy: bool, width: int | None = None, distill_heads: int = 0):
        # A row's log-probs depend (in float rounding) on the padded width it is computed at, not
        # on the other rows: a rank's share of a micro-batch takes the whole micro-batch's width,
        # so its rows come out bit for bit as in one process.
        width = self._trim(b.input_ids, b.attention_mask) if width is None else width
        # bf16 autocast (GPU) covers the forward only: the log-probs come out float32
        # (model._token_logprobs_from_hidden upcasts the logits) and backward runs outside it.
        with self.placement.autocast():
            out = self.model.token_logprobs(
                b.input_ids[:, :width], b.attention_mask[:, :width], num_mtp=num_mtp,
                mtp_backbone_grad=backbone_grad, mtp_lm_head_grad=lm_head_grad, with_entropy=entropy,
                # The bonus needs a differentiable entropy; as a metric it stays gradient-free.
                entropy_grad=entropy and self.cfg.entropy_coef > 0,
                # every loss, ratio and metric reads response tokens only: no logits elsewhere
                needed=b.response_mask[:, :width],
                temperature=self.cfg.temperature,  # the sampling distribution (cfg.temperature)
                distill_heads=distill_heads,  # full-vocabulary rows of mtp.distill (training only)
            )
        return out, width

    def old_logprobs(self, b: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """π_old for the whole batch: (K, B, T) target-aligned head log-probs (main + the K−1 MTP
        heads MPO needs) and the main head's entropy (B, T), as CPU tensors on any device."""
        old, ent = self._old_logprobs(b.to(self.device))
        return old.cpu(), ent.cpu()

    @torch.no_grad()
    def _old_logprobs(self, b: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`old_logprobs` of a batch already on the learner's device, left there (once per
        update, micro-batched)."""
        bsz, t = b.input_ids.shape
        old = torch.zeros(self.k, bsz, t, device=self.device)
        ent = torch.zeros(bsz, t, device=self.device)
        for idx, pad in self.row_chunks(bsz, self.chunk_size(b, self.k)):
            out, w = self._forward(b.select(idx), self.k - 1, False, False, True)
            if pad:
                continue
            old[:, idx, :w] = out.logprobs[: self.k].float()
            if out.entropy is not None:
                ent[idx, :w] = out.entropy.float()
        # each rank filled its own rows (zeros elsewhere): the sum is the whole batch's
        return self._sum(old), self._sum(ent)

    # ------------------------------------------------------------------ loss of a micro-batch
    def _micro_loss(self, b: TrainBatch, adv: torch.Tensor, old: torch.Tensor | None,
                    norm: Normaliser, st: _Stats, parts: dict[str, float], at_old: bool = False,
                    width: int | None = None, occ_width: int | None = None) -> torch.Tensor:
        """Loss of one micro-batch (a share of the mini-batch loss); adds diagnostics to `st`
        and loss parts (summed over the mini-batch's micro-batches) to `parts`. ``at_old``: no
        optimiser step yet in this update, so θ = θ_old and δ_RL is 0 by construction. ``old``
        None (only at θ_old): this forward's own log-probs, detached, are π_old, and it reports
        the rows' entropy. In a learner group ``b`` is this rank's share of the micro-batch,
        ``width`` the whole micro-batch's padded width and ``occ_width`` its widest response
        (the authors' OCC window)."""
        cfg = self.cfg
        if old is None and not at_old:
            raise ValueError("π_old can be read off the training forward only before the update's first step")

        def part(name: str, value: torch.Tensor) -> None:
            parts[name] = parts.get(name, 0.0) + float(value)

        out, w = self._forward(b, self.n_heads, self.backbone_grad, self.lm_head_grad,
                               cfg.entropy_coef > 0 or old is None, width, self.n_distill)
        lp, valid = out.logprobs, out.valid  # (H, B, w) each
        resp = b.response_mask[:, :w].bool()  # (B, w)
        if (resp & ~valid[0]).any():
            raise ValueError("response tokens without a main-head prediction (position 0 or "
                             "padding); check response_mask against attention_mask")
        if old is None:
            old = lp[: self.k].detach().float()
            if resp.any():
                st.add("policy/entropy", out.entropy.detach()[resp].float().mean(), float(resp.sum()))
        old = old[:, :, :w]  # (K, B, w)
        old_main = old[0]
        logp = lp[0]  # (B, w)
        adv_t = adv[:, :w] if adv.dim() == 2 else adv.unsqueeze(1).expand_as(logp)  # (B, w)
        ell0 = logp - old_main  # (B, w) main-head token log-ratio

        behav_w = behav_keep = None
        if cfg.decoupled.enabled and b.behav_logprobs is not None:
            behav_w, behav_keep = decoupled_weights(
                old_main, b.behav_logprobs[:, :w].float(), resp, cfg.decoupled.behav_weight_cap)
            st.add("ratio/behav_weight_mean", behav_w[resp].mean(), float(resp.sum()))
            st.add("ratio/behav_capped_frac", (resp & ~behav_keep).sum() / resp.sum().clamp(min=1),
                   float(resp.sum()))

        # MTP heads, target-aligned: head k's log-prob of the same token t (OCC's view)
        n_mtp = self.n_heads
        mtp_mask = valid[1 : 1 + n_mtp] & resp.unsqueeze(0)  # (H', B, w)
        lam = None
        if n_mtp > 0:
            with torch.no_grad():
                # At θ = θ_old, δ_RL = 0 exactly (Eq. 13 gives λ = 0); the recomputed log-ratio is
                # float noise (~1e-7, sign by rounding) that AdamW's normalisation would turn into
                # learning-rate-sized steps of the MTP heads in a noise direction (seen: head-1
                # clip fraction 0.16 on CPU vs 0.21 on CUDA after one update).
                d_rl = torch.zeros_like(ell0) if at_old else ell0.detach()
                d_mtp = lp[1 : 1 + n_mtp].detach() - old_main.unsqueeze(0)  # (H', B, w)
                if self.need_lambda:
                    reduce = None if self.dp is None else self.dp.sum_  # the micro-batch's λ
                    if cfg.occ.estimator == "paper":
                        occ = occ_lambda_paper(d_rl, d_mtp, mtp_mask, cfg.occ.lambda_plus,
                                               cfg.occ.eps, reduce)
                    else:
                        occ = occ_lambda_authors(d_rl, d_mtp, mtp_mask, response_window(resp, occ_width),
                                                 cfg.occ.lambda_plus, cfg.occ.eps, reduce)
                    lam = occ.lam
                    for k in range(n_mtp):
                        st.add(f"mtp/lambda/head{k + 1}", occ.lam[k])
                        st.add(f"mtp/c_hat/head{k + 1}", occ.c_hat[k])
                        st.add(f"mtp/v2_hat/head{k + 1}", occ.v2_hat[k])
                for k in range(n_mtp):
                    mk = mtp_mask[k]
                    nk = float(mk.sum())
                    if nk:
                        st.add(f"mtp/nll/head{k + 1}", -lp[k + 1].detach()[mk].mean(), nk)

        # policy log-ratio: token-level, or MPO's block ratio
        if self.k > 1:
            cur = lp[: self.k]  # (K, B, w)
            if cfg.mpo.grad == "occ":
                cur = torch.cat([cur[:1], scale_grad(cur[1:], lam[: self.k - 1].view(-1, 1, 1))])
            cur_b, ok = block_view(cur, valid[: self.k], resp, self.k)  # (K, B, w)
            old_b, _ = block_view(old, valid[: self.k], resp, self.k)
            log_ratio = block_log_ratio(cur_b, old_b, ok, self.w, cfg.mpo.form)  # (B, w)
            with torch.no_grad():
                st.add_masked("ratio/block", torch.exp(log_ratio.detach().clamp(-20, 20)), resp)
                for k in range(1, self.k):
                    hk = torch.exp((cur_b[k] - old_b[k]).detach().clamp(-20, 20))
                    out_of = (hk < 1 - cfg.clip_low) | (hk > 1 + cfg.clip_high)
                    n_ok = float(ok[k].sum())
                    if n_ok:
                        st.add(f"ratio/head{k}_out_of_clip_frac", out_of[ok[k]].float().mean(), n_ok)
        else:
            log_ratio = ell0

        pg, tl = policy_loss(log_ratio, adv_t, resp, cfg, behav_w, behav_keep, norm)
        total = pg
        n_tok = float(resp.sum())
        with torch.no_grad():
            st.add_masked("ratio/token", torch.exp(ell0.detach().clamp(-20, 20)), resp)
            st.add("ratio/clip_frac", tl.clipped[resp].float().mean(), n_tok)
            st.add("ratio/approx_kl", kl_k3(logp.detach(), old_main)[resp].mean(), n_tok)

        if self.n_train > 0:
            ml = mtp_regime_loss(cfg, lp[1 : 1 + self.n_train], mtp_mask[: self.n_train],
                                 old_main, adv_t, lam, behav_w, behav_keep, norm)
            total = total + ml.loss
            part("loss/mtp", ml.loss.detach())
            for k, (lk, tlk) in enumerate(zip(ml.per_head, ml.token_losses)):
                part(f"loss/mtp/head{k + 1}", lk)
                if tlk is not None:
                    mk = mtp_mask[k]
                    if mk.any():
                        st.add(f"mtp/clip_frac/head{k + 1}", tlk.clipped[mk].float().mean(),
                               float(mk.sum()))
        if self.n_distill:
            dl = self._distill_loss(out.distill, mtp_mask, norm, st, part)
            total = total + cfg.mtp.distill.coef * dl
            part("loss/mtp_distill", dl.detach())
        if cfg.advantage.kl_coef > 0:
            if b.ref_logprobs is None:
                raise ValueError("advantage.kl_coef > 0 needs ref_logprobs in the batch")
            kl = aggregate(kl_k3(logp, b.ref_logprobs[:, :w].float()), resp, cfg.aggregation, norm)
            total = total + cfg.advantage.kl_coef * kl
            part("loss/kl", kl.detach())
            st.add("policy/kl_ref", kl_k3(logp.detach(), b.ref_logprobs[:, :w].float())[resp].mean(),
                   n_tok)
        if cfg.entropy_coef > 0:
            ent = aggregate(out.entropy, resp, cfg.aggregation, norm)
            total = total - cfg.entropy_coef * ent
            part("loss/entropy", ent.detach())
        part("loss/policy", pg.detach())
        return total

    def _distill_loss(self, rows, mtp_mask: torch.Tensor, norm: Normaliser, st: _Stats, part) -> torch.Tensor:
        """Σ_k of head k's distillation loss (`learner.mtp_distill`, ``cfg.mtp.distill.kind``),
        each reduced over head k's response tokens like every per-token loss (``cfg.aggregation``
        with the mini-batch's normaliser, so micro-batches and ranks sum to the mini-batch's
        term). ``rows`` come from the model's gradient-isolated path (`DistillRows`): the term
        moves only the MTP modules. Metrics: the loss, top-1 agreement with the main head (a
        greedy drafter's acceptance) and 1 − TV (probabilistic drafting's expected acceptance)."""
        d = self.cfg.mtp.distill
        total = mtp_mask.new_zeros((), dtype=torch.float32)
        for k, r in enumerate(rows, start=1):
            tok = distill_token_loss(d.kind, r.student_logits, r.teacher_logp, d.top_k)  # (M_k,)
            mk = mtp_mask[k - 1]  # (B, w): the same positions as r.index
            full = tok.new_zeros(mk.shape).index_put(r.index, tok)  # (B, w)
            lk = aggregate(full, mk, self.cfg.aggregation, norm)
            total = total + lk
            part(f"loss/mtp_distill/head{k}", lk.detach())
            n = float(tok.numel())
            if n:
                with torch.no_grad():
                    st.add(f"mtp/distill_loss/head{k}", tok.detach().mean(), n)
                    st.add(f"mtp/distill_top1/head{k}",
                           top1_agreement(r.student_logits, r.teacher_logp).float().mean(), n)
                    st.add(f"mtp/distill_accept/head{k}",
                           1.0 - distill_tv(r.student_logits.detach(), r.teacher_logp).mean(), n)
        return total

    def _guarded_step(self, loss: float) -> torch.Tensor | None:
        """Clip the gradients and take the AdamW step; the grad norm, or None when the loss or the
        norm is not finite (NaN/Inf guard: the gradients are dropped, the step skipped; the caller
        counts it)."""
        gn = self._clip_grad_norm()
        if not (math.isfinite(loss) and torch.isfinite(gn)):
            self.opt.zero_grad(set_to_none=True)
            return None
        self.opt.step()
        return gn

    def _head_steps(self, kept: TrainBatch, logit_rows: int) -> dict[str, float]:
        """``mtp.distill.head_steps`` AdamW steps of the distillation term alone on each micro-batch
        of the last ``mtp.distill.replay`` update batches (oldest first) and then of this one, after
        the update: the teacher is the updated main head (the policy the next rollouts sample and
        the head will draft for), recomputed on every batch's tokens. The backbone does not change
        during these steps, so it runs once per micro-batch, without autograd
        (`PolicyModel.distill_backbone`), and each step runs the MTP modules and the teacher's and
        heads' projections at response tokens only (`PolicyModel.distill_heads`). Only the MTP
        modules get a gradient; AdamW leaves every other parameter and its moments as they are. In a
        learner group every rank holds the same batches and computes its share of each global
        micro-batch, as in the update. Metrics: the term's loss at the first and the last step
        (``loss/mtp_head_steps_first/last``, micro-batch means), the steps taken and the batches
        replayed."""
        d = self.cfg.mtp.distill
        batches = [b.to(self.device) for b in self.distill_replay] + [kept]
        first: list[float] = []
        last: list[float] = []
        steps = skipped = 0
        for b in batches:
            resp_all, row_tokens = b.response_mask.bool(), b.attention_mask.sum(-1)
            for micro in torch.split(torch.arange(b.size, device=self.device), self.micro_size(b, logit_rows)):
                rows, pad = self.micro_share(micro, row_tokens)
                sub = b.select(rows)
                if pad:
                    sub.response_mask = torch.zeros_like(sub.response_mask)
                w = self._trim(b.input_ids[micro], b.attention_mask[micro])
                ids, attn, resp = sub.input_ids[:, :w], sub.attention_mask[:, :w], sub.response_mask[:, :w].bool()
                norm = Normaliser.of(resp_all[micro])
                with self.placement.autocast():
                    h, embeds, main_hidden = self.model.distill_backbone(ids)
                losses: list[float] = []
                for _ in range(d.head_steps):
                    self.opt.zero_grad(set_to_none=True)
                    with self.placement.autocast():
                        rows_k, valid = self.model.distill_heads(h, embeds, main_hidden, ids, attn, resp,
                                                                 self.n_distill, self.cfg.temperature)
                    loss = d.coef * self._distill_loss(rows_k, valid & resp.unsqueeze(0), norm, _Stats(),
                                                       lambda *_: None)
                    loss.backward()
                    total = float(loss.detach())
                    if self.dp is not None:
                        total = self.dp.sum_floats([total])[0]
                    if self._guarded_step(total) is None:
                        skipped += 1
                        continue
                    steps += 1
                    losses.append(total)
                if losses:
                    first.append(losses[0])
                    last.append(losses[-1])
        self.opt.zero_grad(set_to_none=True)
        if d.replay:
            self.distill_replay.append(distill_rows(kept.input_ids, kept.attention_mask, kept.response_mask))
        out = {"optim/head_steps": float(steps), "optim/head_steps_skipped": float(skipped),
               "mtp/distill_replayed_batches": float(len(batches) - 1)}
        if first:
            out["loss/mtp_head_steps_first"] = sum(first) / len(first)
            out["loss/mtp_head_steps_last"] = sum(last) / len(last)
        return out

    def state_bytes(self) -> int:
        """Bytes of this rank's parameters, gradients and optimiser state (its shards, in a
        group): what sharding divides by the number of ranks."""
        def local(t: torch.Tensor) -> int:
            t = t.to_local() if hasattr(t, "to_local") else t
            return t.numel() * t.element_size()

        n = sum(local(p) + (local(p.grad) if p.grad is not None else 0) for p in self.params)
        return n + sum(local(v) for st in self.opt.state.values() for v in st.values() if torch.is_tensor(v))

    def _clip_grad_norm(self) -> torch.Tensor:
        """The global gradient norm (clipped to ``grad_clip`` when set). Sharded gradients are
        DTensors: their norm is reduced over the ranks' shards, so every rank clips alike."""
        limit = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        if self.dp is None:
            return torch.nn.utils.clip_grad_norm_(self.params, limit)
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, limit, total)
        return total

    # ------------------------------------------------------------------ the update
    def _first_forward_is_old(self) -> bool:
        """One pass over the data (epochs = 1): the first mini-batch's training forward runs at
        θ_old, so its detached log-probs are π_old for its rows and the separate no-grad pass
        covers the other mini-batches only (1/mini_batches of that pass saved; all of it with one
        mini-batch). With more epochs every row is revisited after a step and needs the pass."""
        return self.cfg.epochs == 1

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One policy update (cfg.epochs × cfg.mini_batches AdamW steps); returns flat metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        kept, adv, metrics = self.prepare(batch.to("cpu"))  # host-side: a few (B,) tensors
        metrics["learner/version"] = float(self.version)
        if kept is None:  # every group constant or every sample empty: nothing to learn from
            metrics["optim/skipped_empty_batch"] = 1.0
            metrics["optim/steps"] = 0.0
            return metrics
        kept, adv = kept.to(self.device), adv.to(self.device)
        self.model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.version)
        n = kept.size
        # host RNG: the same order anywhere
        perms = [torch.randperm(n, generator=gen).to(self.device) for _ in range(cfg.epochs)]
        epochs = [torch.tensor_split(p, min(cfg.mini_batches, n)) for p in perms]
        reuse = self._first_forward_is_old()
        st, loss_st = _Stats(), _Stats()
        resp_all = kept.response_mask.bool()
        t_old = time.perf_counter()
        old = torch.zeros(self.k, n, kept.input_ids.shape[1], device=self.device)
        # the rows π_old is computed for: all, or those after the first mini-batch of the one epoch
        rest = perms[0][len(epochs[0][0]):] if reuse else torch.arange(n, device=self.device)
        if rest.numel():
            old_rest, entropy = self._old_logprobs(kept.select(rest))
            old[:, rest] = old_rest
            resp_rest = resp_all[rest]
            if resp_rest.any() and (self.dp is None or self.dp.rank == 0):  # already the whole group's
                st.add("policy/entropy", entropy[resp_rest].mean(), float(resp_rest.sum()))
        self.placement.synchronize()  # device work is queued: time it, not its launch
        metrics["perf/old_logprob_s"] = time.perf_counter() - t_old

        # main + MTP heads of the training forward, plus mtp.distill's full-vocabulary rows: the
        # teacher's and one per distilled head (the logits a micro-batch's memory grows with)
        logit_rows = 1 + self.n_heads + (self.n_distill + 1 if self.n_distill else 0)
        micro_size = self.micro_size(kept, logit_rows)
        metrics["perf/micro_batch_size"] = float(micro_size)
        row_tokens = kept.attention_mask.sum(-1)  # what a row costs a forward: the group balances it
        steps = skipped = 0
        optim_s = optim_cpu_s = 0.0
        grad_norms: list[float] = []
        for epoch, mini_batches in enumerate(epochs):
            for j, mb in enumerate(mini_batches):
                from_forward = reuse and epoch == 0 and j == 0
                norm = Normaliser.of(resp_all[mb])
                self.opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                parts: dict[str, float] = {}
                for micro in torch.split(mb, micro_size):
                    rows, pad = self.micro_share(micro, row_tokens)
                    sub = kept.select(rows)
                    if pad:  # no rows for this rank: a masked row keeps FSDP's collectives in step
                        sub.response_mask = torch.zeros_like(sub.response_mask)
                    loss = self._micro_loss(sub, adv[rows], None if from_forward else old[:, rows], norm, st,
                                            parts, at_old=steps == 0,
                                            width=self._trim(kept.input_ids[micro], kept.attention_mask[micro]),
                                            occ_width=response_width(resp_all[micro]))
                    loss.backward()
                    step_loss += float(loss.detach())
                if self.dp is not None:  # each rank holds its share of the loss and its parts
                    names = sorted(parts)
                    total = self.dp.sum_floats([step_loss] + [parts[k] for k in names])
                    step_loss, parts = total[0], dict(zip(names, total[1:]))
                t_opt, c_opt = time.perf_counter(), time.process_time()
                gn = self._guarded_step(step_loss)
                if gn is None:
                    skipped += 1
                    continue
                if steps == 0:  # parameters, gradients and AdamW state are all alive here
                    metrics["mem/state_bytes"] = float(self.state_bytes())
                self.placement.synchronize()
                optim_s += time.perf_counter() - t_opt
                optim_cpu_s += time.process_time() - c_opt
                steps += 1
                grad_norms.append(float(gn))
                loss_st.add("loss/total", step_loss)
                for name, v in parts.items():
                    loss_st.add(name, v)
        self.opt.zero_grad(set_to_none=True)
        if self.n_distill and cfg.mtp.distill.head_steps:
            head = self._head_steps(kept, logit_rows)
            skipped += int(head.pop("optim/head_steps_skipped"))
            metrics.update(head)
        self.placement.synchronize()
        self.skipped_nonfinite_total += skipped
        self.version += 1

        if self.dp is not None:  # weighted means over every rank's rows: Σ v·w and Σ w
            keys = self.dp.union_keys(list(st.num))
            sums = self.dp.sum_floats([st.num.get(k, 0.0) for k in keys] + [st.den.get(k, 0.0) for k in keys])
            st.num = dict(zip(keys, sums[: len(keys)]))
            st.den = dict(zip(keys, sums[len(keys):]))
        metrics.update(st.result())
        metrics.setdefault("policy/entropy", 0.0)  # no response token in the batch
        metrics.update(loss_st.result())  # already global: the loss was summed over ranks
        metrics["optim/steps"] = float(steps)
        metrics["optim/skipped_nonfinite"] = float(skipped)
        metrics["optim/skipped_nonfinite_total"] = float(self.skipped_nonfinite_total)
        metrics["optim/lr"] = float(self.opt.param_groups[0]["lr"])
        if len(self.opt.param_groups) > 1:
            metrics["optim/lr_mtp"] = float(self.opt.param_groups[1]["lr"])
        if grad_norms:
            metrics["optim/grad_norm"] = sum(grad_norms) / len(grad_norms)
            metrics["optim/grad_norm_max"] = max(grad_norms)
        dt = time.perf_counter() - t0
        if self.dp is not None:  # the group is as fast as its slowest rank
            dt, optim_s, optim_cpu_s, metrics["perf/old_logprob_s"] = self.dp.max_floats(
                [dt, optim_s, optim_cpu_s, metrics["perf/old_logprob_s"]])
            metrics["learner/ranks"] = float(self.dp.world)
            if "mem/state_bytes" in metrics:  # the largest rank's (shards differ by padding)
                metrics["mem/state_bytes"] = self.dp.max_floats([metrics["mem/state_bytes"]])[0]
        metrics["perf/step_s"] = dt
        metrics["perf/optim_s"] = optim_s  # gradient clipping + AdamW
        metrics["perf/optim_cpu_s"] = optim_cpu_s
        metrics["perf/tokens_per_s"] = float(resp_all.sum()) * cfg.epochs / max(dt, 1e-9)
        return metrics
