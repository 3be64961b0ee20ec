"""Layer-by-layer compression: one block of the model in memory twice, never the whole model.

The way SVD-LLM's low-resource mode and llm-compressor's sequential pipeline work::

    under torch.distributed: rank r of w keeps only the calibration batches r, r + w, ...
    X_s = X_t = the hidden states entering block 0 on the (this rank's) sequences
    allocation "spectrum"/"residual" (budget < 1): one pass of the dense blocks over X_t,
        each target's whitened spectrum (Grams summed over the ranks, each spectrum
        computed by one rank and shared) -> a rank per target
        minimising the summed errors within the budget (rank 0's choice sent to every rank);
        "sensitivity": the same pass, and each target truncated alone at its
            uniform rank, its block and the blocks after it run on the first
            sensitivity_sequences calibration sequences: its error at the last block's
            output weighs its spectrum (Sensitivity; about (L + 1) / 2 more passes of
            the probe per target kind);
        "uniform": each target the largest rank r with r (I + J) <= budget · I J
            (``pivoted``: r (I + J - r), the gauge-fixed count), at least 1, lowered
            where rank 1 of the small targets keeps more (allocate.uniform_ranks)
    resume: the finished blocks and this rank's X_s, X_t from the checkpoint
    for block i = 0 .. L-1 (after the checkpoint's last block):
        T_i  = a dense copy of block i (the teacher's block; one block, not the model)
        Y_t  = T_i(X_t)                                   the teacher's outputs
        statistics of block i's target linears on the student's inputs X_s
            (method "tnlm"; with ``cross``, also the cross Gram against the teacher's
             inputs, so each truncation also corrects the error the earlier blocks left;
             "whitened": the dense model's own inputs X_t; "plain": the weight's own
             SVD, X_t's statistics only for the output errors reported), summed over the
             ranks
        replace each target by its whitened truncation at the allocated rank
            (tnlm.compress.data_aware: exactly low rank in the 2-site layout);
            distributed: each truncation computed by one rank (largest I J min(I, J)
            first, to the least-loaded rank) and broadcast from it
        "tnlm": fit block i's cores, biases and norms to min the block output error
                ``output_error``: by default ||B_i(X_s) - Y_t||² / ||Y_t||² over the
                whole tensor ("position": its mean over positions; block_error;
                gradients averaged over the ranks; kept only if it lowers that error on
                all ranks' calibration sequences)
        X_s = B_i(X_s);  X_t = Y_t;  drop T_i
        checkpoint_dir: each rank writes its X_s, X_t (not after the last block), rank 0
            block i's weights and then state.json, the file of record

Peak memory is the model, one block's copy and two sets of calibration hidden states
(``2 · n_sequences · seq_len · hidden`` floats), whatever the number of blocks. The
calibration sequences have no padding (a token stream cut into equal lengths), so the
causal mask, rotary position embeddings and grouped-query attention are whatever the
model passes its blocks; the hook that captures block 0's inputs records those arguments
and every block is called with them (``use_cache=False``: no KV cache is threaded
through, which would grow across calls).

The package, one job a module: :mod:`~tnlm.compress.layerwise.config` (settings and
result), :mod:`~tnlm.compress.layerwise.blocks` (one block: inputs, error, fitting),
:mod:`~tnlm.compress.layerwise.spectra` (what the allocations measure),
:mod:`~tnlm.compress.layerwise.targets` (what is targeted, checked before any work),
:mod:`~tnlm.compress.layerwise.checkpoint` (the per-block checkpoint) and
:mod:`~tnlm.compress.layerwise.loop` (the loop above).
"""

from __future__ import annotations

from tnlm.compress.layerwise.blocks import (
    block_error,
    block_parameters,
    capture_block_inputs,
    fit_block,
)
from tnlm.compress.layerwise.checkpoint import (
    CHECKPOINT_STATE,
    check_checkpoint,
    layerwise_fingerprint,
    read_checkpoint_state,
    remove_checkpoint,
    write_checkpoint,
)
from tnlm.compress.layerwise.config import (
    ALLOCATIONS,
    METHODS,
    OUTPUT_ERRORS,
    LayerwiseConfig,
    LayerwiseResult,
)
from tnlm.compress.layerwise.loop import compress_layerwise
from tnlm.compress.layerwise.spectra import Sensitivity, dense_spectra
from tnlm.compress.layerwise.targets import check_targets_and_budget, shared_batches

__all__ = ["METHODS", "ALLOCATIONS", "OUTPUT_ERRORS", "block_error", "dense_spectra",
           "Sensitivity", "LayerwiseConfig", "LayerwiseResult",
           "compress_layerwise", "capture_block_inputs", "fit_block", "block_parameters",
           "write_checkpoint", "read_checkpoint_state",
           "layerwise_fingerprint", "check_checkpoint", "remove_checkpoint",
           "CHECKPOINT_STATE", "check_targets_and_budget", "shared_batches"]
