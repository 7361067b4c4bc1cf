"""The model side of the domain adapters: prompts, response-only labels, LoRA/QLoRA training, scores.

* ``encode``: a record as the model's chat template writes it (a user turn holding the instruction and the input,
  the output as the assistant's turn; without a template ``### Instruction / ### Input / ### Response``), with
  labels ``-100`` on every prompt token, so the loss covers the response tokens only. A record longer than
  ``adapters.max_seq_len`` loses the end of its input, never its response.
* ``load_base``: the run's final model (a stage-2 LoRA merged in), in float for LoRA, or 4-bit NF4 through
  bitsandbytes for QLoRA (CUDA only); ``with_lora`` wraps it with peft's ``get_peft_model``.
* ``train``: transformers' ``Trainer`` with a padding collator that keeps the ``-100`` labels.
* ``score``: per record, the summed negative log-likelihood of its response tokens and their count (so a test
  loss is a ratio of sums, compared between models with a paired bootstrap over records), and the decision the
  model ranks first at the response's first token (``decision_tokens``: each label's first response token).
* ``generation_scores``: greedy generations against the references: ROUGE-L (rouge-score) and BLEU (sacrebleu).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from tokalign.errors import TokalignError

log = logging.getLogger(__name__)


class AdapterError(TokalignError, RuntimeError):
    """A domain adapter cannot be trained or scored; the message names the domain or key."""


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _user(rec: dict, inp: str) -> str:
    return rec["instruction"] + (f"\n\n{inp}" if inp else "")


def prompt_text(tok: Any, rec: dict, inp: str) -> str:
    """The prompt up to where the response starts (the template's generation prompt)."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template([{"role": "user", "content": _user(rec, inp)}], tokenize=False,
                                       add_generation_prompt=True)
    return f"### Instruction:\n{rec['instruction']}\n\n" + (f"### Input:\n{inp}\n\n" if inp else "") + "### Response:\n"


def response_text(tok: Any, rec: dict, inp: str, prompt: str) -> str:
    """The assistant's turn as the template closes it (``...<|im_end|>\\n``), else the output and the eos token."""
    if getattr(tok, "chat_template", None):
        full = tok.apply_chat_template([{"role": "user", "content": _user(rec, inp)},
                                        {"role": "assistant", "content": rec["output"]}], tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
    return rec["output"] + (tok.eos_token or "")


def encode(tok: Any, rec: dict, max_len: int) -> dict:
    """``{"input_ids", "labels", "prompt_len", "truncated"}`` of one record (labels -100 on the prompt)."""
    inp, truncated = rec.get("input", ""), False
    for _ in range(6):
        prompt = prompt_text(tok, rec, inp)
        resp = _ids(tok, response_text(tok, rec, inp, prompt))
        p_ids = _ids(tok, prompt)
        over = len(p_ids) + len(resp) - max_len
        inp_ids = _ids(tok, inp) if over > 0 and inp else []
        if over <= 0 or not inp_ids:
            break
        inp, truncated = tok.decode(inp_ids[: max(0, len(inp_ids) - over - 4)]), True
    if len(p_ids) + len(resp) > max_len:  # no input left to cut: keep the response's start and the prompt's end
        resp = resp[: max_len // 2] if len(resp) > max_len // 2 and len(p_ids) > max_len // 2 else resp[:max_len - 1]
        p_ids, truncated = p_ids[-(max_len - len(resp)):], True
    return {"input_ids": p_ids + resp, "labels": [-100] * len(p_ids) + resp, "prompt_len": len(p_ids),
            "truncated": truncated}


def decision_tokens(tok: Any, encoded: Sequence[dict], records: Sequence[dict]) -> dict[str, int]:
    """Each decision label's first response token (the most common one over ``records``); {} when records carry no
    decision or two labels start with the same token (then no decision is scored)."""
    firsts: dict[str, Counter] = {}
    for e, r in zip(encoded, records):
        if r.get("decision") is not None and len(e["input_ids"]) > e["prompt_len"]:
            firsts.setdefault(r["decision"], Counter())[e["input_ids"][e["prompt_len"]]] += 1
    out = {d: c.most_common(1)[0][0] for d, c in firsts.items()}
    if len(set(out.values())) < len(out):
        log.warning("adapters: decisions %s share a first token; decision accuracy is not scored", sorted(out))
        return {}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# models

def load_base(model: Any, method: str, base_dir: Optional[Path], dtype: str) -> Any:
    """LoRA: ``model`` as it is. QLoRA: the same weights reloaded from ``base_dir`` in 4-bit NF4 on the GPU."""
    if method == "lora":
        return model
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    m = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=q, dtype=compute, device_map={"": 0})
    return prepare_model_for_kbit_training(m)


def with_lora(model: Any, acfg: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in acfg.target_modules if t in names]
    if not targets:
        raise AdapterError(f"adapters.target_modules={list(acfg.target_modules)}: none is a module of the model "
                           f"(it has e.g. {sorted(names)[:8]})")
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=acfg.lora_r, lora_alpha=acfg.lora_alpha,
                                            lora_dropout=acfg.lora_dropout, target_modules=targets))


