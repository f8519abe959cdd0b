#!/usr/bin/env python3
"""Triton's own Python client (tritonclient[grpc]) against a framecast-inference server.

    triton_client_check.py HOST:PORT MODEL CROP

MODEL must be a `passthrough` model of crop CROP (face u8 [6,S,S] + audio f32 [32,16,16] in,
the face's first three channels out). Exercises what existing Triton users call: health,
server and model metadata, model config, infer, streaming, statistics, unload/load, and
system shared memory through tritonclient.utils.shared_memory. Exits non-zero with a message
on the first mismatch; prints one line per check.
"""
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def inputs(face, audio):
    a = grpcclient.InferInput("face", list(face.shape), "UINT8")
    a.set_data_from_numpy(face)
    b = grpcclient.InferInput("audio", list(audio.shape), "FP32")
    b.set_data_from_numpy(audio)
    return [a, b]


def main(url, model, crop):
    c = grpcclient.InferenceServerClient(url)
    check(c.is_server_live() and c.is_server_ready(), "server live and ready")
    meta = c.get_server_metadata()
    check(meta.name == "framecast-inference", f"server metadata names the server ({meta.name})")
    # framecast loads models on demand; a Triton client in explicit model control loads first.
    c.load_model(model)
    check(c.is_model_ready(model), "model ready after load_model")
    mm = c.get_model_metadata(model)
    check([i.name for i in mm.inputs] == ["face", "audio"], "model metadata inputs")
    check(list(mm.inputs[0].shape) == [-1, 6, crop, crop], "model metadata shape, batch -1")
    cfg = c.get_model_config(model).config
    check(cfg.name == model and cfg.platform == "pytorch_libtorch", "model config name, platform")
    check(cfg.max_batch_size >= 2, f"model config max_batch_size ({cfg.max_batch_size})")
    check(cfg.input[0].data_type == 2 and list(cfg.input[0].dims) == [6, crop, crop],
          "model config input TYPE_UINT8 dims")
    check(cfg.dynamic_batching.max_queue_delay_microseconds > 0, "model config dynamic batching")

    rng = np.random.default_rng(7)
    face = rng.integers(0, 256, size=(2, 6, crop, crop), dtype=np.uint8)
    audio = np.zeros((2, 32, 16, 16), dtype=np.float32)
    out = grpcclient.InferRequestedOutput("output")
    r = c.infer(model, inputs(face, audio), outputs=[out], request_id="triton-1")
    got = r.as_numpy("output")
    check(got.shape == (2, 3, crop, crop) and (got == face[:, :3]).all(), "infer: passthrough output")
    check(r.get_response().id == "triton-1", "infer: request id echoed")

    results = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    for k in range(3):
        c.async_stream_infer(model, inputs(face[k % 2: k % 2 + 1], audio[:1]), request_id=f"s{k}")
    seen = {}
    for _ in range(3):
        result, error = results.get(timeout=30)
        check(error is None, "stream: no error")
        rid = result.get_response().id
        seen[rid] = result.as_numpy("output")
    c.stop_stream()
    check(sorted(seen) == ["s0", "s1", "s2"], "stream: three answers, matched by id")
    check((seen["s1"] == face[1:2, :3]).all(), "stream: each answer is its own request's")

    stats = c.get_inference_statistics(model).model_stats[0]
    check(stats.inference_stats.success.count >= 4, f"statistics: successes ({stats.inference_stats.success.count})")
    check(stats.execution_count >= 1, "statistics: executions")

    c.unload_model(model)
    check(not c.is_model_ready(model), "unload: model no longer ready")
    c.load_model(model)
    check(c.is_model_ready(model), "load: model ready again")

    size_in = face[:1].nbytes + audio[:1].nbytes
    size_out = crop * crop * 3
    key = f"/framecast_triton_check_{np.random.default_rng().integers(1 << 30)}"
    h_in = shm.create_shared_memory_region("in", key + "_in", size_in)
    h_out = shm.create_shared_memory_region("out", key + "_out", size_out)
    try:
        shm.set_shared_memory_region(h_in, [face[:1], audio[:1]])
        c.register_system_shared_memory("in", key + "_in", size_in)
        c.register_system_shared_memory("out", key + "_out", size_out)
        status = c.get_system_shared_memory_status()
        check(sorted(r.name for r in status.regions.values()) == ["in", "out"], "shm: regions registered")
        ins = [grpcclient.InferInput("face", [1, 6, crop, crop], "UINT8"),
               grpcclient.InferInput("audio", [1, 32, 16, 16], "FP32")]
        ins[0].set_shared_memory("in", face[:1].nbytes, 0)
        ins[1].set_shared_memory("in", audio[:1].nbytes, face[:1].nbytes)
        o = grpcclient.InferRequestedOutput("output")
        o.set_shared_memory("out", size_out)
        r = c.infer(model, ins, outputs=[o])
        meta = r.get_output("output")
        got = shm.get_contents_as_numpy(h_out, np.uint8, list(meta.shape))
        check((got == face[:1, :3]).all(), "shm: output written into the client's region")
        c.unregister_system_shared_memory()
        check(len(c.get_system_shared_memory_status().regions) == 0, "shm: unregistered")
    finally:
        shm.destroy_shared_memory_region(h_in)
        shm.destroy_shared_memory_region(h_out)
    c.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
