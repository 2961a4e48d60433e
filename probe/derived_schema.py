"""The columns of the frames computed from a run (or a sweep, or two runs) rather than recorded.

Declared beside the recorded frames (:mod:`probe.schema`, which names these too), so that every
frame the product shows or writes has one declaration of its columns, with units in the names:
summaries and the call tree, cost and roofline, apportioned time, spreads and significance, the
run-vs-run diff, the headline, the shape walkthrough and the sweeps.
"""

from __future__ import annotations

from .columns import STR, Schema

#: ``Run.summary()`` / :func:`probe.accounting.summary`: self time and shares per block, role or module and phase
SUMMARY: dict[str, str] = {
    "level": STR,  # "block", "role" or "module" (see LEVELS)
    "name": STR,  # the block, role or module; "(residue)" and "(probe)" for the forward's other parts
    "role": STR,  # the row's role ("residue" / "probe" for those rows)
    "layer": "Int64",  # decoder layer of a module row, null otherwise
    "phase": STR,
    "calls": "int64",  # recorded calls (steps for the residue and probe rows)
    "total_ms": "float64",  # inclusive host ms, each instant counted once within the row
    "self_ms": "float64",  # Σ self_ms of the row's calls: the rows of a level partition the forward
    "mean_ms": "float64",  # mean inclusive host ms per call
    "share": "float64",  # self time / the phase's forward time (on its clock); sums to 1 per level
    "gpu_total_ms": "float64",
    "gpu_self_ms": "float64",
    "mean_out_bytes": "float64",
}

#: ``Run.tree()`` / :func:`probe.accounting.tree_table`: the call tree per phase, one row per path
TREE: dict[str, str] = {
    "phase": STR,
    "node": STR,  # path of modules from the top of the step, joined by " > "
    "parent_node": STR,  # null at the top
    "module": STR,  # last module of the path ("(residue)" / "(probe)" for those rows)
    "role": STR,  # the module's role (see ROLES)
    "layer": "Int64",  # decoder layer of the module, null outside the layers
    "depth": "int64",  # 1 for the step's top-level calls
    "calls": "int64",  # recorded calls of the node (folded deeper calls not counted)
    "total_ms": "float64",  # inclusive host ms of the node's calls
    "self_ms": "float64",  # self host ms (inclusive at the collapse depth: the folded subtree)
    "mean_ms": "float64",  # total_ms / calls
    "share": "float64",  # self time over the phase's forward time, on the phase's clock
    "gpu_total_ms": "float64",  # the same two on the CUDA clock; NaN without CUDA
    "gpu_self_ms": "float64",
}

#: columns :func:`probe.cost.annotate` adds to a calls frame (estimates, see probe.cost)
COST: dict[str, str] = {
    "flops": "float64",  # estimated FLOPs of the call (a multiply-add is 2)
    "bytes_moved": "float64",  # estimated bytes read and written once from memory
    "intensity_flops_per_byte": "float64",  # flops / bytes_moved; NaN where no bytes
}

#: ``Run.roofline()`` / :func:`probe.roofline.roofline`: achieved rates and the bound per block and phase
ROOFLINE: dict[str, str] = {
    "module": STR,  # module name, role name (by="role") or "(forward)"
    "role": STR,  # the block's role; "forward" for the (forward) rows
    "layer": "Int64",  # decoder layer (by="module"), null otherwise
    "phase": STR,
    "calls": "int64",  # calls pooled in the row (steps for a (forward) row)
    "flops": "float64",  # Σ estimated FLOPs (COST)
    "bytes_moved": "float64",  # Σ estimated bytes moved (COST)
    "time_ms": "float64",  # GPU time where recorded for every call, host time otherwise
    "time_source": STR,  # "gpu" or "host"
    "host_ms": "float64",  # Σ host time of the calls (forward_ms for a (forward) row)
    "gpu_ms": "float64",  # Σ CUDA time; NaN without CUDA
    "achieved_tflop_s": "float64",  # flops / time
    "achieved_gb_s": "float64",  # bytes_moved / time
    "intensity_flops_per_byte": "float64",  # flops / bytes_moved
    "ridge_flops_per_byte": "float64",  # peak FLOP/s / peak bytes/s of the device; NaN without peaks
    "roof_tflop_s": "float64",  # attainable at this intensity: min(peak, intensity × bandwidth)
    "roof_fraction": "float64",  # achieved / roof at this intensity = max(compute, bandwidth fraction)
    "compute_fraction": "float64",  # achieved FLOP/s / peak FLOP/s
    "bandwidth_fraction": "float64",  # achieved bytes/s / peak bytes/s
    "gpu_idle_fraction": "float64",  # (forward rows) share of step GPU time outside the blocks
    "bound": STR,  # compute | memory | host | wait (CPU busy) | error (above the roof: not a bound)
    "reason": STR,  # the numbers behind the label
    "peaks": STR,  # which roofs: "measured ..." or "datasheet ..."
}

