"""Rows for new tokens of a vocabulary that extends the source's (``target_tokenizer=domain``), made with the source
model itself: init method ``extend``.

Every old row is the source's, bit for bit; the head is untied (the output head becomes a copy of the tied
matrix), because one vector cannot be both a good input row and a good output row for a multi-piece token: as
an output row it competes with its own first piece, and the mean of its pieces (FVT) gives it a logit far below
the probability the source gave its string (measured in the README, "Domain vocabulary"). For a new token ``t``
spelled by source pieces ``p1 … pk``:

1. input row: the row of ``pk``, the piece after which the source has read the whole string;
2. output row: ``head[p1] + δ_t``, with ``δ_t`` the ridge regression (over the source's final hidden states ``h``
   on training text) of ``log P_source(p2 … pk | h, p1)``: where the string follows, the teacher-forced value;
   elsewhere its mean. So ``h · out_t ≈ logit_p1(h) + log P(rest)``, the source's logit for the whole string
   (``output="first"``, ``domain_vocab.init_output=first``: ``head[p1]`` alone, the ablation);
3. then ``steps`` Adam steps on the new rows only (input and output, every old row frozen), the learning rate
   decayed to 0 along a cosine (``schedule="constant"`` keeps it), on training windows under the new tokenization
   that hold a new token, with the next-token loss (``objective="lm"``) or, with ``objective="distill"``
   (``domain_vocab.init_objective``), the cross-tokenizer chunk loss of ``tokalign/distill.py`` with the source
   model as teacher: each chunk's log-likelihood under the new rows is pulled to the source's log-likelihood of the
   same bytes under its own tokenization; or, with ``objective="awedist"`` (Token Distillation, AweDist, arXiv
   2505.20133), the input rows by the mean squared gap between the model's last hidden states with the new rows and
   the source's at the same text positions with every new token spelled in its pieces (``HiddenTeacher``), the
   output rows by the next-token loss alone, as AweDist does (``objective="awedist_lm"``: the input rows take the
   next-token loss as well, the sum of both).

Settings (``domain_vocab.init_*``) were chosen on the dev split (``config.py`` says how).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tokalign.errors import TokalignError
from tokalign.output_rows import fit_output_rows

log = logging.getLogger("tokalign")


class ExtendError(TokalignError, ValueError):
    """The target vocabulary does not extend the source's (method ``extend`` needs it to)."""


@dataclass(frozen=True)
class ExtendSettings:
    fit_tokens: int  # source tokens of training text whose hidden states fit the output rows
    steps: int  # Adam steps on the new rows
    lr: float
    batch: int = 8
    window: int = 64
    ridge: float = 10.0  # ridge strength per 1,000 fitted positions
    seed: int = 0
    output: str = "fit"  # output rows before the steps: "fit" (step 2) or "first" (the first piece's row)
    objective: str = "lm"  # step 3's loss: "lm" (next-token), "distill" (chunk likelihoods), "awedist" (hidden states)
    # or "awedist_lm" (both for the input rows)
    schedule: str = "cosine"  # step 3's learning rate: "cosine" (from lr down to 0 at the last step) or "constant"


def new_token_pieces(tok: Any, src_tok: Any) -> list[list[int]]:
    """Source pieces of every new token (ids ``len(src_tok)`` …); an error when the first ids are not the source's."""
    v_s, sv, tv = len(src_tok), src_tok.get_vocab(), tok.get_vocab()
    if len(tok) < v_s or any(tv.get(t) != i for t, i in sv.items()):
        raise ExtendError(f"init_methods: 'extend' needs a target vocabulary that starts with the source's {v_s} tokens "
                          "(target_tokenizer=domain); this target does not")
    out = []
    for i in range(v_s, len(tok)):
        text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
        out.append(src_tok(text, add_special_tokens=False).input_ids or [0])
    return out


def output_rows(model: Any, docs: Sequence[Sequence[int]], pieces: Sequence[list[int]], head: Any,
                s: ExtendSettings) -> tuple[Any, dict]:
    """``head[p1] + δ_t`` for every new token (step 2 of the module docstring; ``tokalign/output_rows.py``), a
    token never seen in the fitting text taking ``c_t = 0`` (``head[p1]``: step 3 moves it)."""
    return fit_output_rows(model, docs, pieces, head, fit_tokens=s.fit_tokens, ridge=s.ridge, unseen=0.0)


