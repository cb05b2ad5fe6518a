"""Render a results dict: a rich table, results.json, results.md, stages.png, images/<backend>.png.

Pure presentation: everything shown is already in the results dict (see benchmarks/README.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdopt.bench import control, quality_report
from sdopt.bench.stats import finite_or_none

COLUMNS = (
    "backend",
    "status",
    "e2e median s",
    "p90 / min s",
    "img/s",
    "text enc ms",
    "U-Net/step ms",
    "VAE dec ms",
    "speedup",
    "cold start s",
    "peak RSS",
    "max |Δ|",
    "PSNR dB",
)
TERMINAL_COLUMNS = (
    "backend",
    "e2e\nmedian s",
    "p90/min\ns",
    "img/s",
    "text enc\nms",
    "U-Net/\nstep ms",
    "VAE dec\nms",
    "speed-\nup",
    "cold\nstart s",
    "peak\nRSS",
    "max |Δ|",
    "PSNR\ndB",
)
STAGE_PLOT = (
    ("text_encoder", "text encoder", "#4C72B0"),
    ("controlnet", "ControlNet (all steps)", "#8172B3"),
    ("unet", "U-Net (all steps)", "#DD8452"),
    ("vae_decoder", "VAE decode", "#55A868"),
    ("other", "other", "#999999"),
)


# -- cell formatting -----------------------------------------------------------------------------
def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ms(summary: dict[str, Any] | None) -> str:
    return "—" if not summary else f"{summary['median'] * 1000:.1f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _status(b: dict[str, Any]) -> str:
    if b["status"] == "ok":
        return "ok"
    where = f" at {b['failed_at']}" if b.get("failed_at") else ""
    return f"{b['status']}{where}: {b.get('error') or 'unknown error'}"


def _parity(b: dict[str, Any]) -> tuple[str, str]:
    p = b.get("parity")
    if not p or "max_abs_diff" not in p:
        return "—", "—"
    if p.get("reference"):
        return "ref", "ref"
    psnr = p.get("psnr_db")
    return f"{p['max_abs_diff']:.2e}", ("∞" if psnr is None else f"{psnr:.1f}")


def row_cells(b: dict[str, Any]) -> list[str]:
    """One backend's row, the same for the terminal and Markdown."""
    name = b["name"] + (f" ({b['device']})" if b.get("device") else "")
    if b["status"] != "ok":
        return [name, _status(b)] + ["—"] * (len(COLUMNS) - 2)
    e2e, st = b["e2e_s"], b["stages_s"] or {}
    sp = (b.get("speedup_vs_torch") or {}).get("e2e")
    cold = (b.get("cold_start") or {}).get("total_s")
    diff, psnr = _parity(b)
    return [
        name,
        "ok",
        _num(e2e["median"]),
        f"{_num(e2e['p90'])}/{_num(e2e['min'])}",
        _num(b.get("images_per_s"), 2),
        _ms(st.get("text_encoder")),
        _ms(st.get("unet_per_step")),
        _ms(st.get("vae_decoder")),
        "—" if sp is None else f"{sp:.2f}x",
        _num(cold, 1),
        human_bytes((b.get("memory") or {}).get("peak_rss_bytes")),
        diff,
        psnr,
    ]


def headline(results: dict[str, Any]) -> str:
    job, m = results["job"], results["machine"]
    art = results.get("artifact", {})
    gpu = ", ".join(g["name"] for g in m.get("gpus") or []) or "no GPU"
    peak = (m.get("matmul_peak") or {}).get("cpu_fp32_gflops")
    flops = (results.get("unet") or {}).get("flops_per_call")
    parts = [
        f"{(art.get('source') or {}).get('id', '?')} ({art.get('family', '?')}, {art.get('precision', '?')})",
        f"{job['height']}x{job['width']}, batch {job['batch']}, {job['steps']} steps {job['scheduler']}, "
        f"CFG {job['guidance']:g}",
        f"{_plural(results['config']['runs'], 'run')} after {_plural(results['config']['warmup'], 'warm-up')}",
        f"{m['cpu']['model']}, {job['threads']} threads, {gpu}",
    ]
    if peak:
        parts.append(f"fp32 matmul peak {peak:.0f} GFLOP/s")
    if flops:
        parts.append(f"U-Net {flops / 1e9:.1f} GFLOP/call")
    return " · ".join(parts)


# -- outputs -------------------------------------------------------------------------------------
def fidelity_notes(results: dict[str, Any]) -> list[str]:
    """The fast mode's fidelity against the exact runtime, same seed and latents."""
    notes = []
    for b in results["backends"]:
        vs = (b.get("parity") or {}).get("vs_exact")
        if vs:
            notes.append(
                f"{b['name']} (DeepCache, full U-Net every {b['parity']['deepcache']} steps) vs exact "
                f"onnxruntime: max |Δ| {vs['max_abs_diff']:.3g}, PSNR {_num(vs.get('psnr_db'), 1)} dB"
            )
    return notes


