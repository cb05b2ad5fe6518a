"""How `--quality` numbers are shown: image grids, the Markdown section, the terminal table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

COLUMNS = (
    "backend",
    "N",
    "FID vs torch",
    "KID vs torch (×1e3)",
    "IS",
    "CLIP score",
    "PSNR dB",
    "SSIM",
    "FID vs ref",
    "s / image",
)
GRID_COLUMNS = 8
COMPARE_ROWS = 8


def write_grids(sets: dict[str, np.ndarray], folder: Path, prompts: list[str]) -> dict[str, str]:
    """grid-<backend>.png (its first 64 images, 8 a row, the same prompts in the same places for every
    backend) and compare.png (the first 8 prompts as rows, one column per backend). Returns name -> path."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, images in sets.items():
        path = folder / f"grid-{name}.png"
        Image.fromarray(_tile(images[:64], GRID_COLUMNS)).save(path)
        out[name] = str(path)
    if sets:
        rows = min(COMPARE_ROWS, min(len(v) for v in sets.values()))
        side_by_side = np.stack([sets[name][i] for i in range(rows) for name in sets])
        path = folder / "compare.png"
        Image.fromarray(_tile(side_by_side, len(sets))).save(path)
        out["compare"] = str(path)
    return out


def _tile(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        canvas[y : y + h, x : x + w] = image
    return canvas


def _num(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def row_cells(b: dict[str, Any], reference: str) -> list[str]:
    q = b["quality"]
    kid = q.get("kid") or {}
    is_ = q.get("inception_score") or {}
    ref_fid = q.get("fid_vs_ref_stats") if q.get("fid_vs_ref_stats") is not None else q.get("fid_vs_ref_images")
    is_ref = b["name"] == reference
    return [
        b["name"],
        str(q["n"]),
        "ref" if is_ref else _num(q.get("fid")),
        "ref" if is_ref else (f"{kid['mean'] * 1e3:.2f} ± {kid['std'] * 1e3:.2f}" if kid else "—"),
        _num(is_.get("mean")) if is_ else "null",
        _num(q.get("clip_score")) if q.get("clip_score") is not None else "null",
        "ref" if is_ref else _num(q.get("psnr_db_mean"), 1),
        "ref" if is_ref else _num(q.get("ssim_mean"), 4),
        _num(ref_fid),
        _num(q.get("seconds_per_image"), 2),
    ]


def notes(results: dict[str, Any]) -> list[str]:
    """The lines under the quality table: N and its bias, nulls and their reasons, gate, protocol."""
    s = results["quality"]
    lines = [
        f"N = {s['n']} images per backend; prompts: {s['prompts']}; seeds: {s['seeds']}; "
        f"reference set: {s['reference']}; Inception: {s['inception_weights']}"
    ]
    if s.get("fid_bias_note"):
        lines.append(s["fid_bias_note"])
    if s.get("kid_note"):
        lines.append(s["kid_note"])
    withq = [b for b in results["backends"] if b.get("quality")]
    if withq and withq[0]["quality"].get("inception_score_note"):
        lines.append("Inception Score null: " + withq[0]["quality"]["inception_score_note"])
    if s.get("clip_note"):
        lines.append("CLIP score null: " + s["clip_note"])
    if s.get("server"):
        lines.append(server_line(s["server"]))
    g = s.get("gate") or {}
    if g.get("max_fid_delta") is not None or g.get("min_clip_score") is not None or g.get("failures"):
        lines.append("quality gate: " + ("passed" if g["passed"] else "FAILED: " + "; ".join(g["failures"])))
    p = s.get("protocol")
    if p:
        lines.append(
            f"protocol {p['name']}: "
            + ("conformant" if p["conformant"] else "not conformant: " + "; ".join(p["deviations"]))
        )
    return lines


def server_line(sv: dict[str, Any]) -> str:
    """The Server scenario in one line: where the queries went, latencies against the target."""
    if "error" in sv:
        return f"Server scenario failed: {sv['error']}"
    p50, p99 = (_num(sv.get(k)) for k in ("latency_p50_s", "latency_p99_s"))
    return (
        f"Server ({sv['transport']}, {sv.get('started_by', '?')}): {sv['completed']}/{sv['queries']} queries "
        f"answered at {sv['qps']:.3g} q/s, p50 {p50} s, p99 {p99} s vs target {sv['target_s']:g} s: "
        f"{'met' if sv['met'] else 'NOT met'}; statuses {sv.get('statuses')}; {sv.get('seeds')}; {sv.get('torch')}"
        + (f"; served images vs the Offline set: {sv['vs_offline']}" if sv.get("vs_offline") else "")
    )


def markdown(results: dict[str, Any]) -> list[str]:
    """The '## Quality' section of results.md (empty without --quality)."""
    if not results.get("quality"):
        return []
    rows = [b for b in results["backends"] if b.get("quality")]
    lines = ["## Quality", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(b, results["quality"]["reference"])) + " |" for b in rows]
    lines += [""] + [f"- {n}" for n in notes(results)]
    grids = results["quality"].get("grids") or {}
    if "compare" in grids:
        lines += ["", f"![first prompts, one column per backend](quality/{Path(grids['compare']).name})"]
    return lines + [""]


def print_table(results: dict[str, Any], console: Console) -> None:
    if not results.get("quality"):
        return
    table = Table(*COLUMNS, title="quality")
    for b in results["backends"]:
        if b.get("quality"):
            table.add_row(*(escape(c) for c in row_cells(b, results["quality"]["reference"])))
    console.print(table)
    for line in notes(results):
        console.print(escape(line), highlight=False)
