"""ETEGRec (Liu et al. 2025, "Generative Recommender with End-to-End Learnable Item
Tokenization"): the pieces of train_joint.py, written from the paper's description.

- :func:`code_log_probs`: P(k | v_l) = softmax_k(-||v_l - e_k||^2) at every level l of the
  residual quantizer, v_l the level-l residual of a latent (formed with its own nearest codes).
- :func:`sia_loss` (sequence-item alignment): symmetric KL between the code distributions of the
  sequence's latent (an MLP of the mean-pooled encoder states) and of the target item's RQ-VAE
  latent, summed over levels.
- :func:`psa_loss` (preference-semantic alignment): symmetric in-batch InfoNCE (cosine,
  temperature) between the preference vector (an MLP of the first decoder state) and the RQ-VAE
  reconstruction of the target item, the two directions summed as in the paper's Eq. 16; rows
  with the same target are not each other's negatives.
- :class:`PhaseSchedule`: global step -> tokenizer or recommender epoch, alignment on/off, and
  whether the item codes are recomputed before the step.
- :class:`JointModel`: T5 + RQ-VAE + the two heads + the item-code buffer, its per-phase loss
  (the frozen side runs without gradient) and the code refresh (:class:`RefreshStats`), which
  keeps a starting tokenizer's LC-Rec rebalancing (:func:`codes_were_rebalanced`).
- :func:`start_layout`: the token layout a starting tokenizer gives (its levels + a dedup level);
  :class:`CodeRefresher`: stage 1's per-step hook (the phase; codes recomputed, refreshes logged).

Departures from the paper are listed in train_joint.py's docstring (among them the tokenizer's
input: whatever ``load_item_embeddings`` gives, MiniLM text embeddings in the README's Beauty
runs, where the paper quantizes SASRec collaborative embeddings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from modules import distributed
from modules.quantizers.rqvae import RQVAE, item_sq_error, mlp
from modules.semantic_ids import add_dedup_level, codebook_usage, collision_stats
from modules.tokens import TokenLayout
from modules.training import StepOutput, length_chunks
from modules.transformers.generation import shift_right
from modules.transformers.t5 import T5

# ----------------------------------------------------------------------------- losses


def code_log_probs(z: Tensor, codebooks: Tensor) -> Tensor:
    """Latents z (B, d), codebooks (L, K, d) -> log P(k | v_l) (B, L, K).

    The residual chain v_0 = z, v_{l+1} = v_l - e_{argmin_k ||v_l - e_k||} picks the same codes as
    ``RQVAE.encode`` (Euclidean distance) and stays differentiable in z and in the codebooks."""
    out, v = [], z
    for codebook in codebooks:
        dist = (v.pow(2).sum(1, keepdim=True) - 2 * v @ codebook.T + codebook.pow(2).sum(1)).clamp_min(0)
        out.append(F.log_softmax(-dist, dim=-1))
        v = v - codebook[dist.argmin(1)]
    return torch.stack(out, 1)


def sia_loss(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Symmetric KL, KL(p||q) + KL(q||p) = sum (p - q)(log p - log q), summed over levels and codes,
    averaged over the batch; log_p, log_q (B, L, K) from :func:`code_log_probs`."""
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum((1, 2)).mean()


