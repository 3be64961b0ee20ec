"""ONNX export of a (compressed) transformers model that keeps the factorized layers.

:func:`export_onnx` swaps every MPO layer of a deep copy for its matmul chain
(:mod:`tnlm.export.factorized`) and exports it with ``torch.onnx.export(...,
dynamo=True)``, the ``torch.export``-based exporter (it needs ``onnxscript``; the
legacy TorchScript exporter, ``dynamo=False``, traces the attention mask's shape
arithmetic as constants in torch 2.13, and its graph is wrong at another sequence
length). Batch and sequence axes are dynamic. Outputs: ``last_hidden_state`` (or
``logits`` for a model with a language-model head) and, with ``pooling="mean"``,
``sentence_embedding``: the masked mean of the last hidden states, L2-normalised, as
:func:`tnlm.integration.mean_pooled` computes it. The exporter's per-node debug
metadata (stack traces with local paths) is cleared (:func:`strip_node_metadata`).

:class:`OnnxEncoder` runs an exported file with ONNX Runtime; :func:`onnx_weights`
counts the numbers the file stores (to check that the cores, not W, were exported).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tnlm.core.validation import check_positive_int
from tnlm.export.factorized import PivotedChain, factorized_copy, factorized_params
from tnlm.export.fuse import fuse_shared_matmuls
from tnlm.export.staging import save_graph_replacing, staging_dir

__all__ = ["export_onnx", "ExportResult", "OnnxEncoder", "onnx_weights", "file_opset", "EXPORTER",
           "GAUGE_FIXED_KEY", "gauge_fixed_chains",
           "SUPPORTED_INPUTS", "strip_node_metadata", "as_float32", "export_copy",
           "write_graph", "SLOW_FUSIONS", "FUSE", "ort_session", "check_export_args",
           "MIN_OPSET", "referenced_data"]

#: the exporter used: ``torch.onnx.export(..., dynamo=True)``
EXPORTER = "torch.onnx.export(dynamo=True)"
#: whether the exporters fuse the MatMuls that share their input by default (no: on
#: MiniLM it changed no latency by more than 1 %, docs/export.md)
FUSE = False
#: ONNX Runtime graph optimizations tnlm's runners (:class:`OnnxEncoder`,
#: :class:`~tnlm.export.OnnxCausalLM`) turn off: ``SkipLayerNormFusion`` replaces each
#: residual ``Add`` + ``LayerNormalization`` by one ``SkipLayerNormalization``, whose CPU
#: kernel took longer than the two it replaces (MiniLM at batch 8 x 64 tokens, one
#: thread: the dense graph 0.92x the time without it, a 50 % graph 0.86x;
#: docs/export.md). Pass ``disabled_optimizers=`` to an ``InferenceSession`` of your own.
SLOW_FUSIONS = ("SkipLayerNormFusion",)
#: the model inputs an exported graph may take, in this order
SUPPORTED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: above this many weight bytes the graph's weights go to an external data file
#: (protobuf's 2 GB limit)
_EXTERNAL_BYTES = 1_800_000_000

#: the key of an exported file's model metadata (``metadata_props``) that counts its
#: gauge-fixed layers' chains (:class:`~tnlm.export.factorized.PivotedChain`), which int8
#: must not quantize at 8 bits per tensor (:func:`tnlm.export.quantize_int8` reads it)
GAUGE_FIXED_KEY = "tnlm.gauge_fixed_chains"


#: the lowest opset an exporter is asked for (ONNX Runtime runs opset 7 and later)
MIN_OPSET = 7


def newest_opset() -> int | None:
    """The newest opset the installed ``onnx`` knows (None without ``onnx``)."""
    try:
        import onnx
    except ImportError:  # the exporter names the missing package
        return None
    return int(onnx.defs.onnx_opset_version())


def opset_in_range(opset: int) -> bool:
    """Whether ``opset`` lies between :data:`MIN_OPSET` and :func:`newest_opset` (any
    opset from the lowest when ``onnx`` is missing: the exporter names the package)."""
    newest = newest_opset()
    return opset >= MIN_OPSET and (newest is None or opset <= newest)


def check_export_args(caller: str, path: str | os.PathLike, opset: Any,
                      **flags: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path` after checking an exporter's arguments before
    any work: ``opset`` an int (not a bool) between :data:`MIN_OPSET` and the newest opset
    the installed ``onnx`` knows, each of ``flags`` a bool, ``path`` not a folder.

    Raises:
        TypeError: ``opset`` not an int, a flag not a bool (each named).
        ValueError: ``opset`` out of range; ``path`` is a folder.
    """
    if isinstance(opset, (bool, np.bool_)) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"{caller}: opset must be an int (an ONNX opset version), got "
                        f"{opset!r}")
    if not opset_in_range(opset):
        raise ValueError(f"{caller}: opset must be an ONNX opset between {MIN_OPSET} and "
                         f"{newest_opset() or 'the newest'}, got {opset}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{caller}: {name} must be a bool, got {value!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{caller}: path {path} is a folder; expected the .onnx file to write")
    return path


