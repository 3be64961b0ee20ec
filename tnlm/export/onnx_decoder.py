"""ONNX export of a (compressed) causal LM with its key/value cache, and greedy generation
with ONNX Runtime.

A decoder exported without its cache (:func:`tnlm.export.export_onnx`) recomputes every
earlier position for each new token. :func:`export_onnx_decoder` writes one graph that
takes the cache of the positions already seen and returns it extended, in the layout
that ONNX decoders use (the names of Hugging Face Optimum's ``decoder_model_merged``)::

    inputs (int64)
      input_ids                  (batch, seq)
      attention_mask             (batch, past + seq)
      position_ids               (batch, seq)
    inputs (float32), i = 0 .. layers - 1
      past_key_values.{i}.key    (batch, kv_heads, past, head_dim)
      past_key_values.{i}.value  (batch, kv_heads, past, head_dim)
    outputs (float32)
      logits                     (batch, seq, vocab)
      present.{i}.key            (batch, kv_heads, past + seq, head_dim)
      present.{i}.value          (batch, kv_heads, past + seq, head_dim)

``past`` may be 0 (the prompt's first pass: empty cache tensors), so one graph serves the
prompt and every later token. MPO layers stay factorized, as in :func:`export_onnx`
(:func:`tnlm.export.factorized.factorized_copy`).

:class:`OnnxCausalLM` runs such a file: :meth:`OnnxCausalLM.logits` (one pass, empty
cache) and :meth:`OnnxCausalLM.generate` (greedy decoding with the cache, the tokens
``transformers``' ``generate(do_sample=False)`` returns, up to float rounding in ties).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tnlm.export.factorized import factorized_params
from tnlm.export.onnx_graph import (
    FUSE,
    SLOW_FUSIONS,
    ExportResult,
    check_export_args,
    export_copy,
    file_opset,
    onnx_weights,
    ort_session,
    write_graph,
)

__all__ = ["export_onnx_decoder", "OnnxCausalLM", "cache_shape"]


def cache_shape(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder's key/value cache, from its config
    (``num_key_value_heads`` for grouped-query attention, else ``num_attention_heads``;
    ``head_dim``, else hidden size / heads).

    Raises:
        ValueError: the config lacks the layer count, head count or hidden size.
    """
    def first(*names: str) -> int | None:
        for n in names:
            v = getattr(config, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    hidden = first("hidden_size", "n_embd", "d_model")
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"config of type {type(config).__name__}: expected the number of "
                         "layers, attention heads and the hidden size (num_hidden_layers, "
                         "num_attention_heads, hidden_size or their GPT-2 names) to shape the "
                         "key/value cache")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or hidden // heads
    return layers, kv_heads, head_dim


