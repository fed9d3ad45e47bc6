"""Per-GPU memory and expected throughput of Knowledge-CLIP training with a ZeRO-3 Llama teacher (7B/13B/70B) and a
ViT-B/16 CLIP student on 1/2/4/8 nodes of 8 GPUs, with and without CPU parameter offload. Arithmetic, not a
measurement: every input is printed and stored, and measured figures replace assumptions where they exist.

    python benchmarks/scaling_table.py      # -> benchmarks/results/scaling_table.json (+ a markdown table)

Teacher placements (modes), each a teacher config: ZeRO-3 over all W GPUs (`teacher.shard_within: world`, the
default) or within each node (`node`: G = 8 GPUs hold one copy, so the per-forward all-gather stays on NVLink), each
with and without CPU parameter offload (`teacher.offload: cpu`).
Memory per GPU (bf16 = 2 bytes per parameter), G = GPUs sharing one teacher copy (W, or 8 per node):
    teacher shard       2 P / G                        (0 with offload: the shard lives in pinned host memory, 8 x
                                                       2 P / G per node: 2 P / nodes over the world, 2 P within nodes)
    teacher gathered    2 x (largest gathered tensor + stage3_prefetch_bucket_size), the bucket = int(0.9 h^2) as
                        kclip.teacher.load.teacher_ds_config sets it; DeepSpeed's stage3_max_live_parameters (1e9)
                        bounds it at 2 GB
    teacher activations chunk x max_len tokens x (6 h + 3 i) x 2 bytes (one layer's hidden, q/k/v/o, MLP; no grad)
    student             ZeRO-2 (as kclip/configs/cc3m-llama2-7b-vitb16.yaml): bf16 params whole on every rank, bf16
                        grads + 12 bytes/param of fp32 master and Adam states divided by W, plus activations of
                        the local batch (Megatron's estimate per layer and sample: s h (34 + 5 a s / h) bytes)
Time per optimizer step (per GPU, all ranks in lockstep):
    teacher forward     max(compute, communication) per forward (ZeRO-3 prefetch overlaps them), x forwards per step;
                        forwards = local batch x tokens per caption / (chunk x max_len): packed rows of max_len tokens
                        compute = 2 P x tokens / (peak x MFU_teacher); tokens = local batch x tokens per caption
                        communication = all-gather of the whole teacher, 2 P (G-1)/G bytes / bus bandwidth (NVLink
                        when the G GPUs are one node's, else the per-GPU network share across nodes) [+ 2 P / G bytes
                        host->device with offload]
    student             6 x FLOPs-params x tokens / (peak x MFU_student) + gradient reduce-scatter and parameter
                        all-gather of 2 x 2 P_s (W-1)/W bytes (not overlapped: an upper bound)
Cold = every caption goes through the teacher (first epoch); warm = all hits in the teacher cache (later epochs).
"""
from __future__ import annotations

import argparse
import json
import math

from common import RESULTS, machine, print_table, write_json

TEACHERS = {
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
ASSUMED = {
    "gpu": "H100/H200 SXM, 8 per node",
    "gpu_memory_gib": 80,  # H100 80 GB (H200: 141 GB)
    "peak_tflops_bf16": 989.0,
    "mfu_teacher": 0.40,  # large-batch inference forward
    # Calibrated, not guessed: open_clip's ViT-B/16 runs ~320 samples/s per A100 (312 TFLOP/s bf16) at ~120 GFLOP
    # per sample by the formula below, i.e. ~12% MFU (shared/notes/data-and-models.md).
    "mfu_student": 0.12,
    "nvlink_busbw_gbs": 360.0,  # NCCL all-gather bus bandwidth inside an NVSwitch node
    "network_busbw_gbs": 45.0,  # per GPU across nodes: one 400 Gb/s NIC per GPU
    "h2d_gbs": 25.0,  # pinned host -> device per GPU (PCIe Gen5 x16, shared host memory)
    "tokens_per_caption": 15.0,  # CC3M mean in Llama tokens (shared/notes/data-and-models.md)
    "image_tokens": 197,  # ViT-B/16 at 224 px
    "text_tokens": 77,
}


def teacher_shape(name: str) -> dict:
    """Parameter count (meta device: no memory) and the sizes ZeRO-3 gathers."""
    import torch
    from transformers import AutoModel, LlamaConfig

    config = LlamaConfig(**TEACHERS[name])
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    h = config.hidden_size
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": h, "intermediate": config.intermediate_size, "layers": config.num_hidden_layers,
        "largest_tensor": max(p.numel() for p in model.parameters()),
        "layer_params": sum(p.numel() for p in model.layers[0].parameters()),
        "config": config,
    }