class _Graph(nn.Module):
    """What is exported: the model called with named inputs, returning a tuple of tensors."""

    def __init__(self, model: nn.Module, inputs: Sequence[str], output: str,
                 pooling: str | None) -> None:
        super().__init__()
        self.model = model
        self.inputs = tuple(inputs)
        self.output = output
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if "token_type_ids" in self.inputs:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs, use_cache=False) if self.output == "logits" else \
            self.model(**kwargs)
        hidden = getattr(out, self.output)
        if self.pooling is None:
            return (hidden,)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return hidden, F.normalize(pooled, dim=-1)


def _model_inputs(model: nn.Module) -> list[str]:
    """The inputs of :data:`SUPPORTED_INPUTS` that ``model.forward`` accepts."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in SUPPORTED_INPUTS if n in params]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(f"model: {type(model).__name__}.forward must take input_ids and "
                         "attention_mask to be exported")
    return names


def _output_name(model: nn.Module, pooling: str | None = None) -> str:
    """``"logits"`` for a model with a language-model head, else ``"last_hidden_state"``;
    ``ValueError`` for a model with another task head (its outputs are neither) or for
    ``pooling`` of a head's logits."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is not None:
        if pooling is not None:
            raise ValueError(f"pooling={pooling!r} pools hidden states, but "
                             f"{type(model).__name__} returns logits (a language-model head): "
                             "pass pooling=None, or export its bare encoder (AutoModel)")
        return "logits"
    bare = getattr(model, "base_model", model)
    if bare is not model:
        raise ValueError(f"model: {type(model).__name__} has a task head whose outputs are "
                         "neither hidden states nor a language model's logits; export its "
                         "bare model (AutoModel, model.base_model) or a causal LM")
    return "last_hidden_state"


