"""`drivesim stack ...`: operations on the checkpoints of a stack (today: temporal layers onto another image LDM)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Build stack members from the checkpoints of others.", no_args_is_help=True)

TRANSFER_EPILOG = """\
Example (fine-tune the image LDM on your own images, reuse the temporal layers):

  drivesim stack transfer --temporal runs/stack/prediction \\
      --backbone runs/image_ldm_ft/model-ema --out runs/stack_ft/prediction

  drivesim stack transfer --temporal runs/stack/interpolation \\
      --backbone runs/image_ldm_ft/model-ema --out runs/stack_ft/interpolation

Then put the backbone at runs/stack_ft/image_ldm and the autoencoder at
runs/stack_ft/autoencoder for `drivesim rollout --ckpt-dir runs/stack_ft`.
OUT/model_card.json records both sources (path, checkpoint read, sha256).
"""


def transfer_cmd(
    temporal: Path = typer.Option(..., "--temporal", help="Donor video model (prediction or interpolation): exported "
                                                          "model folder (e.g. runs/prediction/model-ema) or training "
                                                          "run (its latest checkpoint's live weights). Its temporal "
                                                          "layers, alpha mix factors, context-mask conv and "
                                                          "stage embedding are taken."),
    backbone: Path = typer.Option(..., "--backbone", help="Image LDM whose spatial U-Net is taken (e.g. one "
                                                          "fine-tuned on your own images): exported folder or run."),
    out: Path = typer.Option(..., "--out", "-o", help="Exported model folder to write (atomically)."),
    allow_other_latents: bool = typer.Option(
        False, "--allow-other-latents",
        help="Accept a backbone trained on another autoencoder's latents than the donor (different encoder_id). "
             "Risky: the temporal layers learned to mix features of the donor's latent space; on another one they "
             "see inputs they were never trained on and may flicker or smear without any error. The result "
             "takes the backbone's latent space."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (never an input)."),
) -> None:
    """Build a video model from one model's temporal layers and another image LDM's spatial layers (Video LDM
    sec. 4.3); refuses mismatched architectures, naming the first differing field."""
    import shlex

    from drivesim.pipeline.transfer import transfer_temporal

    command = ["drivesim", "stack", "transfer", "--temporal", str(temporal), "--backbone", str(backbone),
               "--out", str(out)] + ["--allow-other-latents"] * allow_other_latents
    card = transfer_temporal(temporal, backbone, out, allow_other_latents=allow_other_latents, overwrite=overwrite,
                             command=shlex.join(command), log=lambda line: typer.echo(line, err=True))
    t, s = card["temporal_from"], card["spatial_from"]
    typer.echo(f"wrote {out}: {card['model_class']}, {card['tensors']['temporal']} temporal tensors from "
               f"{t['checkpoint']} (sha256 {t['sha256'][:12]}), {card['tensors']['spatial']} spatial tensors from "
               f"{s['checkpoint']} (sha256 {s['sha256'][:12]}); latents: {card['latents']}")


app.command("transfer", epilog=TRANSFER_EPILOG)(transfer_cmd)