def student_shape() -> dict:
    """ViT-B/16 + 12-layer 512-wide text tower (kclip's student defaults), parameters counted on the meta device."""
    import torch

    from kclip.config import Config
    from kclip.models.knowledge_clip import KnowledgeCLIP
    from kclip.tokenizers import student_tokenizer

    cfg = Config()
    with torch.device("meta"):
        model = KnowledgeCLIP(cfg, student_tokenizer(cfg), 4096)
    vit = model.student.visual
    return {"params": sum(p.numel() for p in model.parameters()), "visual": sum(p.numel() for p in vit.parameters()),
            "vit": {"width": vit.embed_dim, "heads": vit.blocks[0].attn.num_heads, "layers": len(vit.blocks)},
            "cfg": cfg.student}


def activation_bytes_per_sample(s: int, h: int, a: int, layers: int) -> float:
    """Megatron-LM's estimate of training activations for one sample, bf16: layers x s h (34 + 5 a s / h) bytes."""
    return layers * s * h * (34 + 5 * a * s / h)


def measured_figures() -> dict:
    """Figures measured by the other benchmarks, when their results exist."""
    out = {}
    gpu = RESULTS / "gpu_throughput.json"
    if gpu.is_file():
        g = json.loads(gpu.read_text())
        if not g.get("dry_run"):
            out["mfu_teacher"] = g["teacher"]["mfu"]
            out["mfu_student"] = g["student"]["mfu"]
            out["source_gpu"] = f"gpu_throughput.json ({g['device']})"
    teacher = RESULTS / "teacher_throughput.json"
    if teacher.is_file():
        t = json.loads(teacher.read_text())
        out["computed_per_real_token"] = t["modes"]["packed"]["computed_per_real"]
    return out


GPUS_PER_NODE = 8
# mode -> (the teacher config keys it sets, what it is)
MODES = {
    "zero3": ({}, "ZeRO-3 over all GPUs (teacher.shard_within=world, the default)"),
    "zero3+cpu": ({"offload": "cpu"},
                  "ZeRO-3 over all GPUs, parameters offloaded to host memory (teacher.offload=cpu)"),
    "zero3-node": ({"shard_within": "node"}, "ZeRO-3 within each node: a copy per node (teacher.shard_within=node)"),
    "zero3-node+cpu": ({"shard_within": "node", "offload": "cpu"},
                       "ZeRO-3 within each node, parameters offloaded to host memory: a whole copy per node's host"),
}