class ExportResult(dict):
    """What :func:`export_onnx` wrote: ``path``, ``inputs``, ``outputs``, ``opset``,
    ``mpo_layers`` (layers exported as matmul chains), ``weights`` (numbers stored in
    the file), ``model_params`` (numbers of the exported model's parameters),
    ``bytes`` (file size, external data included) and ``fused_matmuls`` (MatMul nodes
    the fusion of shared inputs removed; 0 without it)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines, warnings and log records (stdout, stderr,
    the ``torch.onnx`` and ``onnxscript`` loggers)."""
    sink = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *, opset: int = 20,
                pooling: str | None = None, sample: Sequence[str] | None = None,
                verbose: bool = False, trace_metadata: bool = False,
                fuse: bool = FUSE) -> ExportResult:
    """Export ``model`` to the ONNX file ``path``, keeping its MPO layers factorized.

    Args:
        model: an :class:`~tnlm.integration.MPOModel`, a transformers model holding MPO
            layers, or a dense transformers model (exported as it is); left unchanged
            (a deep copy is exported).
        tokenizer: its tokenizer; it makes the example batch the graph is traced on.
        path: the ``.onnx`` file to write (its folder is created).
        opset: ONNX opset version (default 20: GELU is one ``Gelu`` operator, which ONNX
            Runtime fuses with the bias before it, where opset 18 spells it out as Div,
            Erf, Add, Mul, Mul; measured on MiniLM, the dense graph at 18 takes 1.05-1.08x
            the time of the same graph at 20, benchmarks/bench_onnx.py --opsets 20 18;
            needs ONNX Runtime >= 1.17. torch 2.13's exporter writes 18 natively and
            converts to others with onnxscript, which may fail, e.g. for MiniLM at 17,
            and then leaves the file at 18 with a warning; the result's ``opset`` is the
            file's).
        pooling: ``None`` (outputs: ``last_hidden_state``, or ``logits`` for a model with
            a language-model head) or ``"mean"`` (also ``sentence_embedding``, the
            normalised masked mean, as :func:`tnlm.integration.mean_pooled`).
        sample: example sentences to trace on, at least one (default: two; any will do:
            the axes are dynamic).
        verbose: show the exporter's progress lines.
        trace_metadata: keep the exporter's per-node metadata (the Python stack trace,
            module names and FX node of each ONNX node, with the local file paths of
            the exporting machine; about 1 kB a node, 0.7 MB for MiniLM). Off: each
            node's ``metadata_props`` and ``doc_string`` are cleared, which changes
            nothing that ONNX Runtime computes.
        fuse: the projections that read the same hidden states (query, key and value;
            their first factors for MPO layers) as one MatMul and a Split
            (:func:`tnlm.export.fuse.fuse_shared_matmuls`; the same numbers, measured in
            docs/export.md); not for a file whose weights lie in external data.

    Returns:
        :class:`ExportResult` with the inputs and outputs (names), the number of MPO
        layers exported as matmul chains, and the weights stored in the file.

    Raises:
        ValueError: an unknown ``pooling``, ``pooling`` of a language-model head's
            logits, a model with another task head (a classifier: export its
            ``base_model``), or a model without ``input_ids`` / ``attention_mask`` inputs;
            ``opset`` out of range or ``path`` a folder (:func:`check_export_args`);
            ``sample`` empty.
        TypeError: ``opset`` not an int, ``verbose``, ``trace_metadata`` or ``fuse`` not
            a bool.
        ImportError: ``onnx`` or ``onnxscript`` is missing (``pip install tnlm[export]``).
    """
    if pooling not in (None, "mean"):
        raise ValueError(f"pooling must be None or 'mean', got {pooling!r}")
    path = check_export_args("export_onnx", path, opset, verbose=verbose,
                             trace_metadata=trace_metadata, fuse=fuse)
    if sample is not None:
        sample = list(sample)
        if not sample:
            raise ValueError("export_onnx: sample must hold at least one sentence to trace "
                             "the graph on, got none (or leave it out: two are made up)")
    plain, n_mpo = export_copy(model, "export_onnx")
    inputs = _model_inputs(plain)
    output = _output_name(plain, pooling)
    graph = _Graph(plain, inputs, output, pooling).eval()
    sample = sample if sample is not None else [
        "a short example sentence to trace the graph", "and a second, longer one, so that "
        "the batch needs padding"]
    if tokenizer.pad_token is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer = _with_pad(tokenizer)
    batch = tokenizer(sample, padding=True, return_tensors="pt")
    args = tuple(batch[n] if n in batch else torch.zeros_like(batch["input_ids"])
                 for n in inputs)
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch_dim, 1: seq_dim} for n in inputs}
    if len(inputs) < 3:
        shapes["token_type_ids"] = None
        args = args + (None,)
    outputs = [output] + (["sentence_embedding"] if pooling else [])
    size, fused = write_graph(graph, plain, args, path, inputs=list(inputs), outputs=outputs,
                              shapes=shapes, opset=opset, verbose=verbose,
                              trace_metadata=trace_metadata, fuse=fuse)
    written = file_opset(path)
    if written != opset:
        warnings.warn(f"export_onnx: opset {opset} was asked for, but the exporter could not "
                      f"convert the graph to it; {path} is opset {written}", stacklevel=2)
    return ExportResult(path=path, inputs=list(inputs), outputs=outputs, opset=written,
                        mpo_layers=n_mpo, weights=onnx_weights(path)["total"],
                        model_params=factorized_params(plain), bytes=size,
                        fused_matmuls=fused)