#: :func:`probe.roofline.bound_summary`: per phase, the share of block time each bound accounts for
BOUND_SUMMARY: dict[str, str] = {
    "phase": STR,
    "bound": STR,  # compute | memory | host | wait | error
    "time_ms": "float64",  # Σ time_ms of the phase's block rows with this bound
    "share": "float64",  # time_ms over the phase's bound block time; sums to 1 per phase
}

#: ``Run.apportion()`` / :func:`probe.apportion.apportion`: block time of a packed step split by token kind
APPORTION: dict[str, str] = {
    "run_id": STR,
    "step": "int64",
    "phase": STR,
    "module": STR,
    "role": STR,
    "layer": "Int64",
    "measured_ms": "float64",  # the call's time on the run's clock (cpu_ms, or gpu_ms)
    "prefill_ms": "float64",  # part attributed to the step's prefill tokens
    "decode_ms": "float64",  # part attributed to its decode tokens; prefill + decode = measured
    "prefill_share": "float64",  # prefill_ms / measured_ms
    "work_prefill": "float64",  # cost-model work of the prefill tokens (FLOPs; rows for embeddings)
    "work_decode": "float64",  # the same for the decode tokens
    "predicted_ms": "float64",  # c0 + c1·(W_p + W_d) from the pure steps' line; NaN without one
    "method": STR,  # "pure step", "fitted line" or "work share"
}

#: ``Run.spread()`` / :func:`probe.stats.block_spread`: spread over the generate calls per row and phase
SPREAD: dict[str, str] = {
    "level": STR,  # "block", "role" or "module", as in Run.summary()
    "name": STR,  # the block, role or module, or "(residue)" / "(probe)" / "(outside model)"
    "phase": STR,
    "generates": "int64",  # generate calls the spread is taken over
    "median_ms": "float64",  # median over the generate calls of the row's self time in the phase
    "min_ms": "float64",  # smallest of those
    "max_ms": "float64",  # largest of those
    "spread_pct": "float64",  # (max - min) / median, percent
}

#: ``Run.headline_spread()`` / :func:`probe.stats.headline_spread`: spread of each headline metric
HEADLINE_SPREAD: dict[str, str] = {
    "metric": STR,  # a runs column: ttft_ms, tpot_ms_p50, ...
    "generates": "int64",  # successful generate calls with a value
    "median": "float64",  # in the metric's unit
    "min": "float64",
    "max": "float64",
    "spread_pct": "float64",  # (max - min) / median, percent
}

#: :func:`probe.stats.significance`: is run B slower than run A, per metric and block
SIGNIFICANCE: dict[str, str] = {
    "level": STR,  # "metric", "block", "role" or "module"
    "name": STR,  # the metric, or the block, role or module (Run.summary()'s names)
    "phase": STR,  # empty for a headline metric
    "clock": STR,  # "host" or "gpu" (blocks), the metric's unit otherwise
    "a_n": "int64",  # samples of A (steps or generate calls)
    "b_n": "int64",  # samples of B
    "a_mean": "float64",  # mean of A's samples
    "b_mean": "float64",  # mean of B's samples
    "slowdown_pct": "float64",  # how much worse B is than A, percent (negative: B is better)
    "ci_low_pct": "float64",  # 95 % bootstrap interval of slowdown_pct
    "ci_high_pct": "float64",
    "p_value": "float64",  # two-sided Mann-Whitney U test of A's samples against B's
    "significant": "boolean",  # the interval excludes 0 and p < 0.05 (null: too few samples)
    "a_share": "float64",  # the block's share of A's forward time in the phase (blocks only)
}

#: :func:`reports.diff.block_diff`: two ``Run.summary()`` frames side by side
DIFF: dict[str, str] = {
    "level": STR,  # the summaries' level: block, role or module
    "name": STR,  # the block, role or module
    "role": STR,
    "phase": STR,
    "a_calls": "Int64",  # calls of A; null where the row is only in B
    "b_calls": "Int64",
    "a_ms": "float64",  # self host ms of A (the summary's self_ms: rows of a level never overlap)
    "b_ms": "float64",
    "diff_ms": "float64",  # b_ms - a_ms
    "ratio": "float64",  # b_ms / a_ms (NaN where A is 0 or missing)
    "a_mean_ms": "float64",  # mean inclusive host ms per call of A
    "b_mean_ms": "float64",
    "a_total_ms": "float64",  # inclusive host ms of A (the summary's total_ms)
    "b_total_ms": "float64",
    "a_share": "float64",  # share of the phase's forward time (self time)
    "b_share": "float64",
}