def print_table(results: dict[str, Any], console: Console) -> None:
    """The terminal table: compact headers; why a backend was skipped or failed goes below it."""
    table = Table(*TERMINAL_COLUMNS, title="sdopt bench", caption=escape(headline(results)), caption_justify="left")
    notes = []
    for b in results["backends"]:
        cells = row_cells(b)
        del cells[1]
        if b["status"] != "ok":
            cells[1] = b["status"]
            notes.append(f"[{'yellow' if b['status'] == 'skipped' else 'red'}]{b['name']}[/] {escape(_status(b))}")
        style = None if b["status"] == "ok" else ("yellow" if b["status"] == "skipped" else "red")
        table.add_row(*(escape(c) for c in cells), style=style)
    console.print(table)
    cn = control.terminal_note(results)
    for note in [*notes, *map(escape, fidelity_notes(results)), *([escape(cn)] if cn else [])]:
        console.print(note, highlight=False)
    quality_report.print_table(results, console)


def markdown(results: dict[str, Any]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"# sdopt bench: {results['config'].get('name') or results['artifact'].get('source', {}).get('id', '')}",
        "",
        headline(results),
        "",
        f"`{results['command']}` — {results['created']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for b in results["backends"]:
        lines.append("| " + " | ".join(cell(c) for c in row_cells(b)) + " |")
    lines += [""] + [f"- {n}" for n in fidelity_notes(results)]
    lines += control.markdown(results)
    lines += [
        "",
        "Latencies are medians over the measured runs; stages are time inside the component calls "
        "(see benchmarks/README.md). Speedup: torch eager median / backend median, same run. Parity: "
        "max |Δ| and PSNR of the images vs torch eager on [0, 1] pixels, same initial latents.",
        "",
    ]
    lines += quality_report.markdown(results)
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    clean = finite_or_none({k: v for k, v in results.items() if not k.startswith("_")})
    path.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")


def write_png(results: dict[str, Any], path: Path) -> bool:
    """Per-stage latency bars per backend (medians). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [b for b in results["backends"] if b["status"] == "ok"]
    names = [b["name"] for b in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.6 + 0.6 * max(len(ok), 1)))
    y = list(range(len(ok)))
    start = [0.0] * len(ok)
    for key, label, color in STAGE_PLOT:
        vals = [((b["stages_s"] or {}).get(key) or {}).get("median", 0.0) for b in ok]
        left.barh(y, vals, left=start, color=color, label=label)
        start = [s + v for s, v in zip(start, vals, strict=True)]
    for i, b in enumerate(ok):
        left.text(start[i], i, f" {b['e2e_s']['median']:.3f} s", va="center", fontsize=8)
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel("seconds per image batch (median)")
    left.set_title("end to end, by stage")
    left.legend(fontsize=7, loc="lower right")
    if ok:
        left.set_xlim(0, max(start) * 1.25 or 1.0)
    width = 0.8 / max(len(ok), 1)
    groups = (("text_encoder", "text encoder"), ("unet_per_step", "U-Net / step"), ("vae_decoder", "VAE decode"))
    for i, b in enumerate(ok):
        vals = [((b["stages_s"] or {}).get(k) or {}).get("median", 0.0) * 1000 for k, _ in groups]
        right.bar([g + i * width for g in range(len(groups))], vals, width, label=b["name"])
    right.set_xticks([g + width * (len(ok) - 1) / 2 for g in range(len(groups))], [lbl for _, lbl in groups])
    right.set_ylabel("milliseconds (median)")
    right.set_title("per stage")
    if ok:
        right.legend(fontsize=7)
    others = [f"{b['name']}: {b['status']}" for b in results["backends"] if b["status"] != "ok"]
    job = results["job"]
    fig.suptitle(
        f"sdopt bench — {job['height']}x{job['width']}, {job['steps']} steps, batch {job['batch']}"
        + (f"  ({'; '.join(others)})" if others else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_images(images: dict[str, Any], folder: Path) -> None:
    """The first image of each backend's last batch, for eyeballing parity."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in images.items():
        first = np.asarray(arr)[0]
        Image.fromarray((np.clip(first, 0.0, 1.0) * 255).round().astype(np.uint8)).save(folder / f"{name}.png")


def write_all(results: dict[str, Any], out: Path, images: dict[str, Any] | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    write_png(results, out / "stages.png")
    if images:
        write_images(images, out / "images")