def write_graph(graph: nn.Module, model: nn.Module, args: tuple, path: Path, *,
                inputs: list[str], outputs: list[str], shapes: Any, opset: int,
                verbose: bool, trace_metadata: bool, fuse: bool = False) -> tuple[int, int]:
    """Trace ``graph`` (which calls ``model``, the :func:`export_copy`) on ``args`` into the
    ONNX file ``path`` (its folder created; the weights in an external data file above
    ``_EXTERNAL_BYTES``; the exporter quiet unless ``verbose``; node metadata cleared
    unless ``trace_metadata``; with ``fuse`` and the weights inside the file, the
    MatMuls that share their input fused, :func:`~tnlm.export.fuse.fuse_shared_matmuls`).
    Returns ``(bytes written, external data included; MatMul nodes the fusion removed)``.

    The graph (and its external data file, if any) is written in a staging folder
    beside ``path`` (:func:`~tnlm.export.staging.staging_dir`, which first removes the
    ones killed exports left) and moved onto it with :func:`replace_onnx`: an export that
    fails leaves an existing ``path`` and the data it names as they were. The data file is named
    after the graph's (``<name>.data``), or ``<name>.<8 hex digits>.data`` where that name
    is taken in ``path``'s folder (the former export's, until the final rename); the
    former export's data file that no file names any more is then removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    external = factorized_params(model) * 4 > _EXTERNAL_BYTES
    quiet = contextlib.nullcontext() if verbose else _quiet()
    with staging_dir(path) as tmp:
        target = tmp / path.name
        with quiet, torch.no_grad():
            torch.onnx.export(graph, args, str(target), dynamo=True, opset_version=opset,
                              input_names=inputs, output_names=outputs,
                              dynamic_shapes=shapes, external_data=external)
        chains = sum(isinstance(m, PivotedChain) for m in model.modules())
        _rewrite(target, strip=not trace_metadata, props={GAUGE_FIXED_KEY: str(chains)})
        if fuse and external:
            warnings.warn(f"fuse: {path} keeps its weights in external data (over "
                          f"{_EXTERNAL_BYTES / 1e9:.1f} GB), which fuse_shared_matmuls does "
                          "not rewrite: written unfused", stacklevel=3)
        fused = fuse_shared_matmuls(target) if fuse and not external else 0
        # the data files first, then the graph; an earlier export's data named by no file
        # now is removed
        replace_onnx(target, path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path)), fused


def export_copy(model: nn.Module, caller: str) -> tuple[nn.Module, int]:
    """``(copy, n)``: what an exporter traces, after checking that the exporter's packages
    are there: :func:`~tnlm.export.factorized.factorized_copy` of ``model`` (its ``n`` MPO
    layers as matmul chains) in float32 (:func:`as_float32`).

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` is missing (the message names ``caller``).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{caller} needs onnx and onnxscript ({err}); "
                          "pip install 'tnlm[export]'") from err
    plain, n_mpo = factorized_copy(model)
    return as_float32(plain), n_mpo


def as_float32(model: nn.Module) -> nn.Module:
    """``model`` with every floating parameter and buffer in float32, in place (a model
    loaded from GGUF refuses ``.float()``: transformers marks it quantized, although its
    weights are dequantized tensors)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    return model


def strip_node_metadata(path: str | os.PathLike) -> int:
    """Clear ``metadata_props`` and ``doc_string`` of every node of the ONNX file
    ``path`` (subgraphs and functions included), rewriting it through a temporary file
    in its folder; external data files are left as they are. Returns the bytes saved."""
    path = Path(path)
    before = path.stat().st_size
    _rewrite(path, strip=True, props={})
    return before - path.stat().st_size


def _rewrite(path: Path, *, strip: bool, props: dict[str, str]) -> None:
    """Rewrite the ONNX file ``path`` through a temporary file in its folder: its nodes'
    metadata cleared if ``strip``, ``props`` set in the model's ``metadata_props``
    (replacing those keys); external data files are left as they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if strip:
        for graph in [model.graph, *model.functions]:
            _strip_nodes(graph.node)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    save_graph_replacing(model, path)


def gauge_fixed_chains(path: str | os.PathLike | Any) -> int | None:
    """How many gauge-fixed layers' chains the ONNX file ``path`` (or a ``ModelProto``
    parsed already) holds, as its exporter recorded (:data:`GAUGE_FIXED_KEY`); ``None``
    for a file without the record (not written by tnlm, or before it kept one). Parses the
    file (its external data, if any, not)."""
    import onnx

    model = path if isinstance(path, onnx.ModelProto) else onnx.load(
        str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == GAUGE_FIXED_KEY:
            try:
                return int(p.value)
            except ValueError:
                return None
    return None


def _strip_nodes(nodes: Any) -> None:
    for node in nodes:
        del node.metadata_props[:]
        node.doc_string = ""
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _strip_nodes(g.node)


def _with_pad(tokenizer: Any) -> Any:
    """A copy of a tokenizer without a pad token that pads with its EOS token
    (decoder-only tokenizers, e.g. Llama's)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    return tok


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the ONNX file ``path`` names, as paths beside it (none for a
    self-contained file). Parses the file, not its data."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return [path.parent / n for n in sorted(names)]


def named_data(path: Path) -> set[Path]:
    """:func:`external_files` of ``path`` before it is overwritten: none when there is no
    such file, it is a symbolic link (overwriting replaces the link, not what it points
    to, whose data stays needed) or it is not an ONNX file."""
    if not path.is_file() or path.is_symlink():
        return set()
    try:
        return set(external_files(path))
    except Exception:  # not ONNX: its bytes name no data file  # noqa: BLE001
        return set()


def remove_orphaned_data(path: Path, before: set[Path], keep: Sequence[Path] = ()) -> list[Path]:
    """After ``path`` was overwritten: remove the data files in ``before`` (what the former
    file named, :func:`named_data`) that the new file does not name. Only a plain file
    name in ``path``'s own folder is removed (a location with a folder in it, ``..`` or an
    absolute one is left alone), never one that is the same file as the new file's data,
    as one in ``keep`` (a source's own files) or as one that another ``.onnx`` file in
    that folder names (:func:`referenced_data`: two graphs sharing a data file); ``before``
    of a symbolic link is empty (the former file it pointed to is still there). A removal
    that fails warns: the new file is complete. Returns the files removed."""
    folder = path.parent.resolve()
    now = external_files(path)
    protect = [Path(k) for k in keep] + now
    candidates = [f for f in sorted(before - set(now))
                  if f.parent.resolve() == folder and f.is_file() and not f.is_symlink()]
    if candidates:  # parsing the folder's other graphs only when something would go
        protect += referenced_data(path.parent, skip=path)
    removed = []
    for f in candidates:
        if any(p.exists() and os.path.samefile(f, p) for p in protect):
            continue
        try:
            f.unlink()
        except OSError as err:
            warnings.warn(f"{path} was written; the data file {f} that its former version "
                          f"named could not be removed ({err})", stacklevel=3)
            continue
        removed.append(f)
    return removed


def referenced_data(folder: Path, skip: Path | None = None) -> list[Path]:
    """The external data files that the ``.onnx`` files in ``folder`` (not ``skip``, nor
    hidden staging files) name; a file that is not ONNX names none. Symbolic links are
    read too: a graph reached through one still needs its data."""
    names: set[Path] = set()
    for f in folder.glob("*.onnx"):
        if f.name.startswith(".") or (skip is not None and f.name == skip.name) \
                or not f.is_file():
            continue
        try:
            names.update(external_files(f))
        except Exception:  # not ONNX: its bytes name no data file  # noqa: BLE001
            continue
    return sorted(names)


def replace_onnx(staged: Path, dst: Path, keep: Sequence[Path] = ()) -> None:
    """Move the ONNX file ``staged`` onto ``dst``: the external data files it names first
    (the ``.onnx`` names them), then the file, one atomic rename; the data files the former
    ``dst`` named and the new one does not (an earlier export's) are removed, except those
    in ``keep``.

    No existing file is overwritten but ``dst``: a data file whose name is taken in
    ``dst``'s folder (the former export's data, or a file of the user's) moves under a
    fresh name, ``<name>.<8 hex digits>.data``, which the staged ``.onnx`` is rewritten to
    name. So until the final rename the former ``dst`` keeps its own data, and if a rename
    fails the data moved for it go back beside ``staged``: the former file stays whole,
    the staged one too."""
    before = named_data(dst)  # none through a symbolic link
    names = [f.name for f in external_files(staged)]
    renames = {n: _fresh_data_name(dst.parent, n).name for n in names
               if (dst.parent / n).exists() or (dst.parent / n).is_symlink()}
    if renames:  # the staged file and its data renamed alike, beside each other
        for old, new in renames.items():
            os.replace(staged.parent / old, staged.parent / new)
        _relocate(staged, renames)
    moved: list[tuple[Path, Path]] = []
    try:
        for n in (renames.get(n, n) for n in names):
            os.replace(staged.parent / n, dst.parent / n)
            moved.append((dst.parent / n, staged.parent / n))
        os.replace(staged, dst)
    except BaseException:
        for there, back in moved:  # the staged file whole again; the former dst untouched
            with contextlib.suppress(OSError):
                os.replace(there, back)
        raise
    remove_orphaned_data(dst, before, keep)


def _fresh_data_name(folder: Path, name: str) -> Path:
    """A name for the data file ``name`` that no file in ``folder`` has:
    ``<name without .data>.<8 hex digits>.data``."""
    import secrets

    stem = name[:-len(".data")] if name.endswith(".data") else name
    while True:
        p = folder / f"{stem}.{secrets.token_hex(4)}.data"
        if not (p.exists() or p.is_symlink()):
            return p


def _relocate(path: Path, renames: dict[str, str]) -> None:
    """Rewrite the ONNX file ``path`` (not its data) to name each data file ``old`` of
    ``renames`` by its new name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value in renames:
                entry.value = renames[entry.value]
    onnx.save(model, str(path))


def file_opset(path: str | os.PathLike) -> int:
    """The default-domain opset version an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The weights an ONNX file stores: ``{"total": stored elements, "bytes": bytes,
    "largest": [(name, shape), ...] (the 5 largest), "shapes": {name: shape}}``,
    counting initializers and the tensors of ``Constant`` nodes. ``total`` counts the
    elements of the stored tensors: a byte of packed 4-bit codes (``MatMulNBits``' weights
    at 4 bits, the 4-bit embedding table) counts as one, so it is not the model's
    parameter count for such files; ``bytes`` is exact for all."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes = 0
    for t in model.graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
        nbytes += int(np.prod(t.dims, dtype=np.int64)) * _itemsize(t.data_type)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for a in node.attribute:
            if a.name == "value":
                arr = numpy_helper.to_array(a.t)
                shapes[node.output[0]] = tuple(arr.shape)
                nbytes += arr.nbytes
    total = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()))
    largest = sorted(shapes.items(), key=lambda kv: -int(np.prod(kv[1], dtype=np.int64)))[:5]
    return dict(total=total, bytes=nbytes, largest=largest, shapes=shapes)


def _itemsize(data_type: int) -> int:
    from onnx import helper

    return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize)


def ort_session(path: str | os.PathLike, threads: int | None = None,
                disabled_optimizers: Sequence[str] = SLOW_FUSIONS,
                optimized_path: str | os.PathLike | None = None) -> Any:
    """An ONNX Runtime CPU session of the file ``path``: ``threads`` intra-op threads (and
    one inter-op thread; ``None``: ONNX Runtime's defaults), without the graph
    optimizations ``disabled_optimizers`` (:data:`SLOW_FUSIONS`); with
    ``optimized_path``, the graph as ONNX Runtime optimized it is written there (to see
    which operators run)."""
    if threads is not None:  # an int: True was 1 thread, 2.7 was 2
        if isinstance(threads, (bool, np.bool_)) or not isinstance(threads, (int, np.integer)):
            raise TypeError(f"threads must be None or an int (ONNX Runtime's intra-op "
                            f"threads), got {threads!r}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: ONNX Runtime's default), got {threads}")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


class OnnxEncoder:
    """An exported file run by ONNX Runtime, fed by a tokenizer.

    Args:
        path: the ``.onnx`` file.
        tokenizer: the model's tokenizer.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default).
        max_length: truncation length of :meth:`encode` (128, as
            :func:`tnlm.integration.mean_pooled`).
        disabled_optimizers: ONNX Runtime graph optimizations the session leaves out
            (default :data:`SLOW_FUSIONS`; ``()``: all of ONNX Runtime's).
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, threads: int | None = None,
                 max_length: int = 128,
                 disabled_optimizers: Sequence[str] = SLOW_FUSIONS) -> None:
        self.path = Path(path)
        # an int: True was 1 token (every sentence encoded as its [CLS] alone), 12.7 was 12
        self.max_length = check_positive_int(max_length, "max_length")
        self.session = ort_session(path, threads, disabled_optimizers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.tokenizer = tokenizer

    def feed(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The session's inputs from a tokenizer batch (int64 numpy arrays). An input the
        batch lacks is filled as transformers fills it: an ``attention_mask`` of ones
        (every token attended; zeros masked every token and pooled to a zero vector),
        anything else (``token_type_ids``) of zeros."""
        feed = {}
        for name in self.input_names:
            value = batch.get(name)
            if value is None:
                fill = np.ones_like if name == "attention_mask" else np.zeros_like
                ids = batch["input_ids"]
                value = fill(np.asarray(ids.numpy() if hasattr(ids, "numpy") else ids))
            feed[name] = np.asarray(value.numpy() if hasattr(value, "numpy") else value,
                                    dtype=np.int64)
        return feed

    def run(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Every output of the graph for a tokenizer batch, by name."""
        return dict(zip(self.output_names, self.session.run(None, self.feed(batch))))

    def encode(self, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Normalised mean-pooled sentence embeddings ``(len(sentences), hidden)``: the
        graph's ``sentence_embedding`` when it has one, else pooled here from the first
        output. No sentences give an empty float32 array ``(0, hidden)``
        (sentence-transformers' ``encode([])`` gives an empty array too, of shape
        ``(0,)``).

        Raises:
            TypeError: ``sentences`` is one string (each of its characters would be a
                sentence: pass ``[text]``), or ``batch_size`` is not an int.
            ValueError: ``batch_size`` < 1.
        """
        if isinstance(sentences, (str, bytes)):
            raise TypeError(f"sentences must be a list of strings, got one string "
                            f"({sentences[:40]!r}); each of its characters would be "
                            "encoded as a sentence: pass [text]")
        batch_size = check_positive_int(batch_size, "batch_size")
        if len(sentences) == 0:
            return np.zeros((0, self._width()), np.float32)
        out = []
        for i in range(0, len(sentences), batch_size):
            batch = self.tokenizer(list(sentences[i:i + batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="np")
            res = self.run(batch)
            if "sentence_embedding" in res:
                out.append(res["sentence_embedding"])
                continue
            if self.output_names[0] != "last_hidden_state":
                raise ValueError(f"encode: {self.path} outputs {self.output_names[0]!r}, not "
                                 "hidden states to pool (a language model's graph)")
            hidden = res[self.output_names[0]]
            mask = np.asarray(batch["attention_mask"])[..., None].astype(hidden.dtype)
            pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
            out.append(pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True),
                                        1e-12, None))
        return np.concatenate(out, axis=0)

    def _width(self) -> int:
        """The width of :meth:`encode`'s embeddings: the last axis of the graph's
        ``sentence_embedding`` (else first) output where the file fixes it, else measured
        on one empty sentence."""
        outputs = self.session.get_outputs()
        out = next((o for o in outputs if o.name == "sentence_embedding"), outputs[0])
        width = out.shape[-1] if out.shape else None
        if isinstance(width, int):
            return width
        return int(self.encode([""]).shape[-1])
