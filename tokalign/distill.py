"""Cross-tokenizer distillation (``train.objective=distill``): the source model under its own tokenizer is the teacher,
the adapted model the student, and the student's likelihood of each *chunk* of text is matched to the teacher's.

Approximate likelihood matching (ALM; tokenkit, Minixhofer et al. 2025): two tokenizations of the same bytes share
some token boundaries; the spans between consecutive shared boundaries are chunks, and a chunk's likelihood is the
product of its tokens' probabilities under either model, so the two are directly comparable. The loss per chunk is
the absolute gap between the teacher's and the student's chunk log-likelihoods (0 exactly when they agree; ALM's
binary KL between chunk probabilities gives almost no gradient for improbable chunks, ``chunk_distance``), averaged
over the chunks of a batch.

A training block is a window of target token ids; its bytes come from the target vocabulary (``token_bytes``), so
the student's boundaries are exact. The teacher reads the same bytes: each stretch between special tokens is
decoded (an incomplete UTF-8 character at a block's edge is left out), tokenized with the source tokenizer and
scored after the source's document separator. Chunks that touch the block's first token (no context for the
student) or bytes the teacher did not read are not scored.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch


def token_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for (special tokens: ``b""``, they split the text), through the alignment's
    canonical token forms (``alignment.normalize_token`` in the tokenizer's ``detect_style``: GPT-2's byte alphabet,
    SentencePiece's ``▁`` and ``<0xNN>`` pieces)."""
    from tokalign import alignment as A

    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    style = A.detect_style(tokenizer)
    return [b"" if i in special or p is None else A.canon_bytes(A.normalize_token(p, style))
            for i, p in enumerate(pieces)]


def _valid_utf8(raw: bytes) -> tuple[int, int]:
    """(first, last) byte positions of the longest stretch of ``raw`` that starts and ends on whole characters."""
    start = 0
    while start < len(raw) and 0x80 <= raw[start] < 0xC0:  # continuation bytes of a character cut off in front
        start += 1
    end = len(raw)
    for back in range(1, min(4, end - start) + 1):  # an incomplete character at the end
        b = raw[end - back]
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                end -= back
            break
        if b < 0x80:
            break
    return start, end


@dataclass
class Chunks:
    """The chunks of one block: for each, the student token positions and the teacher token positions in it."""

    student: list[list[int]]  # token indices into the block
    teacher: list[list[int]]  # token indices into ``teacher_ids`` (all segments, concatenated)
    teacher_ids: list[list[int]]  # the teacher's token ids, one list per segment (each scored after its separator)


def teacher_segments(ids: Sequence[int], tb: list[bytes]) -> list[tuple[int, bytes]]:
    """Stretches of a block between special tokens: (byte offset in the block, bytes)."""
    segs, pos, start, buf = [], 0, 0, b""
    for i in ids:
        b = tb[i]
        if not b:
            if buf:
                segs.append((start, buf))
            buf, start = b"", pos
            continue
        if not buf:
            start = pos
        buf += b
        pos += len(b)
    if buf:
        segs.append((start, buf))
    return segs


