"""What causal compression and healing leave in memory: no dense caches the healing
forwards never read, no gradients outliving their step or block."""

from __future__ import annotations

import copy

import torch

from tests.common import VOCAB, make_causal_lm
from tnlm.bridge import MPOLinear, MPOModule
from tnlm.compress.decoder.heal import CausalHealConfig, heal_causal
from tnlm.compress.layerwise import LayerwiseConfig, compress_layerwise
from tnlm.core import MPO
from tnlm.integration.architectures import default_targets


def _llama():
    return make_causal_lm("llama")


def _seqs():
    return torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))


def _full_rank_student(teacher):
    """The teacher with one MLP linear as a full-rank 2-site MPO layer: r (I + J) > I J,
    so a forward without gradients takes (and caches) its dense W."""
    student = copy.deepcopy(teacher)
    lin = student.model.layers[0].mlp.up_proj
    J, I = lin.weight.shape
    mpo = MPO.from_matrix(lin.weight.detach().T.double(), (I, 1), (1, J))
    layer = MPOLinear.from_mpo(mpo, None, "auto", dtype=torch.float32, kind="linear")
    student.model.layers[0].mlp.up_proj = layer
    with torch.no_grad():
        layer(torch.randn(1, I))
    assert layer._dense_cache  # the case this file is about
    layer.invalidate_cache()
    return student, layer


def test_healing_with_the_chunked_kl_leaves_no_dense_cache():
    """The chunked KL's first-batch check runs the student without gradients; the dense
    W it made MPO layers cache is freed, not kept through every step."""
    teacher = _llama()
    student, layer = _full_rank_student(teacher)
    seen = []
    heal_causal(student, teacher, _seqs(), CausalHealConfig(steps=3, batch_size=2, chunk=4),
                progress=False, on_step=lambda k: seen.append(bool(layer._dense_cache)))
    assert seen == [False, False, False, False]  # before the first step and after each
    assert not any(m._dense_cache for m in student.modules() if isinstance(m, MPOModule))


def test_no_gradient_outlives_its_healing_step():
    """Gradients left on the trained parameters by earlier work are dropped before the
    first step (the run equals one without them), and each step's are freed right after
    its update, before the next forward."""
    teacher = _llama()
    runs = {}
    for planted in (False, True):
        student, layer = _full_rank_student(teacher)
        if planted:
            for p in layer.parameters():  # as block fitting used to leave them
                p.grad = torch.ones_like(p)
        held = []
        res = heal_causal(student, teacher, _seqs(), CausalHealConfig(steps=3, batch_size=2),
                          progress=False,
                          on_step=lambda k, s=student, h=held: h.append(
                              sum(p.grad is not None for p in s.parameters())))
        assert held == [0, 0, 0, 0]  # before the first step and after each update
        assert all(p.grad is None for p in student.parameters())
        runs[planted] = (res.losses, [p.detach().clone() for p in layer.parameters()])
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))


def test_block_fitting_leaves_no_gradients():
    teacher = _llama()
    student = copy.deepcopy(teacher)
    compress_layerwise(student, _seqs(), LayerwiseConfig(default_targets(student), budget=0.5,
                                                         fit_steps=3), progress=False)
    assert any(isinstance(m, MPOModule) for m in student.modules())
    assert all(p.grad is None for p in student.parameters())