#: :func:`reports.tables.headline`: the headline numbers, one row per generate call (RUNS' units)
HEADLINE: dict[str, str] = {
    "run_id": STR,
    "model_id": STR,
    "status": STR,  # "ok" or "failed: reason"
    "prompt_tokens": "Int64",  # padded prompt length
    "new_tokens": "Int64",  # generated positions per sequence
    "batch": "Int64",  # input sequences
    "ttft_ms": "float64",  # entering generate() to the first new token chosen
    "tpot_ms_p50": "float64",  # time per output token over the decode steps: median
    "tpot_ms_p90": "float64",  # 90th percentile
    "tpot_ms_mean": "float64",  # mean
    "prefill_tok_s": "float64",  # batch × prompt tokens / prefill time
    "decode_tok_s": "float64",  # batch × decode steps / decode time
    "total_ms": "float64",  # the whole generate call
    "peak_mem_bytes": "Int64",  # CUDA peak; null on CPU
    "kv_cache_bytes": "Int64",  # KV cache after the last step
}

#: :func:`probe.shapes.walkthrough`: each block's shapes, parameters and cost for prefill and one decode step
WALK: dict[str, str] = {
    "phase": STR,  # "prefill" or "decode"
    "step": "int64",  # 0 for prefill, 1 for the decode step
    "module": STR,  # fully qualified module name
    "module_type": STR,  # class name
    "role": STR,  # see ROLES
    "layer": "Int64",  # decoder layer, null outside the layers
    "q_len": "int64",  # new positions per sequence
    "kv_len": "int64",  # cached positions before the step
    "batch": "int64",
    "in_shapes": STR,  # JSON list of the tensor arguments' shapes
    "out_shapes": STR,  # JSON list of the output tensors' shapes
    "dtype": STR,  # dtype of the first output tensor
    "parameters": "int64",  # parameters of the module's subtree (shared ones once)
    "weight_bytes": "int64",  # their bytes
    "flops": "float64",  # estimated FLOPs of the call (COST)
    "bytes_moved": "float64",  # estimated bytes moved (COST)
    "intensity_flops_per_byte": "float64",  # flops / bytes_moved
}

#: ``sweep.parquet`` (:func:`probe.sweep.sweep`): one row per recorded step of every config and repeat
SWEEP: dict[str, str] = {
    "prompt_len": "int64",  # the config's prompt length (tokens)
    "batch": "int64",  # the config's batch size
    "repeat": "int64",  # 0-based index of the recorded generate call within its config
    "run_id": STR,
    "step": "int64",
    "phase": STR,
    "q_len": "int64",
    "kv_len": "int64",  # cached positions before the step
    "forward_ms": "float64",  # host time of the root forward (STEPS)
    "gpu_ms": "float64",  # CUDA time of the root forward; NaN without CUDA
    "outside_ms": "float64",  # host time after the forward until the next one
    "latency_ms": "float64",  # forward + outside: time until the step's token is chosen
    "new_tokens": "int64",  # tokens the step appended to each sequence
    "kv_cache_bytes": "Int64",  # KV cache after the step
    "flops": "float64",  # estimated over the blocks (probe.cost)
    "bytes_moved": "float64",
    "ttft_ms": "float64",  # run-level columns, repeated on each of the run's steps
    "tpot_ms_mean": "float64",
    "prefill_tok_s": "float64",
    "decode_tok_s": "float64",
    "total_ms": "float64",
    "wait_pct": "float64",  # the config's busy-machine figure (probe.noise): % of step time waiting for a CPU
    "run_dir": STR,  # the config's run directory, relative to the sweep folder
}

#: ``sweep_summary.csv`` (:func:`probe.sweep.sweep_summary`): one row per (prompt length, batch)
SWEEP_SUMMARY: dict[str, str] = {
    "prompt_len": "int64",
    "batch": "int64",
    "repeats": "int64",  # recorded generate calls of the config
    "prefill_ms": "float64",  # median over repeats of the prefill step's latency
    "prefill_ms_min": "float64",  # spread over the repeats: min and max
    "prefill_ms_max": "float64",
    "decode_ms_per_token": "float64",  # median over repeats of the mean decode-step latency
    "decode_ms_per_token_min": "float64",
    "decode_ms_per_token_max": "float64",
    "ttft_ms": "float64",  # median over repeats
    "prefill_tok_s": "float64",  # median over repeats
    "decode_tok_s": "float64",  # median over repeats (batch total)
    "wait_pct": "float64",  # busy-machine figure of the config's run (warning above probe.noise.BUSY_THRESHOLD_PCT)
}

