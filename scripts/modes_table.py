"""Print the README's table of modes from the composed configs (so the table never drifts from conf/).

    python scripts/modes_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokalign.cli import CONF_DIR, compose_cli  # noqa: E402

ROWS = [
    ("hardware", lambda c: c.hardware.name), ("corpus_bytes", lambda c: c.corpus_bytes or "all"),
    ("pivot_count", lambda c: c.pivot_count), ("similarity_threshold", lambda c: c.similarity_threshold),
    ("init_methods", lambda c: ",".join(c.init_methods) if len(c.init_methods) < 5 else "all 5"),
    ("embed dim/epoch/minCount/lr/threads", lambda c: f"{c.embed.dim}/{c.embed.epoch}/{c.embed.min_count}/{c.embed.lr}/{c.embed.thread}"),
    ("fastText tokens per stream", lambda c: f"{c.embed.max_tokens:,}" if c.embed.max_tokens else "all"),
    ("terms top_k/min_freq/scoring", lambda c: f"{c.terms.top_k}/{c.terms.min_freq}/{c.terms.scoring}"),
    ("tokenizer workers", lambda c: c.hardware.tokenizer_workers),
    ("lr_stage1 / lr_stage2", lambda c: f"{c.lr_stage1:g} / {c.lr_stage2:g}"),
    ("steps_stage1 / steps_stage2", lambda c: f"{c.steps_stage1} / {c.steps_stage2}"),
    ("stage 2", lambda c: "LoRA" if c.stage2_use_lora else "full"),
    ("seq_len x micro-batch x accum", lambda c: f"{c.train.seq_len} x {c.train.micro_batch_size} x {c.train.grad_accum}"),
    ("dtype", lambda c: c.hardware.dtype),
    ("torch.compile", lambda c: "on" if c.train.compile else "off"),
    ("eval docs (bytes each) / PubMedQA questions", lambda c: f"{c.eval.max_eval_samples} "
     f"({c.eval.max_doc_bytes or 'whole'}) / {c.eval.pubmedqa_samples}"),
]


def main() -> None:
    modes = ["smoke", "ultra_quick_demo", "research", "research_optimal", "three_hour_eval"]
    assert set(modes) == {p.stem for p in (Path(CONF_DIR) / "mode").glob("*.yaml")}
    cfgs = {m: compose_cli([f"mode={m}"]) for m in modes}
    print("| key | " + " | ".join(f"`{m}`" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for label, get in ROWS:
        print(f"| {label} | " + " | ".join(str(get(cfgs[m])) for m in modes) + " |")


if __name__ == "__main__":
    main()
