"""The sections of ``docs/benchmarks.md``, one function per benchmark section: each turns the flat
figures (``benchmarks/results.json``) and the section's ``_meta`` into markdown lines that say how
the figure was measured and name the figure, so a reader can find it in the JSON.
"""

from __future__ import annotations

from benchmarks.config import FRAMES, HEADS, IMAGE, MASK_RATIOS, MLP, PATCH, WIDTH, rname
from benchmarks.measure import fmt


def md_peers(f: dict, meta: dict) -> list[str]:
    m = meta["peers"]
    d = m["depth"]
    L = [
        "## 1. Backbone against peers (CPU, fp32)",
        "",
        f"Forward + backward of one clip (batch 1, {FRAMES} x {IMAGE} x {IMAGE}, patch {PATCH}, tubelet 1 → "
        f"{f['peer_tokens']} patch tokens), width {WIDTH}, {HEADS} heads, MLP {MLP}, **{d} blocks**, randomly "
        "initialised; loss = mean square of the last hidden states (+ our attention-pooled embedding, so our "
        "`clip_projector` is timed too). Ours: `build_video_encoder('s14', depth=...)` (RMSNorm, QK-norm, "
        "LayerScale, attention pool: the official block); Hugging Face `VideoMAEModel` "
        "(`attn_implementation='sdpa'`) and `TimesformerModel` (divided space-time, eager attention). "
        f"{m['rounds']} rounds, {m['threads']} thread(s).",
        "",
        "| model | attention | s / clip | GFLOP / step | GFLOP/s | MFU (fp32) | peer time / ours |",
        "|---|---|---|---|---|---|---|",
        f"| ours | joint | {f['ours_joint_s_per_clip']:.2f} | {f['ours_joint_step_gflop']:.0f} | {f['ours_joint_gflops']:.1f} | {f['cpu_mfu_fp32']:.1%} | |",
        f"| VideoMAE | joint | {f['videomae_s_per_clip']:.2f} | {f['videomae_step_gflop']:.0f} | {f['videomae_gflops']:.1f} | {f['cpu_mfu_fp32_videomae']:.1%} | **{f['ratio_vs_videomae']:.3f}** |",
        f"| ours | divided | {f['ours_divided_s_per_clip']:.2f} | {f['ours_divided_step_gflop']:.0f} | {f['ours_divided_gflops']:.1f} | {f['cpu_mfu_fp32_ours_divided']:.1%} | |",
        f"| TimeSformer | divided | {f['timesformer_s_per_clip']:.2f} | {f['timesformer_step_gflop']:.0f} | {f['timesformer_gflops']:.1f} | {f['cpu_mfu_fp32_timesformer']:.1%} | **{f['ratio_vs_timesformer']:.3f}** |",
        *_compiled_rows(f),
        "",
        f"Ratio > 1: ours is faster (`ratio_vs_videomae`, `ratio_vs_timesformer`). At {FRAMES} x {IMAGE}² our divided "
        f"encoder takes {1 / f['ratio_divided_vs_joint_s14']:.2f}x the time of our joint one.",
        "",
        "## 2. The machine's limit (CPU MFU)",
        "",
        f"Three 2048³ matmuls in a row, timed in the same rounds: **{f['matmul_peak_gflops_fp32']:.0f} GFLOP/s fp32**, "
        f"{f['matmul_peak_gflops_bf16']:.0f} GFLOP/s bf16 (`matmul_peak_gflops_fp32`, `..._bf16`). MFU = FLOPs of "
        "the step / step time / the fp32 matmul rate of the same round (median over rounds). FLOPs: "
        "`torch.utils.flop_counter` for matmuls and convolutions, plus the CPU SDPA kernels counted from their "
        "shapes (4·B·H·Nq·Nk·Dh forward, 8·B·H·Nq·Nk·Dh backward: model FLOPs, without the recomputation of the "
        "scores inside the fused backward), which the counter leaves out (it counts TimeSformer's eager attention "
        "itself). "
        f"Ours (joint): **{f['cpu_mfu_fp32']:.1%}** (`cpu_mfu_fp32`); best peer "
        f"{f['cpu_mfu_fp32_best_peer']:.1%}.",
        "",
        "## 3. Masked encoding (stage 1)",
        "",
        "Our joint encoder (the sizes above) with a tube mask, forward + backward, and the whole stage-1 step "
        "(`MaskedVideoStage`, pixel targets, decoder dim 128 x 2 blocks over all tokens, norm-pixel loss, AdamW "
        "step). At r = 0 no token is masked (the loss is empty; time only).",
        "",
        "| mask ratio | visible tokens | encoder s | encoder speedup | ideal 1/(1-r) | FLOP ratio | stage-1 step s | step speedup |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | {f['peer_tokens']} | {f['masked_encoder_s_r0']:.2f} | 1 | 1 | 1 | {f['masked_step_s_r0']:.2f} | 1 |",
    ]
    for r in MASK_RATIOS[1:]:
        k = rname(r)
        vis = f["peer_tokens"] - round(r * f["peer_tokens"])
        L.append(
            f"| {k} | {vis} | {f[f'masked_encoder_s_r{k}']:.3f} | **{f[f'masked_speedup_r{k}']:.2f}x** | "
            f"{f[f'masked_ideal_r{k}']:.1f}x | {f[f'masked_flop_ratio_r{k}']:.1f}x | {f[f'masked_step_s_r{k}']:.2f} | "
            f"{f[f'masked_step_speedup_r{k}']:.2f}x |"
        )
    L += [
        "",
        "`masked_speedup_r0.75`, `masked_speedup_r0.9` (encoder), `masked_step_speedup_r...` (whole step). The "
        "encoder's FLOPs fall faster than 1/(1-r) because joint attention is quadratic in the visible tokens; "
        "the step's speedup is lower because the decoder always sees every token.",
        "",
    ]
    return L