def psa_loss(h: Tensor, r: Tensor, target: Tensor, temperature: float = 0.07) -> Tensor:
    """Symmetric in-batch InfoNCE between rows of h (B, D) and r (B, D): row i's positive is r_i
    (h_i), its negatives the other rows except those with the same ``target`` item (they would be
    positives pushed apart), by cosine similarity / temperature. The two directions (h -> r and
    r -> h, each a mean over the batch) are summed, not averaged, as in the paper's Eq. 16 (and
    its official trainer): psa_weight (lambda) multiplies that sum."""
    logits = F.normalize(h, dim=-1) @ F.normalize(r, dim=-1).T / temperature
    same = target[:, None] == target[None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(target), dtype=torch.bool, device=h.device), float("-inf"))
    labels = torch.arange(len(target), device=h.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


# ----------------------------------------------------------------------------- schedule


class Phase(NamedTuple):
    unit: int  # the schedule's epoch (or epoch_steps-long unit) the step belongs to
    tokenizer: bool  # a tokenizer epoch (recommender frozen); else a recommender epoch (tokenizer frozen)
    align: bool  # SIA / PSA on (from unit warm_epochs on)
    refresh: bool  # recompute every item's codes before this step (the first step after a tokenizer epoch)


@dataclass(frozen=True)
class PhaseSchedule:
    """Cycles of ``cycle`` units of ``epoch_steps`` steps: one tokenizer unit, then cycle - 1
    recommender units; alignment off for the first ``warm_epochs`` units. A pure function of the
    global step, so it is right after a resume."""

    epoch_steps: int
    cycle: int = 2
    warm_epochs: int = 10

    def __post_init__(self):
        if self.epoch_steps < 1 or self.cycle < 2 or self.warm_epochs < 0:
            raise ValueError(f"PhaseSchedule: need epoch_steps >= 1, cycle >= 2 (a tokenizer epoch and at least one "
                             f"recommender epoch) and warm_epochs >= 0, got {self}")

    def __call__(self, step: int) -> Phase:
        unit = step // self.epoch_steps
        after_tokenizer = step > 0 and step % self.epoch_steps == 0 and (unit - 1) % self.cycle == 0
        return Phase(unit, unit % self.cycle == 0, unit >= self.warm_epochs, after_tokenizer)


# ----------------------------------------------------------------------------- code refresh


@torch.no_grad()
def codes_were_rebalanced(rqvae: RQVAE, item_codes: Tensor, emb: Tensor) -> bool:
    """Whether a tokenizer's item codes (N, L or L + 1 with a dedup level) are the LC-Rec
    rebalancing of its RQ-VAE's nearest codes (train_rqvae.rebalance_last_level,
    ``RQVAE.rebalance_collisions``) rather than the nearest codes themselves: they differ from
    ``rqvae.encode(emb)`` in the last RQ-VAE level only, and collide less. Such a tokenizer's
    refreshes must rebalance too (``JointModel(rebalance=True)``), or the first refresh would
    undo the balancing and could overflow a dedup level sized from the rebalanced groups."""
    levels = rqvae.config.num_levels
    codes = item_codes[:, :levels].to(rqvae.codebooks.device)
    nearest = rqvae.encode(emb)
    if torch.equal(codes, nearest) or not torch.equal(codes[:, :-1], nearest[:, :-1]):
        return False
    return collision_stats(codes)["collision_rate"] < collision_stats(nearest)["collision_rate"]


@dataclass
class RefreshStats:
    step: int  # the refresh ran before this global step
    changed: int  # items whose RQ-VAE codes (without the dedup level) changed
    changed_id: int  # items whose whole ID changed (a dedup rank can move when a group changes)
    changed_per_level: list[int]  # items whose level-l code changed, per RQ-VAE level
    collision_rate: float  # before dedup (after the LC-Rec rebalancing when ``rebalanced``)
    max_group: int
    codebook_usage: list[float]  # per RQ-VAE level
    rebalanced: bool = False  # the nearest codes were rebalanced (LC-Rec) before the dedup level

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"codes refreshed before step {self.step}{' (rebalanced)' if self.rebalanced else ''}: {self.changed} "
                f"items changed code (per level {self.changed_per_level}; {self.changed_id} IDs), collision "
                f"{self.collision_rate:.4f} (max group {self.max_group}), usage "
                f"{[round(u, 3) for u in self.codebook_usage]}")