def row(name: str, t: dict, st: dict, nodes: int, mode: str, global_batch: int, chunk: int, max_len: int,
        a: dict) -> dict:
    from kclip.config import TeacherConfig
    from kclip.teacher.load import shard_ranks, teacher_ds_config

    teacher_cfg = TeacherConfig(chunk_size=chunk, **MODES[mode][0])
    offload = teacher_cfg.offload == "cpu"
    world = GPUS_PER_NODE * nodes
    group = shard_ranks(teacher_cfg, world, GPUS_PER_NODE)  # the GPUs one teacher copy is sharded over
    local = global_batch // world
    ds = teacher_ds_config(teacher_cfg, t["config"], _bf16())
    bucket = ds["zero_optimization"]["stage3_prefetch_bucket_size"]
    gib = 2**30
    share = 2 * t["params"] / group  # one GPU's partition of the teacher
    shard = 0 if offload else share  # with offload it lives in pinned host memory
    gathered = min(2 * (t["largest_tensor"] + bucket), 2 * 1e9)
    act_teacher = min(chunk, local) * max_len * (6 * t["hidden"] + 3 * t["intermediate"]) * 2
    s_cfg = st["cfg"]
    vit = st["vit"]
    per_sample = (activation_bytes_per_sample(a["image_tokens"], vit["width"], vit["heads"], vit["layers"])
                  + activation_bytes_per_sample(a["text_tokens"], s_cfg.text_width, s_cfg.text_heads, s_cfg.text_layers))
    # ZeRO-2 (the cc3m config): bf16 params whole, bf16 gradients and fp32 master + Adam states partitioned.
    student_mem = 2 * st["params"] + (2 + 12) * st["params"] / world + local * per_sample
    host_per_node = GPUS_PER_NODE * share if offload else 0

    peak = a["peak_tflops_bf16"] * 1e12
    tokens_per_caption = a["tokens_per_caption"] * a["computed_per_real_token"]
    # Packed (the default): rows of max_len tokens, `chunk` rows per forward, so one forward holds many captions.
    forwards = math.ceil(local * tokens_per_caption / (chunk * max_len))
    busbw = (a["nvlink_busbw_gbs"] if nodes == 1 else a["network_busbw_gbs"]) * 1e9
    teacher_busbw = (a["nvlink_busbw_gbs"] if group <= GPUS_PER_NODE else a["network_busbw_gbs"]) * 1e9
    compute = 2 * t["params"] * (local / forwards) * tokens_per_caption / (peak * a["mfu_teacher"])
    comm = share * (group - 1) / teacher_busbw + (share / (a["h2d_gbs"] * 1e9) if offload else 0)
    teacher_s = forwards * max(compute, comm)
    student_flops = 6 * (st["visual"] * a["image_tokens"] + (st["params"] - st["visual"]) * a["text_tokens"])
    student_s = local * student_flops / (peak * a["mfu_student"]) + 4 * st["params"] * (world - 1) / world / busbw
    return {
        "teacher": name, "mode": mode, "nodes": nodes, "gpus": world, "local_batch": local,
        "prefetch_bucket": bucket,
        "mem_gib": {"teacher_shard": shard / gib, "teacher_gathered": gathered / gib,
                    "teacher_activations": act_teacher / gib, "student": student_mem / gib,
                    "total": (shard + gathered + act_teacher + student_mem) / gib},
        "fits": (shard + gathered + act_teacher + student_mem) / gib <= a["gpu_memory_gib"],
        "host_gib_per_node": host_per_node / gib,
        "teacher_forward": {"forwards": forwards, "compute_s": compute, "comm_s": comm,
                            "bound": "communication" if comm > compute else "compute"},
        "step_s": {"teacher": teacher_s, "student": student_s},
        "samples_per_s": {"cold": global_batch / (teacher_s + student_s), "warm": global_batch / student_s},
    }


def _bf16():
    import torch

    return torch.bfloat16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--global-batch", type=int, default=4096, help="as kclip/configs/cc3m-llama2-7b-vitb16.yaml")
    p.add_argument("--chunk", type=int, default=256, help="teacher.chunk_size")
    p.add_argument("--max-len", type=int, default=77)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", default=str(RESULTS / "scaling_table.json"))
    args = p.parse_args()

    measured = measured_figures()
    a = dict(ASSUMED, computed_per_real_token=1.0)
    a.update({k: v for k, v in measured.items() if k in a and v is not None})
    student = student_shape()
    shapes = {name: teacher_shape(name) for name in TEACHERS}
    rows = [row(name, shapes[name], student, nodes, mode, args.global_batch, args.chunk, args.max_len, a)
            for name in TEACHERS for mode in MODES for nodes in args.nodes]

    print(f"global batch {args.global_batch}, teacher chunk {args.chunk}, max_len {args.max_len}; student "
          f"{student['params'] / 1e6:.0f}M params; teachers "
          + ", ".join(f"{n} {s['params'] / 1e9:.2f}B" for n, s in shapes.items()))
    text = print_table(
        ["teacher", "mode", "nodes", "local b", "shard GiB", "gathered GiB", "act GiB", "student GiB", "total GiB",
         "host GiB/node", "fwd bound", "cold samples/s", "warm samples/s"],
        [[r["teacher"], r["mode"], r["nodes"], r["local_batch"], r["mem_gib"]["teacher_shard"],
          r["mem_gib"]["teacher_gathered"], r["mem_gib"]["teacher_activations"], r["mem_gib"]["student"],
          r["mem_gib"]["total"], r["host_gib_per_node"], r["teacher_forward"]["bound"], round(r["samples_per_s"]["cold"]),
          round(r["samples_per_s"]["warm"])] for r in rows])
    modes = {mode: what for mode, (_, what) in MODES.items()}
    print("modes:", json.dumps(modes))
    print("assumptions:", json.dumps(a))
    write_json(args.json, {
        "benchmark": "scaling_table", "machine": machine(), "args": {k: v for k, v in vars(args).items() if k != "json"},
        "assumptions": a, "measured": measured, "modes": modes,
        "teachers": {n: {k: v for k, v in s.items() if k != "config"} for n, s in shapes.items()},
        "student": {k: v for k, v in student.items() if k != "cfg"}, "rows": rows, "markdown": text,
    })


if __name__ == "__main__":
    main()