def _compiled_rows(f: dict) -> list[str]:
    """Our encoders with each block compiled (``compile: true``), against the same eager peers."""
    if "ours_joint_compiled_s_per_clip" not in f:
        return []
    return [
        f"| ours, compiled blocks | joint | {f['ours_joint_compiled_s_per_clip']:.2f} | {f['ours_joint_step_gflop']:.0f} | "
        f"{f['ours_joint_step_gflop'] / f['ours_joint_compiled_s_per_clip']:.1f} | {f['cpu_mfu_fp32_compiled']:.1%} | "
        f"VideoMAE: **{f['ratio_vs_videomae_compiled']:.3f}** |",
        f"| ours, compiled blocks | divided | {f['ours_divided_compiled_s_per_clip']:.2f} | {f['ours_divided_step_gflop']:.0f} | "
        f"{f['ours_divided_step_gflop'] / f['ours_divided_compiled_s_per_clip']:.1f} | "
        f"{f['cpu_mfu_fp32_ours_divided_compiled']:.1%} | TimeSformer: **{f['ratio_vs_timesformer_compiled']:.3f}** |",
    ]


def md_divjoint(f: dict, meta: dict) -> list[str]:
    m = meta["divjoint"]
    L = [
        "## 4. Divided against joint attention, by frames",
        "",
        f"Our encoder at s14 width, **{m['depth']} blocks**, {m['image']}² frames ({(m['image'] // PATCH) ** 2} tokens "
        f"per frame, chosen so the crossing lies inside 8–64 frames; at 224² joint attention already costs "
        f"more at 8 frames, section 1), batch 1, forward + backward; {m['rounds']} rounds. Peak memory: RSS "
        "high-water mark of a fresh process per point (interpreter + torch + model + one step).",
        "",
        "| frames | tokens | joint s | divided s | joint / divided time | joint GFLOP | divided GFLOP | joint peak MB | divided peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        L.append(
            f"| {r['frames']} | {r['tokens']} | {r['joint_s']:.2f} | {r['divided_s']:.2f} | {r['joint_over_divided_time']:.2f} | "
            f"{fmt(r['joint_gflop'], '.0f')} | {fmt(r['divided_gflop'], '.0f')} | {fmt(r['joint_peak_mb'], '.0f')} | {fmt(r['divided_peak_mb'], '.0f')} |"
        )
    ct, cm, cf = (
        f.get("divjoint_time_cross_frames"),
        f.get("divjoint_mem_cross_frames"),
        f.get("divjoint_flop_cross_frames"),
    )
    L += [
        "",
        f"Crossings (linear interpolation between measured points): time at **{fmt(ct, '.0f', 'none in range')}** frames "
        f"(`divjoint_time_cross_frames`), FLOPs at {fmt(cf, '.0f', 'none in range')}, peak memory at "
        f"{fmt(cm, '.0f', 'none in range')} (`divjoint_mem_cross_frames`). Joint attention's FLOPs grow with the "
        "square of the tokens; with the fused SDPA kernel its memory does not (no score matrix is kept), so "
        "memory differs only by the extra temporal attention layer of the divided block.",
        "",
    ]
    return L