class RefreshLog:
    """The refresh figures of a run, in a JSON file beside its checkpoints (they outlive a restart
    that resumes from last.pt). ``resume_at(step)`` drops the entries a resumed run redoes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = json.loads(self.path.read_text()) if self.path.is_file() else []

    def resume_at(self, step: int) -> None:
        self.records = [r for r in self.records if r["step"] < step]
        self._save()

    def add(self, stats: RefreshStats) -> None:
        self.records.append(stats.to_dict())
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(self.records, indent=1))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- the joint model


@contextmanager
def frozen(*modules: nn.Module):
    """The frozen side of a phase: eval mode (no dropout) and no gradient; modes restored after."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class JointModel(nn.Module):
    """T5 recommender + RQ-VAE tokenizer + SIA head (d_model -> RQ-VAE latent) + PSA head
    (d_model -> item-embedding space) + ``item_codes`` (N, L + 1), a persistent buffer (in every
    checkpoint) that only :meth:`refresh_codes` changes.

    The RQ-VAE stays in eval mode whatever ``train()`` says: its training-mode side effects (k-means
    init, usage EMA, EMA codebook updates, dead-code re-seeding) would move codes behind the
    recommender's back; gradients flow in eval mode all the same. Its codebooks become
    gradient-trained parameters (``codebook_update = 'loss'``: L_SQ gains the codebook term), as
    EMA updates would need training mode and SIA must reach them.

    ``rebalance``: the starting codes are LC-Rec-rebalanced (:func:`codes_were_rebalanced`), so every
    refresh rebalances the recomputed nearest codes the same way before adding the dedup level.
    """

    def __init__(self, t5: T5, rqvae: RQVAE, item_codes: Tensor, dedup_capacity: int, head_hidden: int = 256,
                 rebalance: bool = False):
        super().__init__()
        c = rqvae.config
        if not isinstance(rqvae, RQVAE) or c.distance != "euclidean":
            raise ValueError("JointModel: ETEGRec's code distributions need an RQVAE with Euclidean code choice, got "
                             f"{type(rqvae).__name__} ({getattr(c, 'distance', '?')})")
        if item_codes.shape[1] != c.num_levels + 1 or int(item_codes[:, -1].max()) >= dedup_capacity:
            raise ValueError(f"JointModel: item_codes {tuple(item_codes.shape)} must be the {c.num_levels} RQ-VAE levels "
                             f"plus a dedup level with codes < dedup_capacity = {dedup_capacity}")
        rqvae.config = dataclasses.replace(c, codebook_update="loss")
        rqvae.codebooks.requires_grad_(True)
        self.t5, self.rqvae = t5, rqvae
        self.seq_head = mlp([t5.config.d_model, head_hidden, c.latent_dim])
        self.pref_head = mlp([t5.config.d_model, head_hidden, c.input_dim])
        self.dedup_capacity = dedup_capacity
        self.rebalance = rebalance
        self.register_buffer("item_codes", item_codes.long().clone())
        self.rqvae.eval()

    def recommender_modules(self) -> tuple[nn.Module, ...]:
        return self.t5, self.seq_head, self.pref_head

    def train(self, mode: bool = True) -> "JointModel":
        super().train(mode)
        self.rqvae.eval()
        return self

    def recommender_states(self, layout: TokenLayout, history: Tensor, target: Tensor, user: Tensor | None,
                           amp: torch.dtype | None = None, chunk: int | None = None,
                           with_ce: bool = True) -> tuple[Tensor, int, Tensor, Tensor]:
        """(summed CE over the targets' code tokens (0 without ``with_ce``), number of labels,
        masked mean of the encoder states (n, D), first decoder state (n, D)): the CE of
        ``objectives.sliding_window_loss`` (same chunks, same order of random draws)."""
        input_ids, mask = layout.encode_history(history, self.item_codes, user)
        labels = layout.encode_target(target, self.item_codes)
        ce = torch.zeros((), device=input_ids.device)
        rows, pooled, first = [], [], []
        for sel, width in length_chunks(mask.sum(1), chunk):
            with torch.autocast(input_ids.device.type, dtype=amp, enabled=amp is not None):
                memory, memory_mask = self.t5.encode_memory(input_ids[sel, :width], mask[sel, :width])
                states = self.t5.decode_states(shift_right(labels[sel]), *self.t5.memory(memory, memory_mask))
                logits = self.t5.output_logits(states) if with_ce else None
            if with_ce:
                ce = ce + F.cross_entropy(logits.float().flatten(0, 1), labels[sel].flatten(), reduction="sum")
            keep = memory_mask[..., None].float()
            pooled.append((memory.float() * keep).sum(1) / keep.sum(1).clamp_min(1))
            first.append(states[:, 0].float())
            rows.append(sel)
        order = torch.argsort(torch.cat(rows))
        return ce, labels.numel(), torch.cat(pooled)[order], torch.cat(first)[order]

    def tokenizer_outputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """RQ-VAE on item embeddings x (B, input_dim): (latent z, reconstruction, L_SQ = the
        RQ-VAE's own loss: reconstruction + commitment + codebook terms)."""
        z = self.rqvae.encoder(x)
        z_q, _, quant_loss = self.rqvae.quantize(z)
        recon = self.rqvae.decoder(z_q)
        return z, recon, item_sq_error(recon, x) + quant_loss

    def loss(self, layout: TokenLayout, emb: Tensor, history: Tensor, target: Tensor, user: Tensor | None,
             phase: Phase, sia_weight: float = 3e-4, psa_weight: float = 1e-4, temperature: float = 0.07,
             amp: torch.dtype | None = None, chunk: int | None = None) -> StepOutput:
        """One batch's loss in ``phase``: L_SQ (tokenizer epoch) or the CE of the target's codes
        (recommender epoch), plus sia_weight * SIA + psa_weight * PSA when ``phase.align``. The
        other side runs frozen (eval mode, no gradient), so its parameters get no gradient."""
        sia_on, psa_on = phase.align and sia_weight > 0, phase.align and psa_weight > 0
        stats = {}
        if not phase.tokenizer or sia_on or psa_on:
            with frozen(*self.recommender_modules()) if phase.tokenizer else nullcontext():
                ce, count, pooled, first = self.recommender_states(layout, history, target, user, amp, chunk,
                                                                   with_ce=not phase.tokenizer)
                z_seq = self.seq_head(pooled) if sia_on else None
                h_pref = self.pref_head(first) if psa_on else None
        if phase.tokenizer or sia_on or psa_on:
            with nullcontext() if phase.tokenizer else frozen(self.rqvae):
                z_item, recon, sq = self.tokenizer_outputs(emb[target])
        if phase.tokenizer:
            loss = sq
            stats["sq"] = sq.detach()
        else:
            loss = ce / count
            stats["ce"] = loss.detach()
        codebooks = self.rqvae.codebooks if phase.tokenizer else self.rqvae.codebooks.detach()
        if sia_on:
            sia = sia_loss(code_log_probs(z_seq, codebooks), code_log_probs(z_item, codebooks))
            loss = loss + sia_weight * sia
            stats["sia"] = sia.detach()
        if psa_on:
            psa = psa_loss(h_pref, recon, target, temperature)
            loss = loss + psa_weight * psa
            stats["psa"] = psa.detach()
        return StepOutput(loss, stats)

    @torch.no_grad()
    def current_codes(self, emb: Tensor) -> Tensor:
        """The current RQ-VAE's codes of every item (N, L): nearest codes, LC-Rec-rebalanced when
        ``rebalance`` (as the starting tokenizer's were)."""
        codes = self.rqvae.encode(emb)
        return self.rqvae.rebalance_collisions(emb, codes) if self.rebalance else codes

    @torch.no_grad()
    def refresh_codes(self, emb: Tensor, step: int) -> RefreshStats:
        """Recompute every item's codes from the current RQ-VAE (``emb``: all item embeddings, row =
        item_id; :meth:`current_codes`, so a rebalanced start stays rebalanced) with a fresh dedup
        level, so IDs stay unique; the vocabulary is fixed, so a group larger than the dedup
        capacity is an error."""
        codes = self.current_codes(emb)
        coll = collision_stats(codes)
        if coll["max_group"] > self.dedup_capacity:
            raise ValueError(f"JointModel.refresh_codes (step {step}): {coll['max_group']} items share one RQ-VAE code "
                             f"{'after rebalancing ' if self.rebalance else ''}but the dedup level holds "
                             f"{self.dedup_capacity}; raise train_joint.dedup_capacity "
                             "(it sizes the recommender's vocabulary, so start over)")
        new = add_dedup_level(codes, self.dedup_capacity)
        levels = codes.shape[1]
        moved = new != self.item_codes
        stats = RefreshStats(step, int(moved[:, :levels].any(1).sum()), int(moved.any(1).sum()),
                             moved[:, :levels].sum(0).tolist(), coll["collision_rate"], coll["max_group"],
                             codebook_usage(codes, self.rqvae.codebook_sizes), self.rebalance)
        self.item_codes.copy_(new)
        return stats


