"""Dimension squeezing on small random-weight BERT and ALBERT models."""

import math

import numpy as np
import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from experiments.training import train_steps
from tnlm import make_optimizer
from tnlm.compress import DimensionSqueezer
from tnlm.integration import MPOConfig, get_mpo_model

IDS = torch.randint(0, 96, (8, 10), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": LABELS}


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    return get_mpo_model(model, MPOConfig(target_modules=["query", "value", "intermediate.dense"],
                                          n_sites=3), progress=False)


def loss_of(model):
    model.eval()
    with torch.no_grad():
        return float(model(**BATCH).loss)


def finetune(model, steps=2):
    opt = make_optimizer(model, lr=1e-3)  # rebuilt after every cut: shapes change
    train_steps(model, iter([BATCH] * steps), opt, steps, progress=False)


def test_greedy_picks_least_added_error():
    model = tiny_bert()
    sq = DimensionSqueezer(model, loss_of, None, delta=math.inf, max_iters=1, log=None)
    # independent computation from each module's exact bond spectra
    best = None
    for name, m in model.mpo_modules():
        s_all = m.to_mpo().bond_spectra()
        norm_sq = float(np.sum(s_all[0] ** 2))
        for b in (m.central_index - 1, m.central_index):
            d = m.bond_dims[b]
            added = float(s_all[b][d - 1] ** 2) / norm_sq
            if best is None or added < best[0]:
                best = (added, name, b)
    res = sq.run()
    step = res.history[0]
    assert (step.module, step.bond) == (best[1], best[2])
    assert step.added_error == pytest.approx(best[0], rel=1e-6)
    assert dict(model.mpo_modules())[best[1]].bond_dims[best[2]] == step.old_dim - 1


def test_schedule_matches_run_without_recovery():
    model = tiny_bert()
    sq = DimensionSqueezer(model, loss_of, None, delta=math.inf, max_iters=6, log=None)
    plan = sq.schedule(6)
    res = sq.run()
    assert [(s.module, s.bond, s.new_dim) for s in res.history] == [p[:3] for p in plan]
    assert res.final_params < res.start_params
    assert res.reason == "iteration limit 6"


def test_the_last_iteration_reaching_the_target_reports_the_target():
    """A target met by the last allowed iteration was reported as "iteration limit N":
    the loop ended by its count before the check at the top of the next iteration."""
    after_one = DimensionSqueezer(tiny_bert(), loss_of, None, delta=math.inf, max_iters=1,
                                  step=2, log=None).run().final_params
    sq = DimensionSqueezer(tiny_bert(), loss_of, None, delta=math.inf, max_iters=1, step=2,
                           target_params=after_one, log=None)
    res = sq.run()
    assert res.final_params == after_one <= sq.target_params
    assert res.reason == f"target of {after_one:,} core parameters reached"


def test_module_error_estimate_bounds_true_error():
    model = tiny_bert()
    ref = {n: m.dense_matrix().detach().double() for n, m in model.mpo_modules()}
    sq = DimensionSqueezer(model, loss_of, None, delta=math.inf, max_iters=8, step=2, log=None)
    res = sq.run()
    last = {}
    for s in res.history:
        last[s.module] = s.module_error
    for name, est in last.items():
        W = dict(model.mpo_modules())[name].dense_matrix().detach().double()
        true = float((W - ref[name]).norm() / ref[name].norm())
        assert true <= est + 1e-5


def test_stops_on_delta_and_restores_last_good_model():
    model = tiny_bert()
    sq = DimensionSqueezer(model, loss_of, lambda m: finetune(m), delta=1e-9, max_iters=5,
                           step=4, log=None)
    shapes = {n: m.core_shapes for n, m in model.mpo_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    res = sq.run()
    assert len(res.history) == 1 and not res.history[0].accepted
    assert res.reason.startswith("|p - p~|")
    assert {n: m.core_shapes for n, m in model.mpo_modules()} == shapes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert res.final_loss == res.start_loss


def test_target_params_and_training_after_cuts():
    model = tiny_bert()
    start = sum(c.numel() for _, m in model.mpo_modules() for c in m.cores)
    sq = DimensionSqueezer(model, loss_of, lambda m: finetune(m, 1), delta=10.0, step=4,
                           max_iters=50, target_params=int(0.6 * start), log=None)
    res = sq.run()
    assert res.reason.startswith("target") and res.final_params <= 0.6 * start
    for _, m in model.mpo_modules():  # central tensors stayed frozen through the cuts
        assert not m.cores[m.central_index].requires_grad
    finetune(model, 2)


def test_albert_shared_layers_squeeze():
    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                       num_labels=2)
    model = get_mpo_model(AlbertForSequenceClassification(cfg),
                          MPOConfig(target_modules=["query", "ffn"], n_sites=3), progress=False)
    sq = DimensionSqueezer(model, loss_of, lambda m: finetune(m, 1), delta=10.0, step=2,
                           max_iters=3, log=None)
    res = sq.run()
    assert len(res.history) == 3 and all(s.accepted for s in res.history)
    assert len(dict(model.mpo_modules())) == 2  # the shared layer's two modules
    assert loss_of(model) == pytest.approx(res.final_loss)


def test_bad_arguments():
    model = tiny_bert()
    with pytest.raises(ValueError, match="delta must be > 0"):
        DimensionSqueezer(model, loss_of, delta=0)
    with pytest.raises(ValueError, match="bonds must be"):
        DimensionSqueezer(model, loss_of, delta=1, bonds="middle")
    with pytest.raises(ValueError, match="no MPO modules"):
        DimensionSqueezer(torch.nn.Linear(2, 2), loss_of, delta=1)


def test_several_cuts_per_iteration():
    model = tiny_bert()
    sq = DimensionSqueezer(model, loss_of, None, delta=math.inf, max_iters=2, cuts_per_iter=3,
                           log=None)
    plan = sq.schedule(3)
    res = sq.run()
    assert len(res.history) == 6 and {s.iteration for s in res.history} == {1, 2}
    assert {(s.module, s.bond) for s in res.history[:3]} == {(p[0], p[1]) for p in plan}
