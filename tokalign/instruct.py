"""Instruction data for the domain adapters: read, validate, sort into domains, cap, split by stable hash.

A **source** (``adapters.sources.<name>``) is a file of records:

* ``kind=records``: ``.jsonl``/``.json``/``.csv``/``.parquet`` rows with Alpaca-style fields (``instruction_field``,
  ``input_field``, ``output_field``; optional ``tags_field``, ``decision_field``, ``id_field``);
* ``kind=pubmedqa``: PubMedQA's ``ori_pqal.json``, one record per question: the question is the instruction, the
  abstract (joined ``CONTEXTS``) the input, ``"<Decision>. <LONG_ANSWER>"`` the output, ``final_decision`` the
  decision and ``MESHES`` the tags.

Every record is checked and the failures are counted per source, each with its first few places (``report.json``
of stage ``instruct``): ``schema_errors`` (a field missing or not text), ``empty_fields``, ``duplicates`` (the same
instruction, input and output, or the same id), ``too_short``/``too_long`` (words outside ``adapters.min_words``-
``max_words``) and ``eval_texts`` (an input, output or instruction that is an evaluation text of the run: the
evaluation documents stay held out). A record with a decision writes its output as ``"<Decision>. <output>"``
unless the output already starts with the decision.

A **domain** (``adapters.domains.<name>``) takes the records of its sources (all when empty) whose tags contain any
of its ``match`` strings (case-insensitive; every record when empty: a general domain). A record may belong to
several domains. Caps keep the records with the lowest hash first (``max_records_per_source``, then
``max_records_per_domain``). The split hashes ``split_seed`` and the record's key (source name and id), so a
record's split never changes when records are added, removed or capped elsewhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from tokalign.artifacts import BadRecords, iter_rows, read_utf8, text_hash
from tokalign.config import AdaptersConfig, DomainConfig, InstructSourceConfig
from tokalign.errors import TokalignError

SPLITS = ("train", "validation", "test")
EXAMPLES = 3  # places kept per kind of fault


class InstructError(TokalignError, ValueError):
    """Instruction data that cannot be used; the message names the file, key or domain."""


@dataclass
class Record:
    """One instruction example."""

    key: str  # "<source>:<id>": what the split hashes
    source: str
    instruction: str
    input: str
    output: str
    tags: list[str] = field(default_factory=list)
    decision: Optional[str] = None

    def words(self) -> int:
        return len(self.instruction.split()) + len(self.input.split()) + len(self.output.split())


@dataclass
class Validation:
    """What reading one source found: counts, and the first places of each kind of fault."""

    read: int = 0
    kept: int = 0
    capped: int = 0
    faults: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("schema_errors", "empty_fields", "duplicates", "too_short", "too_long", "eval_texts"), 0))
    examples: dict[str, list[str]] = field(default_factory=dict)

    def fault(self, kind: str, where: str) -> None:
        self.faults[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES:
            ex.append(where)


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by the seed and the record's key alone."""
    h = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def split_of(key: str, shares: list[float], seed: int) -> str:
    u, edge = unit_hash(seed, key), 0.0
    for name, share in zip(SPLITS, shares):
        edge += share
        if u < edge:
            return name
    return SPLITS[-1]


def _text(row: dict, name: Optional[str]) -> Optional[str]:
    v = row.get(name) if name else None
    return v if isinstance(v, str) else None