def _check_full_attention(model: nn.Module) -> None:
    """Refuse a model whose cache layers are not plain full-attention ones: a sliding
    window (Mistral's default, Gemma-3) keeps only the last positions, so ``present``
    would be shorter than ``past + seq`` and the graph's mask would not match it."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])
                    if type(layer) is not DynamicLayer})
    if kinds:
        raise ValueError(f"model: {type(model).__name__}'s cache has {', '.join(kinds)} "
                         "layers (a sliding window or another kind); export_onnx_decoder "
                         "exports full-attention caches only (e.g. set config.sliding_window "
                         "= None if the model never attends beyond it)")


class _CachedStep(nn.Module):
    """One decoding pass over flat cache tensors: builds the model's ``DynamicCache`` from
    them and returns ``(logits, key_0, value_0, key_1, ...)``."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = out.past_key_values
        flat: list[torch.Tensor] = []
        for i in range(self.layers):
            layer = present.layers[i]
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def export_onnx_decoder(model: nn.Module, path: str | os.PathLike, *, opset: int = 20,
                        verbose: bool = False, trace_metadata: bool = False,
                        fuse: bool = FUSE) -> ExportResult:
    """Export the causal LM ``model`` with its key/value cache to the ONNX file ``path``,
    keeping its MPO layers factorized (module docstring: the inputs and outputs).

    Args:
        model: an :class:`~tnlm.integration.MPOModel` of a causal LM, a transformers causal
            LM holding MPO layers, or a dense one; left unchanged (a deep copy is exported).
        path: the ``.onnx`` file to write (its folder is created).
        opset: ONNX opset version (as :func:`tnlm.export.export_onnx`).
        verbose: show the exporter's progress lines.
        trace_metadata: keep the exporter's per-node metadata (as :func:`export_onnx`).
        fuse: fuse the MatMuls that read the same states (query/key/value, gate/up), as
            :func:`export_onnx`.

    Returns:
        :class:`~tnlm.export.ExportResult`: ``inputs``, ``outputs`` (names), ``opset``,
        ``mpo_layers``, ``weights``, ``model_params``, ``bytes``, and ``cache`` =
        ``(layers, kv_heads, head_dim)``.

    Raises:
        ValueError: ``model`` has no language-model head (use :func:`export_onnx`), or
            its config does not describe its cache; ``opset`` out of range or ``path`` a
            folder.
        TypeError: ``opset`` not an int, ``verbose``, ``trace_metadata`` or ``fuse`` not
            a bool.
        RuntimeError: the exporter could not trace this architecture's cached pass (the
            message names it).
    """
    path = check_export_args("export_onnx_decoder", path, opset, verbose=verbose,
                             trace_metadata=trace_metadata, fuse=fuse)
    plain, n_mpo = export_copy(model, "export_onnx_decoder")
    if getattr(plain, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"model: expected a causal LM with a language-model head, got "
                         f"{type(plain).__name__} (export it with tnlm.export.export_onnx)")
    layers, kv_heads, head_dim = cache_shape(plain.config)
    _check_full_attention(plain)
    step = _CachedStep(plain, layers).eval()
    # distinct example sizes, so that no two dynamic axes are traced as one
    batch, seq, past = 2, 5, 3
    vocab = int(getattr(plain.config, "vocab_size", 2))
    gen = torch.Generator().manual_seed(0)
    args = (torch.randint(0, vocab, (batch, seq), generator=gen),
            torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).contiguous(),
            [torch.randn(batch, kv_heads, past, head_dim, generator=gen)
             for _ in range(2 * layers)])
    Dim = torch.export.Dim
    b, s, p, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    shapes = ({0: b, 1: s}, {0: b, 1: total}, {0: b, 1: s},
              [{0: b, 2: p} for _ in range(2 * layers)])
    names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *names]
    outputs = ["logits", *[f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]]
    try:
        size, fused = write_graph(step, plain, args, path, inputs=inputs, outputs=outputs,
                                  shapes=shapes, opset=opset, verbose=verbose,
                                  trace_metadata=trace_metadata, fuse=fuse)
    except Exception as err:  # the exporter's errors are many and long: name the model
        raise RuntimeError(f"export_onnx_decoder: could not export the cached pass of "
                           f"{type(plain).__name__} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''})") from err
    written = file_opset(path)
    if written != opset:
        warnings.warn(f"export_onnx_decoder: opset {opset} was asked for, but the exporter "
                      f"could not convert the graph to it; {path} is opset {written}",
                      stacklevel=2)
    return ExportResult(path=path, inputs=inputs, outputs=outputs, opset=written,
                        mpo_layers=n_mpo, weights=onnx_weights(path)["total"],
                        model_params=factorized_params(plain), bytes=size,
                        cache=(layers, kv_heads, head_dim), fused_matmuls=fused)