def align_chunks(ids: Sequence[int], tb: list[bytes], teacher_tok: Any) -> Chunks:
    """Chunk the block ``ids`` (student ids; ``tb = token_bytes(student tokenizer)``) against the teacher's
    tokenization of the same bytes."""
    ends_s, pos = [], 0
    for i in ids:
        pos += len(tb[i])
        ends_s.append(pos)
    t_ids: list[list[int]] = []
    t_spans: list[tuple[int, int]] = []  # byte span in the block of every teacher token (all segments)
    for off, raw in teacher_segments(ids, tb):
        a, b = _valid_utf8(raw)
        text = raw[a:b].decode("utf-8")
        if not text:
            continue
        enc = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        cum = [0]
        for ch in text:
            cum.append(cum[-1] + len(ch.encode("utf-8")))
        t_ids.append(list(enc["input_ids"]))
        t_spans += [(off + a + cum[s], off + a + cum[e]) for s, e in enc["offset_mapping"]]
    shared = sorted(set(ends_s) & {e for _, e in t_spans})
    # a chunk: tokens of both sides between two consecutive shared boundaries, the lower one a teacher start too
    chunks_s: dict[int, list[int]] = {}
    chunks_t: dict[int, list[int]] = {}
    for i, e in enumerate(ends_s):
        k = bisect_left(shared, e)
        if k < len(shared) and len(tb[ids[i]]) > 0:
            chunks_s.setdefault(k, []).append(i)
    for j, (_, e) in enumerate(t_spans):
        k = bisect_left(shared, e)
        if k < len(shared):
            chunks_t.setdefault(k, []).append(j)
    keep = []
    for k in sorted(set(chunks_s) & set(chunks_t)):
        s_tok, t_tok = chunks_s[k], chunks_t[k]
        s_lo = ends_s[s_tok[0]] - len(tb[ids[s_tok[0]]])
        if s_tok[0] == 0 or s_lo != t_spans[t_tok[0]][0]:
            continue  # no student context, or the teacher did not read the chunk's first bytes
        keep.append(k)
    return Chunks([chunks_s[k] for k in keep], [chunks_t[k] for k in keep], t_ids)


def chunk_distance(teacher_ll: torch.Tensor, student_ll: torch.Tensor) -> torch.Tensor:
    """|log p_teacher(chunk) - log p_student(chunk)| in nats: 0 exactly when the two agree. ALM's binary KL between
    the chunk probabilities vanishes for improbable chunks (a new model gives most chunks p << 1), so its gradient
    does too; the gap of log-likelihoods keeps a signal of the same size for every chunk."""
    return (teacher_ll - student_ll).abs()


@torch.no_grad()
def teacher_logprobs(teacher: Any, segments: list[list[int]], start_id: Optional[int], device: Any) -> list[torch.Tensor]:
    """Log-probability of every teacher token of each segment (after ``start_id``), one tensor per segment."""
    out = []
    for seg in segments:
        ctx = ([start_id] if start_id is not None else []) + seg
        x = torch.tensor([ctx], device=device)
        lp = torch.log_softmax(teacher(input_ids=x).logits[0, :-1].float(), dim=-1)
        tgt = x[0, 1:]
        got = lp.gather(1, tgt[:, None])[:, 0]
        out.append(got if start_id is not None else torch.cat([got.new_full((1,), float("nan")), got]))
    return out