def _tags(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    return [str(t) for t in v] if isinstance(v, (list, tuple)) else []


def _with_decision(output: str, decision: Optional[str]) -> str:
    if decision is None or output.lower().startswith(decision.lower()):
        return output
    return f"{decision.capitalize()}. {output}"


def _pubmedqa_rows(path: Path, counts: BadRecords) -> Iterator[tuple[str, dict]]:
    import json

    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise InstructError(f"{path}: not valid JSON (line {e.lineno}); expected PubMedQA's ori_pqal.json") from e
    if not isinstance(data, dict):
        raise InstructError(f"{path}: expected PubMedQA's id -> record object (kind=pubmedqa)")
    for pid, rec in data.items():
        if not isinstance(rec, dict):
            counts.bad(path, f"{path}:{pid}: not a JSON object")
            continue
        ctx = rec.get("CONTEXTS")
        yield f"{path}:{pid}", {"id": str(pid), "instruction": rec.get("QUESTION"),
                                "input": " ".join(ctx) if isinstance(ctx, list) and all(isinstance(c, str) for c in ctx) else None,
                                "output": rec.get("LONG_ANSWER"), "decision": rec.get("final_decision"),
                                "tags": rec.get("MESHES", [])}


PUBMEDQA_FIELDS = InstructSourceConfig(path="", instruction_field="instruction", input_field="input",
                                       output_field="output", tags_field="tags", decision_field="decision",
                                       id_field="id")


def _record(name: str, src: InstructSourceConfig, where: str, row: dict, v: Validation) -> Optional[Record]:
    """The record of one row, or None after counting why it cannot be used."""
    instr, out = _text(row, src.instruction_field), _text(row, src.output_field)
    inp = _text(row, src.input_field) if row.get(src.input_field) is not None else ""
    dec = _text(row, src.decision_field) if src.decision_field else None
    missing = [f for f, val in ((src.instruction_field, instr), (src.output_field, out), (src.input_field, inp),
                                (src.decision_field, dec if src.decision_field else "")) if val is None]
    if missing:
        v.fault("schema_errors", f"{where}: no text field {', '.join(repr(m) for m in missing)}")
        return None
    if not instr.strip() or not out.strip() or (dec is not None and not dec.strip()):
        v.fault("empty_fields", f"{where}: empty {src.instruction_field if not instr.strip() else src.output_field if not out.strip() else src.decision_field}")
        return None
    rid = str(row[src.id_field]) if src.id_field and row.get(src.id_field) is not None else \
        text_hash("\x00".join((instr, inp, out)))
    dec = dec.strip().lower() if dec is not None else None
    return Record(key=f"{name}:{rid}", source=name, instruction=instr.strip(), input=inp.strip(),
                  output=_with_decision(out.strip(), dec), tags=_tags(row.get(src.tags_field)) if src.tags_field else [],
                  decision=dec)


def read_source(name: str, src: InstructSourceConfig, acfg: AdaptersConfig, held: set[str]) -> tuple[list[Record], Validation]:
    """The usable records of one source, and what was wrong with the others."""
    v, counts, seen = Validation(), BadRecords(), set()
    path = Path(src.path).expanduser()
    if not path.is_file():
        raise InstructError(f"adapters.sources.{name}.path={src.path}: no such file")
    rows = _pubmedqa_rows(path, counts) if src.kind == "pubmedqa" else iter_rows(path, counts)
    fields = PUBMEDQA_FIELDS if src.kind == "pubmedqa" else src
    out: list[Record] = []
    for where, row in rows:
        v.read += 1
        rec = _record(name, fields, where, row, v)
        if rec is None:
            continue
        content = text_hash("\x00".join((rec.instruction, rec.input, rec.output)))
        if content in seen or rec.key in seen:
            v.fault("duplicates", f"{where}: same {'id' if rec.key in seen else 'instruction, input and output'} as an earlier record")
            continue
        seen.update((content, rec.key))
        if any(text_hash(t) in held for t in (rec.input, rec.output, rec.instruction) if t):
            v.fault("eval_texts", f"{where}: an evaluation text of this run (held out)")
        elif rec.words() < acfg.min_words:
            v.fault("too_short", f"{where}: {rec.words()} words (adapters.min_words={acfg.min_words})")
        elif rec.words() > acfg.max_words:
            v.fault("too_long", f"{where}: {rec.words()} words (adapters.max_words={acfg.max_words})")
        else:
            out.append(rec)
    v.read += counts.bad_records
    for ex in counts.bad_examples:
        v.fault("schema_errors", ex)
    v.faults["schema_errors"] += counts.bad_records - len(counts.bad_examples)
    if v.read and v.faults["schema_errors"] == v.read:
        raise InstructError(f"{path}: no record has the fields adapters.sources.{name} names "
                            f"(instruction_field={fields.instruction_field!r}, output_field={fields.output_field!r}"
                            f"{f', decision_field={fields.decision_field!r}' if fields.decision_field else ''}); "
                            f"e.g. {v.examples['schema_errors'][0]}")
    return cap(out, acfg.max_records_per_source, acfg.split_seed, v), v


def cap(records: list[Record], limit: int, seed: int, v: Optional[Validation] = None) -> list[Record]:
    """At most ``limit`` records (0 = all): the lowest hashes, so the kept ones do not depend on file order. The cap
    hashes a key other than the split's (``cap:<key>``), so the kept records fill every split in its share."""
    if not limit or len(records) <= limit:
        if v is not None:
            v.kept = len(records)
        return records
    kept = sorted(records, key=lambda r: unit_hash(seed, f"cap:{r.key}"))[:limit]
    if v is not None:
        v.kept, v.capped = len(kept), len(records) - len(kept)
    return kept


def in_domain(rec: Record, d: DomainConfig) -> bool:
    if d.sources and rec.source not in d.sources:
        return False
    if not d.match:
        return True
    tags = [t.lower() for t in rec.tags]
    return any(m.lower() in t for m in d.match for t in tags)


def build(acfg: AdaptersConfig, held: set[str]) -> tuple[dict[str, dict[str, list[Record]]], dict]:
    """({domain: {split: records}}, report). An empty domain is an error naming it."""
    by_source, report = {}, {"sources": {}, "domains": {}}
    for name, src in acfg.sources.items():
        by_source[name], v = read_source(name, src, acfg, held)
        report["sources"][name] = {"path": src.path, **asdict(v)}
    out: dict[str, dict[str, list[Record]]] = {}
    for dname, d in acfg.domains.items():
        matched = [r for recs in by_source.values() for r in recs if in_domain(r, d)]
        if not matched:
            raise InstructError(f"adapters.domains.{dname}: no records after filtering (sources "
                                f"{d.sources or sorted(acfg.sources)}, match {list(d.match) or 'any'})")
        kept = cap(matched, acfg.max_records_per_domain, acfg.split_seed)
        splits = {s: [] for s in SPLITS}
        for r in sorted(kept, key=lambda r: r.key):
            splits[split_of(r.key, list(acfg.split), acfg.split_seed)].append(r)
        if not splits["train"] or not splits["test"]:
            raise InstructError(f"adapters.domains.{dname}: {len(kept)} records leave an empty "
                                f"{'train' if not splits['train'] else 'test'} split (adapters.split={list(acfg.split)}); "
                                "widen its match or raise the caps")
        out[dname] = splits
        decisions: dict[str, int] = {}
        for r in kept:
            if r.decision is not None:
                decisions[r.decision] = decisions.get(r.decision, 0) + 1
        report["domains"][dname] = {"matched": len(matched), "capped": len(matched) - len(kept),
                                    **{s: len(v) for s, v in splits.items()}, "decisions": decisions}
    return out, report