class OnnxCausalLM:
    """A graph written by :func:`export_onnx_decoder`, run by ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default).
        disabled_optimizers: ONNX Runtime graph optimizations the session leaves out
            (default :data:`~tnlm.export.onnx_graph.SLOW_FUSIONS`; ``()``: none).

    Raises:
        ValueError: the file lacks the cache inputs of :func:`export_onnx_decoder`.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 disabled_optimizers: Sequence[str] = SLOW_FUSIONS) -> None:
        self.session = ort_session(path, threads, disabled_optimizers)
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in ins]
        if missing or not self.past_names:
            raise ValueError(f"path: {path} is not a cached decoder graph (expected inputs "
                             f"input_ids, attention_mask, position_ids and "
                             f"past_key_values.*; got {', '.join(ins)})")
        # (batch, kv_heads, past, head_dim) of each cache input
        self._past_shapes = [ins[n].shape for n in self.past_names]
        if any(not isinstance(sh[1], int) or not isinstance(sh[3], int)
               for sh in self._past_shapes):
            raise ValueError(f"path: {path}: the cache inputs' head axes (1 and 3) must be "
                             f"fixed, got {self._past_shapes[0]}")
        self.kv_heads, self.head_dim = int(self._past_shapes[0][1]), int(self._past_shapes[0][3])
        vocab = self.session.get_outputs()[0].shape[-1]
        self.vocab = vocab if isinstance(vocab, int) else None

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self.past_names, past))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def _empty(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, int(shape[1]), 0, int(shape[3])), np.float32)
                for shape in self._past_shapes]

    def _inputs(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(input_ids.numpy() if hasattr(input_ids, "numpy") else input_ids,
                         dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape (batch, seq) with seq >= 1, got "
                             f"{ids.shape}")
        if ids.min() < 0:
            raise ValueError(f"input_ids: expected token ids >= 0, got {int(ids.min())}")
        if self.vocab is not None and ids.max() >= self.vocab:
            raise ValueError(f"input_ids: expected token ids < the vocabulary size "
                             f"{self.vocab}, got {int(ids.max())}")
        if attention_mask is None:
            return ids, np.ones_like(ids)
        mask = np.asarray(attention_mask.numpy() if hasattr(attention_mask, "numpy")
                          else attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask: expected the shape of input_ids {ids.shape}, "
                             f"got {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask: expected values 0 and 1 only")
        return ids, mask

    def _token_id(self, value: Any, name: str) -> int:
        """``value`` as a token id: an int (not a bool) in ``[0, vocab)``, else
        ``ValueError`` naming ``name`` (a float was cut to an int, True was 1, an id
        beyond the vocabulary failed inside ONNX Runtime once a row had ended)."""
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d array, tensor
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an int token id (or a list of them for "
                             f"eos_token_id), got {value!r}")
        if value < 0 or (self.vocab is not None and value >= self.vocab):
            raise ValueError(f"{name} must be a token id in [0, "
                             f"{self.vocab if self.vocab is not None else 'the vocabulary'}), "
                             f"got {value}")
        return int(value)

    @staticmethod
    def _positions(mask: np.ndarray) -> np.ndarray:
        """Position ids counting the unmasked tokens, as transformers does."""
        return np.clip(np.cumsum(mask, 1) - 1, 0, None)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Logits ``(batch, seq, vocab)`` of one pass over ``input_ids`` (empty cache);
        positions count the unmasked tokens, as transformers does for left padding."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return self._run(ids, mask, self._positions(mask), self._empty(ids.shape[0]))[0]

    def generate(self, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with the cache: ``(batch, seq + new)`` token ids, the prompt
        first (left padding allowed), as ``transformers``' ``generate(do_sample=False)``.

        Prompts must be left-padded (every row's last position unmasked): the next token
        is read at the last position. A row that has produced an EOS token (any of
        ``eos_token_id``; pass the model's ``generation_config.eos_token_id``: the graph
        does not know it, and without it every row runs ``max_new_tokens``) is continued
        with ``pad_token_id`` (default: the first EOS id, else 0); decoding stops when
        every row has ended or after ``max_new_tokens``.

        Raises:
            ValueError: ``max_new_tokens`` not an int >= 1; an EOS or pad id that is not
                an int (a bool or a float included) in ``[0, vocabulary size)`` (an EOS
                outside it is never generated; the pad id is fed back to the graph for
                the rows that have ended); prompts that are not left-padded.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if eos_token_id is not None and hasattr(eos_token_id, "tolist"):  # numpy, torch
            eos_token_id = np.asarray(eos_token_id).reshape(-1).tolist()
        eos = [] if eos_token_id is None else [
            self._token_id(e, "eos_token_id") for e in
            (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
        pad = (self._token_id(pad_token_id, "pad_token_id") if pad_token_id is not None
               else (eos[0] if eos else 0))
        ids, mask = self._inputs(input_ids, attention_mask)
        if not mask[:, -1].all():
            raise ValueError("attention_mask: expected left padding (the last position of "
                             "every row unmasked); pad prompts on the left to generate")
        positions = self._positions(mask)
        logits, past = self._run(ids, mask, positions, self._empty(ids.shape[0]))
        done = np.zeros(ids.shape[0], dtype=bool)
        out = [ids]
        for k in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1).astype(np.int64)
            nxt = np.where(done, pad, nxt)
            out.append(nxt[:, None])
            done |= np.isin(nxt, eos)
            if done.all() or k == max_new_tokens - 1:  # no pass for a token not asked for
                break
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], 1)
            logits, past = self._run(nxt[:, None], mask, positions, past)
        return np.concatenate(out, 1)
