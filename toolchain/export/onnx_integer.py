"""ONNX export of the integer-only decoder step: the graph is runtime/integer/model.decoder_step
itself, emitted through OnnxOps, so it computes the numpy reference's integers operator for operator.

I/O (ONNX Runtime GenAI / Optimum names, integer types): input_ids int64 [1, P]; cos_win, sin_win,
cos_sink, sin_sink int32 [P, head_dim] (Q14); attention_visible bool [P, L + P];
past_key_values.{i}.key/value int16 [1, n_kv, L, head_dim] -> logits int32 [1, P, vocab] (times the
manifest's logits_scale) and present.{i}.key/value int16 [1, n_kv, P, head_dim], the new slots only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, checker, helper, save_model

from pocketlm.runtime.backends.onnx import INTEGER_STEP_INPUTS, past_names, present_names
from pocketlm.runtime.integer.model import IntegerModel, decoder_step
from pocketlm.runtime.sink_cache import CacheLayout

from .onnx_ops import ONNX_DTYPE, OnnxOps

OPSET = 21  # INT4 initializers (packed int4 weights) need opset 21
STEPS = "steps"  # the dynamic step length: 1 for decode, up to the prefill chunk


def integer_graph_io(model: IntegerModel, layout: CacheLayout):
    """(ops, step input Syms, past Syms, value infos of inputs and outputs)."""
    ops, hd, length = OnnxOps(), model.head_dim, layout.physical_len
    dtypes = (np.int64, np.int32, np.int32, np.int32, np.int32, np.bool_)
    shapes = ([1, STEPS], [STEPS, hd], [STEPS, hd], [STEPS, hd], [STEPS, hd], [STEPS, f"{length} + {STEPS}"])
    step = [ops.input(n, d) for n, d in zip(INTEGER_STEP_INPUTS, dtypes)]
    infos = [helper.make_tensor_value_info(n, ONNX_DTYPE[np.dtype(d)], s) for n, d, s in zip(INTEGER_STEP_INPUTS, dtypes, shapes)]
    past = []
    names = past_names(len(model.layers))
    for i, layer in enumerate(model.layers):
        shape = [1, layer.n_kv_heads, length, hd]
        pair = []
        for name in names[2 * i: 2 * i + 2]:
            pair.append(ops.input(name, np.int16))
            infos.append(helper.make_tensor_value_info(name, TensorProto.INT16, shape))
        past.append(tuple(pair))
    return ops, step, past, infos


def export_onnx_integer(model: IntegerModel, layout: CacheLayout, path: Path) -> Path:
    """Write model.onnx (+ model.onnx.data) at path and check it with the ONNX checker."""
    ops, step, past, inputs = integer_graph_io(model, layout)
    logits, new_kv = decoder_step(ops, model, layout.sink_size, *step, past)
    outputs = [helper.make_tensor_value_info(ops.output(logits, "logits").name, TensorProto.INT32, [1, STEPS, model.vocab_size])]
    for (k, v), (k_name, v_name), layer in zip(new_kv, zip(*[iter(present_names(len(model.layers)))] * 2), model.layers):
        for t, name in ((k, k_name), (v, v_name)):
            ops.output(t, name)
            outputs.append(helper.make_tensor_value_info(name, TensorProto.INT16, [1, layer.n_kv_heads, STEPS, model.head_dim]))
    graph = helper.make_graph(ops.nodes, "pocketlm_integer_step", inputs, outputs, ops.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pocketlm")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
               location=path.name + ".data", size_threshold=1024)
    checker.check_model(str(path), full_check=True)
    return path