@torch.no_grad()
def start_layout(start, name: str, dedup_capacity: int | None, num_user_buckets: int) -> TokenLayout:
    """The token layout of a joint run from its starting tokenizer ``start`` (a SemanticIdTokenizer,
    ``train_joint.tokenizer = name``): its RQ-VAE's levels plus a dedup level of ``dedup_capacity``
    codes (None: max(the start's dedup size, 4 x its largest collision group): the recommender's
    vocabulary is fixed while the codes change); a ValueError when ``start`` is no RQ-VAE
    tokenizer with one dedup level."""
    if not isinstance(start.quantizer, RQVAE) or start.item_codes.shape[1] != len(start.quantizer.codebook_sizes) + 1:
        raise ValueError(f"train_joint.tokenizer = {name!r}: need a train_rqvae.py RQ-VAE tokenizer with one dedup "
                         f"level, got {type(start.quantizer).__name__} with {start.item_codes.shape[1]} code levels")
    capacity = dedup_capacity or max(start.codebook_sizes[-1], 4 * collision_stats(start.item_codes[:, :-1])["max_group"])
    return TokenLayout((*start.quantizer.codebook_sizes, capacity), num_user_buckets=num_user_buckets)


class CodeRefresher:
    """Stage 1's ``before_step`` hook (train_joint.py): ``phase``, the current step's phase of
    ``schedule``, and before the first step of each tokenizer epoch the item codes recomputed on
    every rank (the same weights give the same codes), the refresh logged by rank 0 to ``log``.
    ``first_step``: this process's first step; a resumed run redoes the log's records from it."""

    def __init__(self, model: JointModel, emb: Tensor, schedule: PhaseSchedule, log: RefreshLog):
        self.model, self.emb, self.schedule, self.log = model, emb, schedule, log
        self.phase, self.first_step = schedule(0), None

    def __call__(self, step: int, epoch: int) -> None:
        if self.first_step is None:
            self.first_step = step
            if distributed.is_main():
                self.log.resume_at(step)
        self.phase = self.schedule(step)
        if self.phase.refresh:
            stats = self.model.refresh_codes(self.emb, step)
            if distributed.is_main():
                self.log.add(stats)
                tqdm.write(f"[joint] {stats.line()}", file=sys.stderr)

    def budget_left(self, stop_after_steps: int | None, step: int) -> int | None:
        """What is left of a step budget for this process (``stop_after_steps``; None: none) once
        stage 1 has reached ``step``: the budget less the stage-1 steps this process ran."""
        if stop_after_steps is None:
            return None
        return max(0, stop_after_steps - (0 if self.first_step is None else step - self.first_step))


def final_code_stats(model: JointModel, emb: Tensor, start_codes: Tensor) -> dict:
    """The figures of ``model.item_codes`` (e.g. at the selected checkpoint): collisions and usage
    before dedup, items whose ID differs from ``start_codes``, and whether they are the RQ-VAE's
    current codes (:meth:`JointModel.current_codes`; False when the checkpoint's tokenizer trained on
    after its last refresh)."""
    codes = model.item_codes[:, :-1]
    coll = collision_stats(codes)
    return {"collision_rate": coll["collision_rate"], "max_group": coll["max_group"],
            "codebook_usage": codebook_usage(codes, model.rqvae.codebook_sizes),
            "changed_from_start": int((model.item_codes.cpu() != start_codes.cpu()).any(1).sum()),
            "match_tokenizer": bool(torch.equal(model.current_codes(emb), codes))}