def md_hte(f: dict, meta: dict) -> list[str]:
    m = meta["hte"]
    geo = m["geometry"]
    fits = m["fits"]
    by = {}
    for r in m["rows"]:
        key = "hte" if r["kind"] == "hte" else ("flat_joint" if r["backend"] == "sdpa" else "flat_joint_math")
        by.setdefault(r["frames"], {})[key] = r
    L = [
        "## 5. Hierarchical temporal encoder: memory against video length",
        "",
        f"Forward + backward of one video of T frames at {geo['image']}² (patch {geo['patch']}: "
        f"{(geo['image'] // geo['patch']) ** 2} tokens per frame), `tiny` width (128, 4 blocks, joint attention). "
        f"HTE: windows of {geo['window']} frames through the encoder, 4 tokens per window, a 2-block temporal "
        "transformer. Flat: the same encoder over all T frames at once (one joint attention over T x 16 tokens), "
        "with the SDPA kernel and with the math attention (the official code without flash-attn). Peak RSS of "
        "a fresh process per point; `step` = peak minus the high-water mark before the step.",
        "",
        "| frames | HTE peak MB | flat joint (SDPA) peak MB | flat joint (math) peak MB | HTE step s | flat SDPA step s |",
        "|---|---|---|---|---|---|",
    ]
    for fr in sorted(by):
        row = by[fr]

        def g(k, key="peak_mb", spec=".0f", row=row):
            return fmt(row.get(k, {}).get(key), spec)

        L.append(
            f"| {fr} | {g('hte')} | {g('flat_joint')} | {g('flat_joint_math')} | {g('hte', 'step_s', '.2f')} | {g('flat_joint', 'step_s', '.2f')} |"
        )
    L += [
        "",
        "Linear fits of peak MB against frames:",
        "",
        "| series | MB / frame (fit) | R² | step MB / frame | step R² | MB / frame, first interval | MB / frame, last interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("hte", "flat_joint", "flat_joint_math"):
        if name in fits:
            ft = fits[name]
            L.append(
                f"| {name} | **{ft['slope_mb_per_frame']:.3f}** | {ft['r2']:.4f} | {ft['step_slope_mb_per_frame']:.3f} | "
                f"{ft['step_r2']:.4f} | {ft.get('first_interval_mb_per_frame', float('nan')):.2f} | "
                f"{ft.get('last_interval_mb_per_frame', float('nan')):.2f} |"
            )
    L += [
        "",
        "`hte_peak_mb_per_frame`, `hte_peak_r2`, `flat_joint_peak_mb_per_frame`, `flat_joint_math_peak_r2`, ... "
        "Step times are indicative only (separate processes, not interleaved). Linear growth shows as equal "
        "first- and last-interval slopes; the math series' slope grows with length (it keeps T² x 256 "
        "attention scores per head and block). The SDPA series is linear too, because the fused kernel keeps "
        "no score matrix: against it, what the HTE saves is time (quadratic in the tokens), not memory.",
        "",
    ]
    return L


def md_data(f: dict, meta: dict) -> list[str]:
    m = meta["data"]
    L = [
        "## 6. Data against model",
        "",
        "`SyntheticVideoDataModule` train loader (8 frames, no other modality), clips/s once its workers run, "
        "nothing else running in this process:",
        "",
        "| frame size | batch | workers | clips/s |",
        "|---|---|---|---|",
    ]
    for r in m["rows"]:
        L.append(f"| {r['image']}² | {r['batch']} | {r['workers']} | {r['clips_per_s']:.1f} |")
    L += [
        "",
        "What the stage-1 steps consume (fixed batch, no loader):",
        "",
        f"- tiny ({m['tiny_consumer']}): **{f['model_clips_per_s_tiny']:.1f} clips/s** "
        f"(`model_clips_per_s_tiny`); the best loader delivers {f['data_over_model_tiny']:.1f}x that (`data_over_model_tiny`).",
        f"- s14 ({m['s14_consumer']}): **{f['model_clips_per_s_s14']:.2f} clips/s** (`model_clips_per_s_s14`); "
        f"synthetic 224² clips come {f['data_over_model_s14_synthetic']:.0f}x faster.",
    ]
    if m.get("decode"):
        d = m["decode"]
        L.append(
            f"- Real files (`benchmarks/data_throughput.py`, {d['date']}: `read_clip` through a DataLoader with "
            f"{d['workers']} worker(s) over {', '.join(d['files'] or [])}, 8 frames at short side 224): "
            f"**{d['clips_per_s']:.1f} clips/s** (`decode_clips_per_s_224px_files`) = "
            f"{f['decode_over_model_s14']:.1f}x what s14 consumes (`decode_over_model_s14`) and "
            f"{f['decode_over_model_tiny']:.2f}x what tiny consumes (`decode_over_model_tiny`)."
        )
    L.append(
        f"- A tiny training loop fed by the loader (1 worker, so the worker and the step share the cores) takes "
        f"{f['loop_loader_over_cached_tiny']:.2f}x the time of the same steps on a batch already in memory "
        "(`loop_loader_over_cached_tiny`)."
    )
    if "tiny_step_threads_ratio" in f and m.get("thread_times"):
        tt = m["thread_times"]
        L.append(
            f"- Threads: the tiny step with {tt['other_threads']} thread(s) takes **{f['tiny_step_threads_ratio']:.2f}x** the "
            f"time it takes with {tt['threads']} (`tiny_step_threads_ratio`; the model side of the step, 5 steps in "
            "each of 4 fresh processes, A B A B): with other jobs on the cores, OpenMP threads wait for each other "
            "at every parallel region."
        )
    L += ["", "Verdict on this machine: " + _data_verdict(f) + ".", ""]
    return L


def _data_verdict(f: dict) -> str:
    """Whether each consumer is data-bound on this machine, in words."""

    def bound(ratio: float) -> str:
        return "**data-bound**" if ratio < 1 else "**not data-bound**"

    parts = [
        f"tiny on the synthetic clips is {bound(f['data_over_model_tiny'])} (the loader delivers "
        f"{f['data_over_model_tiny']:.1f}x what the step consumes)"
    ]
    if "decode_over_model_tiny" in f:
        parts.append(
            f"tiny on decoded files would be {bound(f['decode_over_model_tiny'])} "
            f"({f['decode_over_model_tiny']:.2f}x)"
        )
        parts.append(
            f"s14 on decoded files is {bound(f['decode_over_model_s14'])} ({f['decode_over_model_s14']:.1f}x)"
        )
    return "; ".join(parts)


def md_profile(f: dict, meta: dict) -> list[str]:
    L = ["## 7. Profile and fixes", ""]
    p = meta.get("profile")
    if p:
        L += [
            f"`torch.profiler` of one forward + backward of our joint s14 encoder ({p['depth']} blocks, "
            f"{p['threads']} thread(s)), self CPU time: SDPA kernels {f['profile_share_sdpa']:.0%}, matmuls "
            f"{f['profile_share_matmul']:.0%}, everything else {f['profile_share_other']:.0%}.",
            "",
            "| op | self ms | share | calls |",
            "|---|---|---|---|",
        ]
        L += [
            f"| `{t['op'][:70]}` | {t['self_ms']:.0f} | {t['share']:.1%} | {t['calls']} |" for t in p["top"]
        ]
        L.append("")
    L += ["Fixes (each timed against the code before it, interleaved in the same rounds):", ""]
    L.append(
        "- `models/layers.py` `RMSNorm`: torch has no fused RMSNorm kernel on the CPU; its composite one runs "
        "about a dozen full-size elementwise passes per call forward and backward (each a parallel region) and "
        "keeps two width-sized tensors per call. A hand-written autograd function (one `vector_norm` and two "
        "multiplies forward, seven passes backward; it keeps only its input, as a fused kernel does) replaces it "
        "for fp32/fp64 CPU tensors: 4 norms per block (norm1, q_norm, k_norm, norm2)."
        + (
            f" One norm, forward + backward on s14 activations ({1 + FRAMES * (IMAGE // PATCH) ** 2} x {WIDTH}), before the "
            f"fix takes **{f['rmsnorm_op_speedup']:.2f}x** the time after it (`rmsnorm_op_speedup`), "
            f"{f['rmsnorm_op_speedup_qk_slice']:.2f}x on the q/k column slices of the qkv output "
            "(`rmsnorm_op_speedup_qk_slice`; 31 interleaved repeats)."
            if "rmsnorm_op_speedup" in f
            else ""
        )
        + (
            f" The whole joint step with torch's RMSNorm takes {f['rmsnorm_fix_speedup']:.3f}x the time of the fixed "
            f"one (`rmsnorm_fix_speedup`, section-1 rounds): {_rmsnorm_saving(f, meta)}, inside the rounds' "
            "noise on one thread; the fix pays where every parallel region costs a wait (several threads on "
            "shared cores) and in memory (one saved tensor per norm instead of two)."
            if "rmsnorm_fix_speedup" in f
            else " (Whole-step before/after row: `--full` only.)"
        )
    )
    if "pixel_target_fix_speedup" in f:
        L.append(
            "- `models/heads.py` `pixel_reconstruction_loss`: the norm-pixel targets were computed for every token "
            "with a strided reduction over the channel-interleaved patch and then indexed; now the masked tokens "
            "are picked first and each (token, channel) is standardised over a contiguous row with one "
            f"`var_mean`. The tiny stage-1 step before the fix takes **{f['pixel_target_fix_speedup']:.3f}x** the time "
            f"after it (`pixel_target_fix_speedup`; step {f['tiny_stage1_step_s']:.2f} s)."
        )
    L.append("")
    return L


def _rmsnorm_saving(f: dict, meta: dict) -> str:
    ms = (meta.get("profile") or {}).get("rmsnorm_op_ms")
    depth = (meta.get("peers") or {}).get("depth")
    if not ms or not depth:
        return "the norms are a small part of the step"
    # per block: norm1 and norm2 on contiguous rows, q_norm and k_norm on column slices
    saved = (
        depth
        * 2
        * ((ms["plain_before"] - ms["plain_after"]) + (ms["slice_before"] - ms["slice_after"]))
        / 1000
    )
    return (
        f"the op-level saving, {depth} blocks x 4 norms, is {saved * 1000:.0f} ms, "
        f"{saved / f['ours_joint_s_per_clip']:.1%} of the step"
    )


def md_gpu(meta: dict) -> list[str]:
    g = meta.get("gpu") or {"status": "not run: no GPU lent"}
    L = ["## 8. GPU: l14 stage-2 MFU (bf16)", ""]
    if g.get("status") == "run":
        L += [
            f"{g['device']}: `ContrastiveStage` l14 (configs/stage2/l14.yaml sizes, no init_from), batch {g['batch']}, "
            f"bf16 autocast, activation checkpointing on: {g['step_s']:.3f} s / step, {g['step_tflop']:.1f} TFLOP model "
            f"work (counted without checkpointing) → {g['step_tflop'] / g['step_s']:.0f} TFLOP/s against a measured "
            f"bf16 matmul peak of {g['matmul_peak_tflops_bf16']:.0f} TFLOP/s: **MFU {g['mfu_bf16']:.1%}** "
            "(`gpu_mfu_bf16_l14_stage2`).",
            "",
        ]
    else:
        L += [
            "Not run by this invocation (the GPU check of `benchmarks/gpu_check.sh`, at the end of this file, "
            "has the H200 figures). `python benchmarks/run.py --gpu` runs it where CUDA is available: "
            "the l14 stage-2 step (`ContrastiveStage`, configs/stage2/l14.yaml sizes, batch 8, bf16 autocast, "
            "activation checkpointing) timed over 10 steps, FLOPs counted with `torch.utils.flop_counter` in one "
            "step without checkpointing, against an 8192³ bf16 matmul measured on the same GPU; figures "
            "`gpu_mfu_bf16_l14_stage2`, `gpu_matmul_peak_tflops_bf16`, `gpu_l14_stage2_step_s`. "
            "(`--gpu-dry-run` runs the same code path on the CPU with the tiny preset.)",
            "",
        ]
    return L