#: ``Run.op_summary()`` / :func:`probe.analysis.ops.op_summary`: the ``op`` level of a deep run's sampled steps
OP_SUMMARY: Schema = Schema({
    "phase": STR,
    "block": STR,  # the block the ops ran in ("(outside blocks)": the model's own code between blocks)
    "op": STR,  # an op kind as dispatched, or "(dispatch and Python)": the block's time less its ops'
    "steps": "int64",  # sampled steps of this phase the row averages over
    "calls": "float64",  # times the op ran in the block, per sampled step
    "host_ms": "float64",  # host time per sampled step
    # CUDA: device time per sampled step (ops.gpu_ms summed over the ops that have one); absent
    # when all null (a CPU run); NaN on the dispatch row
    "gpu_ms": "float64",
    "share": "float64",  # of the block's time (its timed time where known, else the sum of its ops)
    "flops": "float64",  # per sampled step (0 where no formula is known)
    "block_ms": "float64",  # the block's own time on timed steps of the same shapes; NaN: none recorded
}, absent_when_null=("gpu_ms",))

#: ``Run.memory_ledger()`` / :func:`probe.analysis.ops.memory_ledger`: per block and phase, bytes per sampled step
MEMORY_LEDGER: Schema = Schema({
    "phase": STR,
    "block": STR,  # a block (or "(step)": the whole forward)
    "steps": "int64",
    "weights_bytes": "float64",
    # of which parameters tied to a module outside the block (an embedding and lm_head): counted in
    # each block that holds them, once in the (step) row
    "shared_weights_bytes": "float64",
    "kv_cache_bytes": "float64",
    "activations_bytes": "float64",
    "temporaries_bytes": "float64",
    "peak_added_bytes": "float64",
    # CUDA, where the timed calls carry the allocator's counters (calls.mem_*_bytes): the block's
    # mean over timed calls of the sampled step's phase, query and cache lengths of what the
    # allocator held more after the call than before it, and its peak during the call above what
    # it held before (allocator bytes: rounded to its blocks, kernels' scratch included); absent
    # when all null (a CPU run, a deep pass alone)
    "allocator_added_bytes": "float64",
    "allocator_peak_added_bytes": "float64",
}, absent_when_null=("allocator_added_bytes", "allocator_peak_added_bytes"))

#: ``Run.flops_reconciled()`` / :func:`probe.analysis.flops_check.reconcile_flops`: a deep run's FLOPs
#: (torch's formulas, op by op) set against the cost model's, per sampled step and block or module
FLOPS_RECONCILED: dict[str, str] = {
    "run_id": STR,
    "rank": "int64",  # process rank (tensor parallel): each rank's steps are reconciled on their own
    "step": "int64",
    "phase": STR,
    "q_len": "int64",
    "kv_len": "int64",
    "module": STR,  # a block, a module at the run's recorded depth, or "(step)": the whole forward
    "role": STR,
    "deep_flops": "float64",  # the deep pass: the FLOPs of the ops run inside the call (ops without a formula: 0)
    "cost_flops": "float64",  # the cost model's total (probe.cost.annotate)
    "matrix_flops": "float64",  # of it, the matrix products: linears, routers, experts, attention's two matmuls
    "diff_flops": "float64",  # deep - matrix ((step) rows: deep - outside_flops - matrix)
    "diff_pct": "float64",  # of matrix (NaN where the cost model has no matrix products here)
    "verdict": STR,  # "equal", "differs by +x.x %", "deep only" or "not costed"
    "rest_flops": "float64",  # cost - matrix: the elementwise work torch's formulas do not count
    "bias_flops": "float64",
    "softmax_flops": "float64",
    "norm_flops": "float64",
    "activation_flops": "float64",
    "gating_flops": "float64",
    "rope_flops": "float64",
    "residual_flops": "float64",
    "outside_flops": "float64",  # ((step) rows) the deep pass's FLOPs outside every block, left out of diff
    "gap_flops": "float64",  # cost - deep (on (step) rows: of the ops inside the blocks)
    "explained_by": STR,  # the categories of the rest, largest first ("norm 1,024 + rope 768 + ...")
}

#: :func:`probe.analysis.op_compare.op_comparison`: two deep runs' ops per phase, block and op kind
OP_DIFF: dict[str, str] = {
    "phase": STR,
    "block": STR,  # as in the op summaries compared (numbered blocks folded where they were)
    "op": STR,  # an op kind, or "(dispatch and Python)"
    "a_calls": "float64",  # times it ran per sampled step in A; NaN where only B ran it
    "b_calls": "float64",
    "a_ms": "float64",  # host ms per sampled step (the deep pass's op times)
    "b_ms": "float64",
    "diff_ms": "float64",  # b_ms - a_ms
    "ratio": "float64",  # b_ms / a_ms (NaN where A is 0 or missing)
    "change": STR,  # "only in A", "only in B", "calls", "slower", "faster" or "" (see op_compare)
}
