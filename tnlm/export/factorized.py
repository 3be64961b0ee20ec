"""Export-friendly stand-ins for the MPO layers: plain chains of matrix products.

:class:`~tnlm.bridge.MPOLinear` chooses its forward path at run time (planned einsums,
a cached dense W, an autograd function for training): fine in eager PyTorch, but an
exported graph should hold the cores and nothing else. :class:`FactorizedLinear`
computes the same ``x @ W + b`` as one ``MatMul`` per core (with reshapes and, where
a leg of size > 1 has to move, one transpose), so an ONNX graph keeps the factorized
weights: a 2-site low-rank layer ``(1, I, 1, r), (r, 1, J, 1)`` becomes ``(x @ A) @ B``
with ``A`` (I, r) and ``B`` (r, J), never the merged W (I, J).
:class:`FactorizedEmbedding` gathers each token's slice of every core and contracts
the chain per token. :class:`PivotedChain` writes a gauge-fixed layer as ``(x @ B) @ R``.
:func:`factorized_copy` swaps them in on a deep copy.
"""

from __future__ import annotations

import copy
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from tnlm.bridge import MPOEmbedding, MPOLinear, MPOModule
from tnlm.bridge.pivoted import PivotedLinear
from tnlm.core import MPO
from tnlm.integration import MPOModel

__all__ = ["FactorizedLinear", "FactorizedEmbedding", "PivotedChain", "balanced_factors",
           "factorized_copy", "factorized_params", "plain_model"]