def windows(docs: Sequence[Sequence[int]], is_new: np.ndarray, start: int, size: int, seed: int) -> list[list[int]]:
    """Training windows (``start`` token first) that hold at least one new token (``is_new[id]``), shuffled."""
    out = []
    for ids in docs:
        ids = list(ids)
        for a in range(0, len(ids), size - 1):
            w = ids[a:a + size - 1]
            if len(w) > 8 and is_new[w].any():
                out.append([start] + w)
    np.random.default_rng(seed).shuffle(out)
    return out


class ChunkTeacher:
    """``objective="distill"``: the source model (``model`` itself, which still has only the old rows) scores each
    window's text under the source tokenizer once; the loss is ``distill.chunk_loss``, the gap between the source's
    and the new rows' log-likelihoods of each chunk of shared token boundaries (``tokalign/distill.py``)."""

    def __init__(self, model: Any, tok: Any, src_tok: Any, start: int) -> None:
        from tokalign import distill

        self.model, self.src_tok, self.start, self.tb = model, src_tok, start, distill.token_bytes(tok)
        self.scored: dict[tuple, tuple] = {}

    def loss(self, logits: Any, ids: Any, batch: Sequence[list[int]]) -> Any:
        from tokalign import distill

        for w in batch:
            if tuple(w) not in self.scored:
                c = distill.align_chunks(w, self.tb, self.src_tok)
                self.scored[tuple(w)] = (c, distill.teacher_logprobs(self.model, c.teacher_ids, self.start, "cpu"))
        got = [self.scored[tuple(w)] for w in batch]
        return distill.chunk_loss(logits, ids, [c for c, _ in got], [lp for _, lp in got])[0]


class HiddenTeacher:
    """``objective="awedist"``: the source model (``model`` itself, old rows only) reads each window with every new
    token replaced by its source pieces; ``targets`` gives, for every window position, the source's last hidden state
    at the same text position (after a new token: at its last piece), computed without gradients."""

    def __init__(self, model: Any, pieces: Sequence[list[int]], v_s: int, lm_inputs: bool = False) -> None:
        self.model, self.pieces, self.v_s = model, pieces, v_s
        self.lm_inputs = lm_inputs  # the next-token loss reaches the input rows too ("awedist_lm")

    def spelled(self, w: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(source ids, index of each window position's last source piece)``."""
        ids, last = [], []
        for t in w:
            ids.extend(self.pieces[t - self.v_s] if t >= self.v_s else [t])
            last.append(len(ids) - 1)
        return ids, last

    def targets(self, batch: Sequence[list[int]], n: int) -> Any:
        import torch

        spelled = [self.spelled(w) for w in batch]
        ids, mask = padded([a for a, _ in spelled])
        with torch.no_grad():
            h = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        idx = torch.tensor([last + [last[-1]] * (n - len(last)) for _, last in spelled])
        return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))

    def loss(self, h: Any, batch: Sequence[list[int]], mask: Any) -> Any:
        """Mean over the batch's real positions of the squared gap to the source's hidden state (AweDist's MSE)."""
        gap = ((h - self.targets(batch, h.shape[1])) ** 2).mean(-1)
        return (gap * mask).sum() / mask.sum()


def padded(seqs: Sequence[list[int]]) -> tuple[Any, Any]:
    """``(ids, attention mask)``: the sequences right-padded with 0 to the longest, as tensors."""
    import torch

    n = max(len(w) for w in seqs)
    return (torch.tensor([list(w) + [0] * (n - len(w)) for w in seqs]),
            torch.tensor([[1] * len(w) + [0] * (n - len(w)) for w in seqs]))