def chunk_loss(student_logits: torch.Tensor, input_ids: torch.Tensor, chunks: list[Chunks],
               teacher_lp: list[list[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    """Mean ``chunk_distance`` over all chunks of a batch, and the chunk count."""
    lp = torch.log_softmax(student_logits[:, :-1].float(), dim=-1)
    tok_lp = lp.gather(2, input_ids[:, 1:, None])[..., 0]  # log p(token i+1 | ...i), position i+1 -> index i
    losses = []
    for b, ch in enumerate(chunks):
        t_flat = torch.cat(teacher_lp[b]) if teacher_lp[b] else tok_lp.new_zeros(0)
        for s_tok, t_tok in zip(ch.student, ch.teacher):
            ls = tok_lp[b, [i - 1 for i in s_tok]].sum()
            lt = t_flat[t_tok].sum()
            if torch.isfinite(lt):
                losses.append(chunk_distance(lt.detach(), ls))
    if not losses:
        return student_logits.sum() * 0.0, 0
    return torch.stack(losses).mean(), len(losses)


class TeacherScores:
    """The teacher's log-probabilities of every block it scored, on disk (``train.teacher_cache``): one safetensors
    file per block, named by the hash of the block's token ids, under a folder that ``teacher_scores_root`` keys by
    the teacher, the target tokenizer and the precision. Later epochs, stage 2 and the other jobs of a sweep read
    them instead of running the teacher; ``scripts/teacher_scores.py`` fills the folder ahead, e.g. on a CPU
    machine. A file that is unreadable or does not fit the block's segments is computed again (and rewritten)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = self.misses = 0

    def path(self, ids: Sequence[int]) -> Path:
        h = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:32]
        return self.root / h[:2] / f"{h}.safetensors"

    def get(self, ids: Sequence[int], lengths: Sequence[int]) -> Optional[list[torch.Tensor]]:
        """The stored log-probabilities of the block's segments, if a file holds exactly ``lengths`` of them."""
        from safetensors.torch import load_file

        f = self.path(ids)
        try:
            t = load_file(str(f))
            got = [int(n) for n in t["lengths"].tolist()]
        except Exception:  # absent, partial or not ours
            return None
        if got != [int(n) for n in lengths] or t["lp"].numel() != sum(got):
            return None
        return list(torch.split(t["lp"], got)) if got else []

    def put(self, ids: Sequence[int], lps: Sequence[torch.Tensor]) -> None:
        """Store the block's log-probabilities (written beside, then renamed: readers never see a partial file)."""
        from safetensors.torch import save_file

        f = self.path(ids)
        f.parent.mkdir(parents=True, exist_ok=True)
        flat = torch.cat([x.detach().float().cpu() for x in lps]) if lps else torch.zeros(0)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        save_file({"lp": flat.contiguous(), "lengths": torch.tensor([len(x) for x in lps], dtype=torch.int64)}, str(tmp))
        os.replace(tmp, f)

    def scores(self, teacher: Any, ids: Sequence[int], segments: list[list[int]], start_id: Optional[int],
               device: Any) -> list[torch.Tensor]:
        """``teacher_logprobs`` of the block's segments, read from disk when stored, else computed and stored."""
        got = self.get(ids, [len(s) for s in segments])
        if got is not None:
            self.hits += 1
            return [x.to(device) for x in got]
        self.misses += 1
        lps = teacher_logprobs(teacher, segments, start_id, device)
        self.put(ids, lps)
        return lps


def teacher_scores_root(cache_dir: Any, source_dir: Path, tokenize_dir: Path, dtype: str) -> Path:
    """Where ``TeacherScores`` keeps the blocks of this teacher (the ``source`` stage's output), this target
    tokenization (the ``tokenize`` stage's) and this precision: ``<cache_dir>/teacher_scores/<hash>``."""
    from tokalign.cache import stable_hash

    key = stable_hash({"source": Path(source_dir).resolve().name, "tokenize": Path(tokenize_dir).resolve().name,
                       "dtype": dtype, "v": 1})
    return Path(cache_dir).expanduser() / "teacher_scores" / key


@dataclass
class Distiller:
    """The training loss of ``train.objective=distill`` (``weight`` 1) or ``mix`` (``(1 - w) * lm + w * distill``):
    called by the Trainer with the student's outputs on a batch of packed target-token blocks."""

    teacher: Any  # the source model, frozen, in eval mode
    teacher_tok: Any  # the source tokenizer
    tb: list[bytes]  # token_bytes(student tokenizer)
    start_id: Optional[int]  # the source's document separator, the teacher's context before every segment
    weight: float = 1.0
    store: Optional[TeacherScores] = None  # train.teacher_cache: the teacher's scores kept on disk
    last: Optional[dict] = None  # the last batch's {"lm_loss", "distill_loss", "chunks"} (+ teacher cache hits)

    def loss(self, outputs: Any, input_ids: torch.Tensor) -> torch.Tensor:
        rows = [row.tolist() for row in input_ids]
        chunks = [align_chunks(ids, self.tb, self.teacher_tok) for ids in rows]
        if self.store is None:
            t_lp = [teacher_logprobs(self.teacher, c.teacher_ids, self.start_id, input_ids.device) for c in chunks]
        else:
            t_lp = [self.store.scores(self.teacher, ids, c.teacher_ids, self.start_id, input_ids.device)
                    for ids, c in zip(rows, chunks)]
        d, n = chunk_loss(outputs.logits, input_ids, chunks, t_lp)
        lm = outputs.loss
        self.last = {"lm_loss": float(lm.detach()) if lm is not None else None, "distill_loss": float(d.detach()),
                     "chunks": n}
        if self.store is not None:
            self.last.update(teacher_cache_hits=self.store.hits, teacher_cache_misses=self.store.misses)
        if self.weight >= 1.0 or lm is None:
            return d
        return (1.0 - self.weight) * lm + self.weight * d