def _site_matrices(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Core ``T[d, i, j, e]`` as the matrix ``(d * i, j * e)`` of one sweep step."""
    return [c.detach().reshape(c.shape[0] * c.shape[1], c.shape[2] * c.shape[3]).clone()
            for c in cores]


class FactorizedLinear(nn.Module):
    """``y = x @ W + b`` with ``W`` the MPO of ``layer``, as one matrix product per core.

    The sweep keeps ``Y[rows, i_k, M]`` (``M`` = the remaining input legs, the output legs
    done so far and the bond ``d_{k-1}``), moves ``i_k`` to the end (a transpose only
    when ``i_k > 1`` and ``M > 1``), and multiplies by the core as a ``(d_{k-1} i_k,
    j_k d_k)`` matrix. Zero-padded layers pad ``x`` and slice ``y``. When only the first
    core has an input leg > 1 and only the last an output leg > 1 (the 2-site low-rank
    layout ``(1, I, 1, r), (r, 1, J, 1)`` is one), nothing moves and nothing is padded:
    the forward is ``x @ M_0 @ ... @ M_{n-1} + b`` on ``x`` as it comes, with no reshape
    (:attr:`matrix_chain`). The parameters are ``mats.{k}`` (one per core, same numbers
    as the cores) and ``bias``.

    Args:
        layer: an :class:`~tnlm.bridge.MPOLinear` (read, not modified).
    """

    def __init__(self, layer: MPOLinear) -> None:
        super().__init__()
        cores = list(layer.cores)
        self.in_dim, self.out_dim = int(layer.in_dim), int(layer.out_dim)
        self.in_shape = tuple(int(c.shape[1]) for c in cores)
        self.out_shape = tuple(int(c.shape[2]) for c in cores)
        self.bonds = tuple(int(c.shape[0]) for c in cores)
        self.mats = nn.ParameterList([nn.Parameter(m, requires_grad=False)
                                      for m in _site_matrices(cores)])
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        # a chain of plain matrices (the 2-site low-rank layout among them): only the
        # first core has an input leg > 1 and only the last an output leg > 1, no padding
        self.matrix_chain = (prod(self.in_shape) == self.in_dim
                             and prod(self.out_shape) == self.out_dim
                             and all(i == 1 for i in self.in_shape[1:])
                             and all(j == 1 for j in self.out_shape[:-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W + b`` for ``x`` of shape ``(..., in_dim)``."""
        if self.matrix_chain:  # x @ M_0 @ ... @ M_{n-1}: no reshape in the graph
            y = x
            for mat in self.mats:
                y = y @ mat
            return y if self.bias is None else y + self.bias
        lead = x.shape[:-1]
        in_size = prod(self.in_shape)
        y = x.reshape(-1, self.in_dim)
        if in_size != self.in_dim:
            y = F.pad(y, (0, in_size - self.in_dim))
        n = len(self.mats)
        done_out = 1
        for k, mat in enumerate(self.mats):
            i_k, d = self.in_shape[k], self.bonds[k]
            rest = prod(self.in_shape[k + 1:])
            m = rest * done_out * d  # what follows i_k in the state's layout
            if i_k > 1 and m > 1:
                y = y.reshape(-1, i_k, m).transpose(1, 2)
            y = y.reshape(-1, d * i_k) @ mat  # (rows * rest * done_out, j_k * d_k)
            done_out *= self.out_shape[k]
            if k + 1 < n:
                y = y.reshape(-1, rest * done_out * self.bonds[k + 1])
        y = y.reshape(-1, prod(self.out_shape))
        if y.shape[-1] != self.out_dim:
            y = y[:, : self.out_dim]
        y = y.reshape(*lead, self.out_dim)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{tuple(m.shape)}" for m in self.mats)
        return f"in={self.in_dim}, out={self.out_dim}, matrices=[{shapes}]"


@torch.no_grad()
def balanced_factors(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product ``left @ right`` ((I, r) @ (r, J)) as ``(U sqrt(S), sqrt(S) V^T)``, its
    thin SVD split evenly between the two factors: the 2-site MPO ``left``, ``right`` in
    the paper's symmetric gauge (:meth:`tnlm.core.MPO.symmetric_gauge`, in float64; its
    guard drops singular values below 100 eps of the largest), returned in ``left``'s
    dtype. The same product up to rounding, ``B^T B = R R^T = diag(S)``, with ``k <=
    min(I, r, J)`` columns and rows (``k = r`` for a truncated layer); the (I, J) product
    is never formed."""
    (n_in, r), n_out = left.shape, right.shape[1]
    cores = MPO([left.double().reshape(1, n_in, 1, r), right.double().reshape(r, 1, n_out, 1)],
                in_dim=n_in, out_dim=n_out).symmetric_gauge().cores
    return cores[0].reshape(n_in, -1).to(left.dtype), cores[1].reshape(-1, n_out).to(left.dtype)


class PivotedChain(nn.Module):
    """A :class:`~tnlm.bridge.pivoted.PivotedLinear` as two plain matrix products,
    ``y = (x @ B) @ R + b``, for export.

    ``W = B0 @ R0`` with ``B0`` (I, r) the layer's :meth:`~tnlm.bridge.pivoted.PivotedLinear.basis`
    (the identity at the pivot rows) and ``R0`` (r, J) its ``right``. The chain stores the
    same product in the balanced (symmetric) gauge of the plain low-rank layers,
    ``B = U sqrt(S)``, ``R = sqrt(S) V^T`` from the rank-r SVD ``W = U S V^T``
    (:func:`balanced_factors`; W is never formed), so ``B^T B = R R^T = S``. The
    gauge-fixed form puts every singular value into ``R0`` beside an identity block,
    which 7-bit int8 resolves poorly. Measured on MiniLM at 50 % (SST-2 cosine to the
    dense model, docs/export.md): per column at 7 bits (``quantize_int8``'s default)
    0.731 balanced against 0.724, per tensor at 7 bits 0.693 against 0.251, but per
    tensor at 8 bits 0.079 against 0.517: two full-range factors saturate ONNX Runtime's
    u8 x s8 pair sums on CPUs without VNNI, so never quantize this chain 8-bit per tensor.
    The graph stores ``r (I + J)`` numbers instead of the layer's ``r (I + J - r)``: the
    two feature-axis ``Gather`` nodes of the gauge-fixed form cost ONNX Runtime more time
    than the ``r**2`` numbers they save (benchmarks/bench_pivoted_onnx.py: 1.35x / 1.17x
    the chain's time on MiniLM's 384 x 1536 layer at rank 168, batch 1 / 8 x 64 tokens).
    The same function up to float rounding; parameters ``mats.0``, ``mats.1``, ``bias``.

    Args:
        layer: a :class:`~tnlm.bridge.pivoted.PivotedLinear` (read, not modified).
    """

    def __init__(self, layer: PivotedLinear) -> None:
        super().__init__()
        self.in_dim, self.out_dim = int(layer.in_dim), int(layer.out_dim)
        basis, right = balanced_factors(layer.basis(), layer.right.detach())
        self.mats = nn.ParameterList([nn.Parameter(basis, requires_grad=False),
                                      nn.Parameter(right, requires_grad=False)])
        bias = layer.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W + b`` for ``x`` of shape ``(..., in_dim)``."""
        y = (x @ self.mats[0]) @ self.mats[1]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_dim}, out={self.out_dim}, rank={self.mats[1].shape[0]}"


class FactorizedEmbedding(nn.Module):
    """The rows of an :class:`~tnlm.bridge.MPOEmbedding`'s table for token ids, from the
    cores: each id's mixed-radix digits select one slice per core (``Gather``), and the
    slices are multiplied along the chain (batched ``MatMul``); the table is never built.

    An id outside ``[0, num_embeddings)`` raises ``IndexError`` naming the range, as
    :class:`~tnlm.bridge.MPOEmbedding` does (its digits would otherwise select some other
    row, or a zero row of a padded vocabulary). In a traced graph (``torch.export``, the
    ONNX exporter) the check cannot raise; there such an id selects the first core's slice
    one past its last, so that the exported graph's lookup (ONNX ``GatherND``) fails in
    ONNX Runtime ("invalid index found") as the dense table's ``Gather`` does for an id
    past the vocabulary (a negative id fails too, where the dense ``Gather`` counts it
    from the end).

    Args:
        layer: an :class:`~tnlm.bridge.MPOEmbedding` (read, not modified).
    """

    def __init__(self, layer: MPOEmbedding) -> None:
        super().__init__()
        cores = [c.detach() for c in layer.cores]
        self.num_embeddings, self.embedding_dim = int(layer.in_dim), int(layer.out_dim)
        self.in_shape = tuple(int(c.shape[1]) for c in cores)
        self.out_shape = tuple(int(c.shape[2]) for c in cores)
        # slices[k][i_k] = T_k[:, i_k, :, :] as (d, j_k * e)
        self.slices = nn.ParameterList([
            nn.Parameter(c.permute(1, 0, 2, 3).reshape(c.shape[1], c.shape[0],
                                                       c.shape[2] * c.shape[3]).clone(),
                         requires_grad=False) for c in cores])
        strides = [prod(self.in_shape[k + 1:]) for k in range(len(cores))]
        self.strides = tuple(strides)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(*ids.shape, embedding_dim)`` rows of the table.

        Raises:
            IndexError: an id outside ``[0, num_embeddings)`` (eager mode; class docstring).
        """
        flat = ids.reshape(-1)
        n = self.num_embeddings
        if not torch.compiler.is_compiling() and flat.numel():
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= n:
                raise IndexError(f"token ids must be in [0, {n}), got range [{low}, {high}]")
        # traced: an id out of range selects slice in_shape[0] of the first core, out of
        # bounds, so that the graph's Gather fails instead of returning another row
        valid = (flat >= 0) & (flat < n)
        out = None
        for k, sl in enumerate(self.slices):
            digit = torch.remainder(torch.div(flat, self.strides[k], rounding_mode="floor"),
                                    self.in_shape[k])
            if k == 0:
                digit = torch.where(valid, digit, self.in_shape[0])
            g = sl[digit]  # (N, d, j_k * e)
            e = sl.shape[2] // self.out_shape[k]
            if out is None:
                out = g.reshape(-1, self.out_shape[k], e)  # d_0 = 1
            else:
                rows = out.shape[1]
                out = torch.bmm(out, g).reshape(-1, rows * self.out_shape[k], e)
        y = out.reshape(-1, prod(self.out_shape))[:, : self.embedding_dim]
        return y.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}")


def _swap(root: nn.Module) -> int:
    """Replace every MPO module and :class:`~tnlm.bridge.pivoted.PivotedLinear` under
    ``root`` in place (a module reached by several paths by the same replacement, so
    shared weights stay shared); returns how many factorized layers the copy holds."""
    count = 0
    made: dict[int, nn.Module] = {}  # one replacement a module, wherever it is reached
    for name, module in list(root.named_modules(remove_duplicate=False)):
        if not isinstance(module, (MPOModule, PivotedLinear)) or not name:
            continue
        if id(module) in made:
            new: nn.Module = made[id(module)]
        elif isinstance(module, PivotedLinear):
            new = PivotedChain(module)
        elif isinstance(module, MPOLinear):
            new = FactorizedLinear(module)
        elif isinstance(module, MPOEmbedding):
            new = FactorizedEmbedding(module)
        else:  # pragma: no cover - every MPO kind is one of the two
            raise TypeError(f"{name}: no export form for {type(module).__name__}")
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
        if id(module) not in made:
            made[id(module)] = new
            count += 1
    return count


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (an :class:`~tnlm.integration.MPOModel`'s
    ``base_model``), or ``model`` itself."""
    return model.base_model if isinstance(model, MPOModel) else model


def factorized_copy(model: nn.Module) -> tuple[nn.Module, int]:
    """``(copy, n)``: a deep copy of the transformers model in ``model`` (an
    :class:`~tnlm.integration.MPOModel` or a model holding MPO layers) in eval mode,
    with each of its ``n`` MPO layers replaced by :class:`FactorizedLinear` /
    :class:`FactorizedEmbedding` (and each PivotedLinear by :class:`PivotedChain`).
    ``model`` is left as it was. A dense model is copied unchanged (``n = 0``)."""
    copied = copy.deepcopy(plain_model(model)).eval()
    n = _swap(copied)
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied, n


def factorized_params(model: nn.Module) -> int:
    """Numbers held by the model's parameters, each shared tensor counted once (what an
    exported graph stores as weights)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