def _next_token_loss(logits: Any, ids: Any, mask: Any) -> Any:
    import torch.nn.functional as F

    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def train_new_rows(model: Any, emb: Any, head: Optional[Any], rows: Sequence[int], wins: Sequence[list[int]],
                   s: ExtendSettings, teacher: Optional[ChunkTeacher | HiddenTeacher] = None, name: str = "extend") -> dict:
    """Step 3: Adam on the rows ``rows`` of ``emb`` and ``head`` (tensors changed in place; ``head=None``: a tied
    head, one change serves both roles), every other row and the body frozen; the next-token loss, ``teacher``'s
    chunk loss (``ChunkTeacher``), or (``HiddenTeacher``) its hidden-state loss for the input rows plus the
    next-token loss for the output rows only. ``model`` gives only its body (``model.base_model``)."""
    import torch
    import torch.nn.functional as F
    from transformers import get_scheduler

    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=emb.device)
    d_in = torch.zeros((len(idx), emb.shape[1]), dtype=emb.dtype, device=emb.device, requires_grad=True)
    d_out = None if head is None else torch.zeros((len(idx), head.shape[1]), dtype=head.dtype, device=head.device,
                                                  requires_grad=True)
    opt = torch.optim.Adam([d for d in (d_in, d_out) if d is not None], lr=s.lr)
    sched = get_scheduler(s.schedule, opt, num_warmup_steps=0, num_training_steps=s.steps)  # cosine or constant
    losses, t0, last_lr = [], time.time(), s.lr
    for step in range(s.steps):
        batch = [wins[(step * s.batch + k) % len(wins)] for k in range(s.batch)]
        ids, mask = padded(batch)
        e = emb.index_add(0, idx, d_in)
        h = model.base_model(inputs_embeds=F.embedding(ids, e), attention_mask=mask).last_hidden_state
        out = (e if head is None else head.index_add(0, idx, d_out)).T
        if isinstance(teacher, HiddenTeacher):  # input rows from the hidden states, output rows from the next token
            h_lm = h if teacher.lm_inputs else h.detach()  # detached: the next-token loss reaches the output rows only
            loss = teacher.loss(h, batch, mask) + _next_token_loss(h_lm @ out, ids, mask)
        elif teacher is not None:
            loss = teacher.loss(h @ out, ids, batch)
        else:
            loss = _next_token_loss(h @ out, ids, mask)
        opt.zero_grad()
        loss.backward()
        last_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0:
            log.info("init %s: step %d/%d, loss %.3f, %.0fs", name, step + 1, s.steps, np.mean(losses[-10:]),
                     time.time() - t0)
    with torch.no_grad():
        emb.index_add_(0, idx, d_in)
        if head is not None:
            head.index_add_(0, idx, d_out)
    return {"steps": s.steps, "schedule": s.schedule, "last_lr": last_lr,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(time.time() - t0, 1)}


def extend_rows(model: Any, tok: Any, src_tok: Any, source_docs: Sequence[Sequence[int]],
                target_docs: Sequence[Sequence[int]], start: int, s: ExtendSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(embed rows, head rows, info)`` for the whole target vocabulary (float32 numpy)."""
    import torch

    pieces = new_token_pieces(tok, src_tok)
    v_s = len(src_tok)
    for p in model.parameters():
        p.requires_grad_(False)
    src_emb = model.get_input_embeddings().weight.detach().float()[:v_s]
    src_head = model.get_output_embeddings().weight.detach().float()[:v_s]
    if s.output == "first":
        out_new, info = (torch.stack([src_head[p[0]] for p in pieces]) if pieces else src_head[:0]), {"fit_positions": 0}
    else:
        out_new, info = output_rows(model, source_docs, pieces, src_head, s)
    emb = torch.cat([src_emb, torch.stack([src_emb[p[-1]] for p in pieces])]) if pieces else src_emb.clone()
    head = torch.cat([src_head, out_new]) if pieces else src_head.clone()
    wins = windows(target_docs, np.arange(len(tok)) >= v_s, start, s.window, s.seed)
    if pieces and wins and s.steps > 0:
        torch.manual_seed(s.seed)
        teacher = None
        if s.objective == "distill":
            teacher = ChunkTeacher(model, tok, src_tok, start)
        elif s.objective in ("awedist", "awedist_lm"):
            teacher = HiddenTeacher(model, pieces, v_s, lm_inputs=s.objective == "awedist_lm")
        info.update(train_new_rows(model, emb, head, range(v_s, len(tok)), wins, s, teacher), objective=s.objective)
    info["windows"] = len(wins)
    e, h = emb.numpy().astype(np.float32), head.numpy().astype(np.float32)
    assert np.array_equal(e[:v_s], src_emb.numpy()) and np.array_equal(h[:v_s], src_head.numpy())
    return e, h, info
