"""The one declaration of the frames' columns and dtypes (units in the names).

Here: the frames a run records (``calls``, ``steps``, ``runs``, ``sampling``, ``requests``, and a
deep run's ``ops``, ``ledger`` and ``allocations``) and
the saved-run schema version. The frames computed from a run are declared in
:mod:`probe.derived_schema`, and how a schema is enforced (:func:`conform`, :func:`empty`) in
:mod:`probe.columns`; this module names all of it, so ``probe.schema`` stays the one place to
import a frame's columns from.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from . import roles as _roles
from . import columns as _columns
from .columns import (  # noqa: F401  (re-exported)
    CAT,
    NULLABLE,
    STR,
    Schema,
    absent_when_null,
    categorical,
    combine,
    conform,
    empty,
    floats,
)
from .derived_schema import (  # noqa: F401  (re-exported)
    APPORTION,
    BOUND_SUMMARY,
    COST,
    DIFF,
    FLOPS_RECONCILED,
    HEADLINE,
    HEADLINE_SPREAD,
    MEMORY_LEDGER,
    OP_DIFF,
    OP_SUMMARY,
    ROOFLINE,
    SIGNIFICANCE,
    SPREAD,
    SUMMARY,
    SWEEP,
    SWEEP_SUMMARY,
    TREE,
    WALK,
)
from .vocab import DEPTHS, LEVELS, PHASES, Depth, Level, Phase  # noqa: F401  (re-exported)

#: v2 (this round): runs.output_ids, calls.descendants, calls.hooks_ms; runs of v1 load with the columns v2
#: added as nulls (their nesting then comes from the calls' time windows, as v1 derived it); a deep run's
#: ops, ledger and allocations frames are optional files of v2 (a run saved without them loads them empty)
SCHEMA_VERSION = 2
#: saved-run schema versions :func:`probe.load` reads
READABLE_VERSIONS = (1, 2)


#: role of a recorded module (see probe.roles); the four block roles are disjoint and tile a forward.
ROLES: tuple[str, ...] = _roles.ROLES
BLOCK_ROLES: tuple[str, ...] = _roles.BLOCKS


#: One row per module call: the largest frame by far (millions of rows at depth "all"), so its
#: columns are as narrow as their values allow. Text with few distinct values is categorical
#: (:data:`CAT`: names, phases, shapes, devices repeat across calls). Counts and indices are 32-bit:
#: ranks, steps, depths, layers, positions (q_len, kv_len), batch rows, a call's index within its
#: step and the calls nested in it stay far below 2**31 (a load refuses a value beyond it);
#: arithmetic that can exceed it (products of lengths, bytes) converts to int64 or float first.
#: ``out_bytes`` stays 64-bit. The CUDA and allocator columns (:data:`CUDA_CALLS`) are absent when
#: all null: a CPU run's calls frame carries none of them, in memory or on disk; read them with
#: :func:`column` or :func:`floats`, which give an absent one as all null.
CALLS: Schema = Schema({
    "run_id": CAT,
    "rank": "int32",  # process rank (tensor parallel); 0 for a single process
    "step": "int32",  # index of the root forward within its run
    "phase": CAT,
    "module": CAT,  # fully qualified module name, e.g. "model.layers.3.mlp"
    "module_type": CAT,  # class name, e.g. "LlamaDecoderLayer"
    "role": CAT,  # see ROLES
    "depth": "int32",  # nesting depth below the profiled model (model.layers.3 -> 3)
    "layer": "Int32",  # decoder layer index, null outside the layers
    "q_len": "int32",  # new positions per sequence in this step
    "kv_len": "int32",  # cached positions before this step
    "batch": "int32",
    "in_shapes": CAT,  # JSON list of the tensor arguments' shapes
    "out_shapes": CAT,  # JSON list of the output tensors' shapes
    "dtype": CAT,  # dtype of the first output tensor
    "device": CAT,  # device the call ran on (first output tensor)
    "placement": CAT,  # where the module's weights stay between calls: a device, "disk" or "mixed"; null without weights
    "start_ms": "float64",  # host start, ms since the run's first recorded event
    "cpu_ms": "float64",  # host time between the pre and post hooks
    "gpu_ms": "float64",  # CUDA event time; NaN without CUDA
    "offload_ms": "float64",  # host time accelerate spent loading/unloading offloaded weights in the call; NaN if none
    # host time of the module's forward hooks and pre-hooks (its own and global ones), part of
    # cpu_ms (v2); 0 for a module without hooks; NaN where hooks were not timed (attach(time_hooks=False))
    "hooks_ms": "float64",
    "mem_before_bytes": "Int64",  # CUDA allocated bytes before the call; null on CPU
    "mem_after_bytes": "Int64",
    "mem_peak_bytes": "Int64",  # CUDA allocator peak during the call; null on CPU
    "out_bytes": "int64",  # bytes of the output tensors
    # host end, ms since the run's first event, on the raw clock (cpu_ms has the probe's own
    # cost taken out; end_ms keeps the window the call really ran in, so calls nest by it)
    "end_ms": "float64",
    # the call tree, derived when frames are built (probe.tree), never in the hot path:
    "call": "Int32",  # index of the call within its step (rank, run_id, step), by start then longest first
    "parent": "Int32",  # ``call`` of the enclosing recorded call in the same step; null at the top
    # calls recorded while this one ran, as its wrapper counted them (v2): the nesting's one source
    "descendants": "Int32",
    "self_ms": "float64",  # cpu_ms minus the cpu_ms of the recorded calls directly inside it
    "gpu_self_ms": "float64",  # gpu_ms minus the gpu_ms of the recorded calls directly inside it; NaN without CUDA
}, absent_when_null=("gpu_ms", "offload_ms", "mem_before_bytes", "mem_after_bytes", "mem_peak_bytes", "gpu_self_ms"))
#: the calls columns a run leaves out where every call lacks a value (a CPU run: all of them)
CUDA_CALLS: frozenset[str] = CALLS.absent_when_null

STEPS: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "step": "int64",
    "phase": STR,
    "q_len": "int64",
    "kv_len": "int64",
    "batch": "int64",
    "start_ms": "float64",
    "forward_ms": "float64",  # host time of the root forward
    "gpu_ms": "float64",  # CUDA time of the root forward; NaN without CUDA
    "outside_ms": "float64",  # host time after this forward until the next one (or generate's end)
    "latency_ms": "float64",  # forward_ms + outside_ms: time until the step's token is chosen
    "kv_cache_bytes": "Int64",  # bytes held by the KV cache after the step
    "mem_peak_bytes": "Int64",  # CUDA peak during the step; null on CPU
    "new_tokens": "int64",  # tokens this step appended to each sequence
    "blocks_ms": "float64",  # host time inside the recorded blocks (embed+layers+norm+head)
    "probe_ms": "float64",  # the probe's own cost inside this forward (calibrated at attach)
    "process_cpu_ms": "float64",  # CPU time of the whole process during the forward (all threads)
    # forward time inside no recorded call (and not the probe's own cost): masks, glue, cache
    # updates between modules; Σ self_ms of the step's calls + residue_ms (+ probe_ms) = forward_ms.
    "residue_ms": "float64",  # NaN for a step without call records
    "gpu_residue_ms": "float64",  # the same on the CUDA clock: gpu_ms - Σ gpu_self_ms; NaN without CUDA
    # continuous batching (runs of kind "serve"); null for generate() and plain forwards
    "requests": "Int64",  # requests packed into this forward
    "prefill_tokens": "Int64",  # prompt tokens in this forward (every chunk of a prompt is prefill)
    "decode_tokens": "Int64",  # one new position per decoding request
    "prefill_chunk": "Int64",  # highest chunk index of the prompts prefilled here (0 = first chunk)
    "paged_cache_bytes": "Int64",  # paged KV cache in use after the forward (allocated blocks)
    "schedule_ms": "float64",  # before the forward: the scheduler choosing this batch
    "cache_ms": "float64",  # before the forward: paged-cache indices and batch tensors for this batch
    "sample_ms": "float64",  # after the forward: logits, processors, sampling, tokens to the host
    "update_ms": "float64",  # after the forward: request states updated, outputs delivered
    # JSON [[request_id, "prefill"|"decode", tokens, cached positions, chunk or null, sampled 0/1], ...]
    "layout": STR,
}

RUNS: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "kind": STR,  # "generate", "serve" (a continuous-batching loop) or "forward" (forwards outside generate)
    "status": STR,  # "ok" or "failed: reason"
    "model_id": STR,
    "model_class": STR,
    "model_type": STR,
    "parameters": "int64",
    "weights_source": STR,  # where the weights came from ("GGUF Q4_1, de-quantized to float32"); null if unknown
    "dtype": STR,
    "device": STR,
    "attn_implementation": STR,
    "depth": STR,
    "prompt_tokens": "Int64",  # padded prompt length (input_ids.shape[-1])
    "prompt_tokens_real": STR,  # JSON list of per-sequence prompt lengths from the attention mask
    "new_tokens": "Int64",  # generated positions per sequence (from the output tensor)
    "batch": "Int64",  # input sequences (rows per forward, batch x beams, are steps.batch)
    "steps": "int64",
    "do_sample": "boolean",
    "top_k": "Int64",
    "top_p": "float64",
    "temperature": "float64",
    "num_beams": "Int64",
    "max_new_tokens": "Int64",
    "generate_kwargs": STR,  # JSON of the resolved generation settings
    "output_ids": STR,  # JSON [[token id, ...], ...]: each returned sequence's generated tokens (v2)
    "ttft_ms": "float64",
    "tpot_ms_mean": "float64",
    "tpot_ms_p50": "float64",
    "tpot_ms_p90": "float64",
    "prefill_tok_s": "float64",
    "decode_tok_s": "float64",
    "total_ms": "float64",
    "probe_start_ms": "float64",  # the probe's own work on entering generate(), inside ttft_ms and total_ms
    "probe_end_ms": "float64",  # its work closing generate() (after the last step), inside total_ms
    "peak_mem_bytes": "Int64",  # CUDA peak during the run; null on CPU
    "kv_cache_bytes": "Int64",  # KV cache bytes after the last step
    "process_cpu_ms": "float64",  # CPU time of the whole process (all threads) during the generate call
    "cpu_wait_ms": "float64",  # time its threads were ready to run but waited for a CPU (Linux; probe.noise)
    "torch_version": STR,
    "transformers_version": STR,
    "probe_version": STR,
    "gpu_name": STR,
    "started_at": STR,  # ISO-8601 UTC wall clock
}

SAMPLING: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "step": "int64",  # the forward this sampling step follows (its outside_ms is split here)
    "phase": STR,  # that step's phase: prefill's row is the first token's sampling
    "stage": STR,  # a logits processor's class name, "dispatch", "stopping", ... or "remainder"
    "order": "int64",  # position in the step: processors in list order, dispatch, stopping, remainder last
    "host_ms": "float64",  # host time of the stage in this step; a step's rows add up to outside_ms
    "gpu_ms": "float64",  # CUDA event time of a processor or the stopping check; NaN on CPU and for remainder
    "calls": "Int64",  # times the stage ran in this step (several in assisted decoding); null for remainder
}

#: one row per request of a continuous-batching run (times in ms since the run started)
REQUESTS: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "request_id": STR,
    "status": STR,  # "ok", "failed: reason", "cancelled" or "unfinished" (the loop stopped first)
    "prompt_tokens": "int64",
    "generated_tokens": "int64",
    "max_new_tokens": "Int64",
    "arrival_ms": "float64",  # add_request() called
    "scheduled_ms": "float64",  # start of the scheduling pass that first admitted it
    "first_token_ms": "float64",  # its first token handed to the manager's update (after sampling)
    "finished_ms": "float64",  # its last token (or its failure / cancellation)
    "queue_ms": "float64",  # scheduled - arrival
    "ttft_ms": "float64",  # first token - arrival
    "itl_ms_mean": "float64",  # time between its consecutive tokens
    "itl_ms_p50": "float64",
    "itl_ms_p90": "float64",
    "e2e_ms": "float64",  # finished - arrival
    "first_step": "Int64",  # first and last step (steps.step) that held it
    "last_step": "Int64",
    "prefill_chunks": "Int64",  # forwards its prompt was spread over
    "tf_ttft_ms": "float64",  # the same TTFT from transformers' record_timestamps (NaN if not recorded)
    "tf_itl_ms_mean": "float64",  # the same mean ITL from transformers' record_timestamps
}

#: a deep run's sampled steps (probe.attach(model, deep=...)): one row per aten op as dispatched.
#: ``gpu_ms`` is absent when all null (as the CUDA columns of :data:`CALLS`): a CPU run's ops frame
#: carries it neither in memory nor on disk, and a run saved before it existed loads without it;
#: read it with :func:`column` (``column(ops, "gpu_ms", OPS)``) or :func:`floats`
OPS: Schema = Schema({
    "run_id": STR,
    "rank": "int64",
    "step": "int64",
    "phase": STR,
    "q_len": "int64",
    "kv_len": "int64",
    "seq": "int64",  # the op's position in its step
    "module": STR,  # the innermost module call running it (fully qualified; null: the model's own forward)
    "block": STR,  # the block (embed, layer, norm, head) it ran in; null outside every block
    "op": STR,  # the overload as dispatched, e.g. "aten.addmm.default"
    "in_shapes": STR,  # JSON list of the tensor arguments' shapes
    "in_dtypes": STR,  # JSON list of their dtypes
    "out_shapes": STR,
    "out_dtypes": STR,
    # host time of the op alone: torch.profiler's on a twin step without the dispatch mode where
    # matched, else the mode's clock less its call cost (meta["deep"]["op_clock"] says which)
    "host_ms": "float64",
    # CUDA: the summed duration of the device work (kernels, memcpy, memset) the op launched, on the
    # same twin step as host_ms (probe.recording.deep_twin.read_twin); 0: it launched none; null:
    # not measured (a CPU run, an op left unmatched, a step without a twin)
    "gpu_ms": "float64",
    "flops": "Int64",  # torch.utils.flop_counter's formula (or probe's for ops it lacks); null: none known
    "bytes_read_est": "Int64",  # estimated: bytes of the unique input storages the op's inputs span
    "bytes_written_est": "Int64",  # estimated: the same for its outputs
    "alloc_bytes": "int64",  # bytes of the storages this op made (outputs on no input's storage)
    # live tensor bytes after the op, from the step's start: storages made since, less those freed
    # (a storage made before the step and freed in it counts down, so this can be negative)
    "live_bytes": "int64",
    "start_ms": "float64",  # host start since the step opened (on the deep pass's slowed clock: for the trace)
}, absent_when_null=("gpu_ms",))

#: a deep run's sampled steps: one row per module call, what it held in memory (bytes of tensor storages)
LEDGER: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "step": "int64",
    "phase": STR,
    "q_len": "int64",
    "kv_len": "int64",
    "module": STR,  # fully qualified; null: the model's whole forward (the step)
    "depth": "int64",  # module calls enclosing it in this step
    "in_shapes": STR,  # JSON list of the shapes of its positional tensor arguments (keyword ones are not seen)
    "weights_bytes": "int64",  # parameters of the module and its children (tied ones once)
    "kv_cache_bytes": "int64",  # storages made in the call that the KV cache holds after the step
    "activations_bytes": "int64",  # storages made in the call, alive when it returned, not the cache's
    "temporaries_bytes": "int64",  # storages made and freed inside the call
    "peak_added_bytes": "int64",  # peak of live tensor bytes during the call above those live at its start
    "ops": "int64",  # ops run inside the call (its children's included)
    "ops_ms": "float64",  # their host time
    "flops": "Int64",  # their FLOPs (ops without a formula count 0)
    "start_ms": "float64",  # host start and end since the step opened (the deep pass's slowed clock)
    "end_ms": "float64",
}

#: a deep run's sampled steps: one row per tensor storage an op made
ALLOCATIONS: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",
    "step": "int64",
    "phase": STR,
    "seq": "int64",  # the op that made it (ops.seq)
    "op": STR,
    "module": STR,  # the module call that made it
    "bytes": "int64",  # the storage's size
    "freed": "boolean",  # freed before the step ended
    "freed_in": STR,  # the module call it was freed in; null when alive at the step's end
    "kv_cache": "boolean",  # held by the KV cache after the step
}

FRAMES: dict[str, dict[str, str]] = {"calls": CALLS, "steps": STEPS, "runs": RUNS, "sampling": SAMPLING,
                                     "requests": REQUESTS, "ops": OPS, "ledger": LEDGER, "allocations": ALLOCATIONS}


def column(df: pd.DataFrame, name: str, frame: dict[str, str] = CALLS) -> pd.Series:
    """Column ``name`` of ``df`` (a frame of schema ``frame``, ``calls`` by default); one absent
    because every value was null (see :data:`CALLS`) as all nulls at its dtype."""
    return _columns.column(df, name, frame)


def shape_text(js: object) -> str:
    """A shapes column value (JSON ``[[1,7,64]]``) as ``[1, 7, 64]``; empty for a null."""
    if js is None or js is pd.NA or (isinstance(js, float) and math.isnan(js)):
        return ""
    try:
        shapes = json.loads(str(js))
    except ValueError:
        return str(js)
    return ", ".join("[" + ", ".join(str(d) for d in s) + "]" for s in shapes) or "-"