def train(model: Any, tok: Any, data: list[dict], acfg: Any, out: Path, *, seed: int, cuda: bool, bf16: bool,
          on_log: Callable[[dict], None]) -> dict:
    """Train the adapter weights of ``model`` (a PeftModel) on encoded records; returns the trainer's numbers."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class _Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                on_log({"loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)), "step": state.global_step})

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=acfg.micro_batch_size,
        gradient_accumulation_steps=acfg.grad_accum, learning_rate=acfg.lr, lr_scheduler_type="linear",
        warmup_steps=0, num_train_epochs=acfg.epochs, max_steps=acfg.max_steps or -1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not cuda, bf16=bf16, seed=seed, data_seed=seed,
        disable_tqdm=True, remove_unused_columns=False)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "attention_mask": [1] * len(e["input_ids"])} for e in data]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[_Log()])
    trainer.remove_callback(PrinterCallback)  # the loss goes to the log and W&B, not printed dicts
    res = trainer.train()
    if not math.isfinite(res.training_loss):
        raise AdapterError(f"training loss became {res.training_loss} (lower adapters.lr)")
    return {"train_loss": float(res.training_loss), "steps": int(res.global_step),
            "train_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in data),
            "seconds": float(res.metrics.get("train_runtime", 0.0))}


# ----------------------------------------------------------------------------------------------------------------------
# scores

@torch.no_grad()
def score(model: Any, encoded: Sequence[dict], first_ids: dict[str, int], batch_size: int = 2) -> list[dict]:
    """Per record: ``nll`` (nats summed over its response tokens), ``n`` (their count), ``pred`` (the decision whose
    first token the model ranks highest at the response's start, or None)."""
    model.eval()
    dev = next(model.parameters()).device
    labels_order, cand = list(first_ids), torch.tensor(list(first_ids.values()), dtype=torch.long)
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i: i + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[j, : len(e["input_ids"])] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for j, e in enumerate(chunk):
            lab = torch.tensor(e["labels"][1:], device=dev)
            pos = torch.nonzero(lab != -100).squeeze(-1)
            lp = torch.log_softmax(logits[j, pos].float(), dim=-1)
            nll = -lp.gather(1, lab[pos].unsqueeze(1)).sum().item()
            pred = None
            if first_ids and e["prompt_len"] > 0:
                row = logits[j, e["prompt_len"] - 1].float().cpu()
                pred = labels_order[int(torch.argmax(row[cand]))]
            out.append({"nll": nll, "n": int(pos.numel()), "pred": pred})
    return out


def loss(scores: Sequence[dict]) -> float:
    """Mean negative log-likelihood per response token (nats)."""
    n = sum(s["n"] for s in scores)
    return sum(s["nll"] for s in scores) / n if n else float("nan")


def stop_token_ids(tok: Any, encoded: Sequence[dict]) -> list[int]:
    """The eos token and every special token that closes a response (the template's end of turn)."""
    special = set(tok.all_special_ids) | {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for e in encoded[:8]:
        ids.update(t for t in e["input_ids"][e["prompt_len"]:] if t in special)
    return sorted(ids)


@torch.no_grad()
def generate(model: Any, tok: Any, encoded: Sequence[dict], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each record's prompt, decoded without special tokens."""
    model.eval()
    dev = next(model.parameters()).device
    stops = stop_token_ids(tok, encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    outs = []
    for e in encoded:
        ids = torch.tensor([e["input_ids"][: e["prompt_len"]]], device=dev)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops or None, pad_token_id=pad)
        outs.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def generation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict:
    """ROUGE-L F1 (mean over records, rouge-score with stemming) and corpus BLEU (sacrebleu) of generations."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not hyps:
        return {}
    rs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [rs.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {"rougeL": float(sum(rouge) / len(rouge)), "bleu": float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score),
            "n": len(hyps)}


def decision_scores(labels: Sequence[str], preds: Sequence[Optional[str]]) -> dict:
    """Decision accuracy (Wilson interval) and macro-F1 over the records that have a label."""
    from tokalign import stats

    pairs = [(y, p) for y, p in zip(labels, preds) if y is not None and p is not None]
    if not pairs:
        return {}
    ys, ps = [y for y, _ in pairs], [p for _, p in pairs]
    k = sum(y == p for y, p in pairs)
    return {"accuracy": k / len(pairs), "accuracy_ci95": stats.proportion_interval(k, len(pairs)),
            "macro_f1": stats.macro_f1(ys, ps), "n": len(pairs), "correct": k}


def _is_numeric(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_matrix(matrix: dict[str, dict[str, float]], domains: Sequence[str], path: Path) -> None:
    """Test loss of each model (rows: no adapter, then each domain's adapter) on each domain's test split, coloured
    by its change against the adapter-free model (blue: lower loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(matrix)
    vals = np.array([[matrix[r].get(d, np.nan) for d in domains] for r in rows])
    delta = vals - vals[0:1]
    lim = max(float(np.nanmax(np.abs(delta))), 1e-6)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(domains), 1.0 + 0.55 * len(rows)))
    ax.imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(domains)):
            if _is_numeric(vals[i, j]):
                ax.text(j, i, f"{vals[i, j]:.3f}\n({delta[i, j]:+.3f})" if i else f"{vals[i, j]:.3f}",
                        ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(domains)), [f"{d} test" for d in domains], rotation=20)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title("response-token test loss (nats)\nadapter x domain test split, change vs no adapter", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
