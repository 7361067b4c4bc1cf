"""Lost-token absorption (``tokalign/absorb.py``): which source tokens are lost and whose rows take them, the
log-sum-exp targets, and the ridge fit (the init stage's use of it: ``tests/test_init.py``)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import tiny_llama

from tokalign import refs
from tokalign.absorb import absorb_rows, absorbed_targets, lost_tokens
from tokalign.output_rows import hidden_states, ridge_gram


def test_a_source_word_the_target_spells_in_pieces_is_lost_to_its_first_piece(assets):
    """SmolLM2 holds `` aortic`` whole, Qwen2 does not: it is lost, and its first Qwen2 piece takes it; a word both
    hold whole is not lost; no special token is; identical tokenizers lose nothing."""
    src = refs.load_tokenizer(str(assets / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    qwen = refs.load_tokenizer(str(assets / "tokenizers" / "ggml-vocab-qwen2.gguf"))
    lost, first = lost_tokens(qwen, src)
    word = {int(i): int(f) for i, f in zip(lost, first)}
    aortic = src.convert_tokens_to_ids("Ġaortic")
    assert aortic != src.unk_token_id and aortic in word
    assert word[aortic] == qwen(" aortic", add_special_tokens=False).input_ids[0]
    assert src.convert_tokens_to_ids("Ġpatients") not in word
    assert not set(word) & set(src.all_special_ids)
    assert 1000 < len(lost) < len(src)
    assert len(lost_tokens(src, src)[0]) == 0


def test_absorbed_targets_are_the_log_sum_exp_of_each_group():
    g = torch.Generator().manual_seed(0)
    H, W, S = torch.randn(50, 6, generator=g), torch.randn(10, 6, generator=g), torch.randn(4, 6, generator=g)
    groups, member = torch.tensor([2, 7]), torch.tensor([0, 1, 0, 0])  # lost rows 0, 2, 3 -> token 2; 1 -> token 7
    Y = absorbed_targets(H, W, S, groups, member)
    want2 = torch.logsumexp(torch.stack([H @ W[2], H @ S[0], H @ S[2], H @ S[3]], 1), 1)
    want7 = torch.logsumexp(torch.stack([H @ W[7], H @ S[1]], 1), 1)
    assert torch.allclose(Y[:, 0], want2, atol=1e-5) and torch.allclose(Y[:, 1], want7, atol=1e-5)


def test_the_ridge_step_is_least_squares_towards_the_targets_and_vanishes_with_a_strong_ridge():
    g = torch.Generator().manual_seed(1)
    H, W, S = torch.randn(400, 6, generator=g), torch.randn(10, 6, generator=g), torch.randn(3, 6, generator=g)
    groups, member = torch.tensor([4]), torch.tensor([0, 0, 0])
    Y = absorbed_targets(H, W, S, groups, member)
    R = W[groups]

    def step(ridge):
        return torch.linalg.solve(ridge_gram(H, ridge), H.double().T @ (Y - H @ R.T).double()).T.float()

    before = ((H @ R.T - Y) ** 2).mean()
    after = ((H @ (R + step(1.0)).T - Y) ** 2).mean()
    assert after < 0.75 * before
    best = torch.linalg.lstsq(H.double(), Y.double()).solution.T.float()  # the plain least-squares row
    assert torch.allclose(R + step(1e-6), best, atol=1e-3)
    assert step(1e9).abs().max() < 1e-5


def test_absorb_rows_fits_the_ridge_step_on_the_models_hidden_states_in_any_chunking():
    """``absorb_rows`` on a tiny model: the change equals the ridge step computed directly from the model's hidden
    states and the log-sum-exp targets, it lowers the squared gap to those targets, a special first piece is left
    alone, and the chunking of the positions does not change the result."""
    model = tiny_llama(vocab=40)
    rng = np.random.default_rng(0)
    docs = [[1] + rng.integers(3, 40, size=30).tolist() for _ in range(8)]
    src_rows = torch.randn(60, 32, generator=torch.Generator().manual_seed(2))
    lost, first = np.array([45, 50, 51, 57]), np.array([7, 7, 9, 2])  # 57 -> 2, a special token: left alone
    keep = np.zeros(40, bool)
    keep[2] = True
    rows, delta, info = absorb_rows(model, docs, src_rows, lost, first, positions=200, ridge=10.0, keep=keep, chunk=7)
    assert rows.tolist() == [7, 9] and info["lost"] == 3 and info["positions"] == 200
    H, _, _ = hidden_states(model, docs, 200, with_gains=False)
    W = model.get_output_embeddings().weight.detach().float()
    g = torch.tensor([7, 9])
    Y = absorbed_targets(H, W, src_rows[torch.tensor([45, 50, 51])], g, torch.tensor([0, 0, 1]))
    step = torch.linalg.solve(ridge_gram(H, 10.0), H.double().T @ (Y - H @ W[g].T).double()).T.float()
    assert torch.allclose(torch.from_numpy(delta), step, atol=1e-4)
    before = ((H @ W[g].T - Y) ** 2).mean()
    assert ((H @ (W[g] + torch.from_numpy(delta)).T - Y) ** 2).mean() < before
    whole = absorb_rows(model, docs, src_rows, lost, first, positions=200, ridge=10.0, keep=keep, chunk=10_000)[1]
    assert np.allclose(whole, delta, atol=1e-5)
