"""Pretrain the built-in `tiny-shapes` model (see trainer_core/tiny_shapes.py) and write it, with its
measured accuracy, to trainer_core/models/tiny-shapes.

    python scripts/pretrain_tiny_shapes.py [--out DIR] [--seed 0] [--vae-steps N] [--unet-steps N]

Deterministic for a given seed, step counts and torch build (CPU). Three stages:
1. the VAE (SD 1.5's KL autoencoder classes at toy widths, three blocks, 4x downsampling: 64 px ->
   16x16x4 latents) learns to reconstruct 32 px crops of shapes, patterned shapes and clutter, so
   that it also encodes pictures the diffusion model has never seen (patterns, an orange circle);
2. the text encoder stays random but fixed (as SD keeps its CLIP frozen): with a word-level
   vocabulary every caption word is one token, and the UNet learns to read those embeddings;
3. the UNet learns noise prediction (SD 1.5's DDPM schedule) on the cached latents of the captioned
   pictures, the caption dropped 10% of the time so classifier-free guidance works.
Then it generates 8 pictures per prompt and reads them back with `tiny_shapes.read_image`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer_core import components, tiny_shapes  # noqa: E402

WORDS = ["a", "photo", "of", *tiny_shapes.SHAPES, *tiny_shapes.COLOURS]
TEXT_HIDDEN = 64
UNET_CHANNELS = (32, 32, 64, 64)
# Three blocks: 4x downsampling (16x16x4 latents). SD's 8x (8x8x4 at 64 px) was tried first: after
# 2,000 steps its reconstructions still read back as the right shape 70 % and colour 82 % of the
# time (the 4x VAE: above 90 % in fewer steps), and the diffusion model cannot draw better than
# its VAE decodes.
VAE_CHANNELS = (16, 32, 32)
LATENT_SCALE = 2 ** (len(VAE_CHANNELS) - 1)


def build_tokenizer():
    """A CLIP tokenizer whose vocabulary holds the world's words whole (any other word, such as
    "sks", falls back to single characters, as a rare word does in SD's CLIP).

    Every substring of every word is in the vocabulary, and a merge joins any two adjacent
    substrings, so whatever order BPE merges in, a known word ends as one token.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in components._byte_level_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        n = len(pieces)
        for length in range(2, n + 1):
            for start in range(n - length + 1):
                whole = "".join(pieces[start : start + length])
                vocab.setdefault(whole, len(vocab))
                for cut in range(start + 1, start + length):
                    pair = ("".join(pieces[start:cut]), "".join(pieces[cut : start + length]))
                    if pair not in merges:
                        merges.append(pair)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=tiny_shapes.RESOLUTION // LATENT_SCALE,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        # SD 1.5's blocks, except that the 16x16 level has no attention (as SDXL's first level):
        # colour and shape are read at 8x8 and 4x4, and attention over 256 positions would cost
        # more than the rest of the UNet on a CPU.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=VAE_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        latent_channels=4,
        layers_per_block=1,
        # Two groups: with one channel per group every channel is normalised on its own and the
        # decoder loses the picture's colours (seen: grey reconstructions).
        norm_num_groups=2,
        sample_size=tiny_shapes.RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=TEXT_HIDDEN * 4,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=TEXT_HIDDEN,
        )
    )
    return unet, vae, text_encoder


def to_tensor(images) -> torch.Tensor:
    """PIL pictures -> (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def vae_picture(rnd: random.Random):
    """Any colour, sometimes a pattern (dots), sometimes a second shape: wider than the captioned set."""
    from PIL import ImageDraw

    colour = tuple(rnd.randint(0, 255) for _ in range(3))
    shape = rnd.choice(tiny_shapes.SHAPES)
    scene = tiny_shapes.random_scene(rnd, shape, colour, dots=shape == "circle" and rnd.random() < 0.4)
    image = tiny_shapes.draw_scene(scene)
    if rnd.random() < 0.3:
        draw = ImageDraw.Draw(image)
        x, y, r = rnd.uniform(0, 64), rnd.uniform(0, 64), rnd.uniform(3, 10)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rnd.randint(0, 255) for _ in range(3)))
    return image


# RGB -> luma and two chroma differences (BT.601). In plain RGB the colour of a shape is a small
# share of the pixel variance (brightness and outline dominate), and an autoencoder trained on RGB
# MSE learned grey shapes first: the chroma of its reconstructions was 0.02-0.05 against 0.12 in
# the pictures after 2,000 steps. Weighing chroma 3x kept it at 0.09-0.11.
_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
_YCC_WEIGHT = torch.tensor([1.0, 3.0, 3.0]).view(1, 3, 1, 1)


def colour_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + L1/2 of the difference in luma/chroma, chroma weighted 3x."""
    diff = torch.einsum("ij,bjhw->bihw", _YCC, recon - target)
    return (diff.pow(2) * _YCC_WEIGHT).mean() + 0.5 * (diff.abs() * _YCC_WEIGHT).mean()


def train_vae(vae, steps: int, seed: int, log) -> None:
    """An autoencoder (colour_loss) on random 32 px crops (4x cheaper than whole pictures; the VAE is
    convolutional, so it works on 64 px afterwards).

    The posterior's log-variance is fixed at -12 (its weights zero): the KL VAE's sampled latents
    are then its means to within 0.003, and training needs no KL term. Learning the variance with
    SD's tiny KL weight starts from unit noise on the latents and took far longer on a CPU.
    """
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent:].zero_()
        vae.quant_conv.bias[latent:].fill_(-12.0)
    rnd = random.Random(seed + 100)
    pool = to_tensor([vae_picture(rnd) for _ in range(2048)])
    gen = torch.Generator().manual_seed(seed + 101)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)  # no decay: the fixed weights stay
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(pool), (32,), generator=gen)
        ox, oy = (int(v) for v in torch.randint(0, 33, (2,), generator=gen))
        x = pool[idx, :, oy : oy + 32, ox : ox + 32]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        loss = colour_loss(recon, x)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, count: int, seed: int):
    """Latent means of `count` captioned pictures, and their captions."""
    images, captions = [], []
    for i in range(count):
        image, _, _, text = tiny_shapes.draw_example(i, seed)
        images.append(image)
        captions.append(text)
    latents = torch.cat(
        [vae.encode(to_tensor(images[i : i + 256])).latent_dist.mean for i in range(0, count, 256)]
    )
    return latents, captions


@torch.no_grad()
def embed(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(
    unet,
    latents,
    prompt_ids,
    prompt_embeds,
    scheduler,
    steps: int,
    batch: int,
    seed: int,
    log,
    on_save,
    noise_offset: float = 0.1,
    round_: int = 0,
) -> None:
    """Epsilon prediction on SD 1.5's schedule; 10% of captions dropped to "" (the last embedding).

    Offset noise (a random constant per sample and channel, std `noise_offset`, added to the noise):
    at 16x16 latents the mean of each latent channel keeps a high signal-to-noise ratio even at
    the last timestep, so a model trained on plain noise takes the starting noise's mean as the
    picture's colour and ignores the colour word (seen: after 2,500 steps shapes followed the
    prompt 91 % of the time, colours 35 %, each seed giving one colour whatever the prompt).

    Min-SNR loss weights (gamma 5, Hang et al. 2023: faster convergence) and an exponential moving
    average of the weights (decay 0.995), which is what gets saved: both make the most of the few
    thousand steps a CPU affords.
    """
    gen = torch.Generator().manual_seed(seed + 200 + 1000 * round_)  # a new batch order per round
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    alphas = scheduler.alphas_cumprod
    empty = len(prompt_embeds) - 1
    snr = alphas / (1 - alphas)
    averaged = [p.detach().clone() for p in unet.parameters()]
    unet.train()
    ema = None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z0 = latents[idx]
        ids = prompt_ids[idx].clone()
        ids[torch.rand(len(ids), generator=gen) < 0.1] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + noise_offset * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, prompt_embeds[ids]).sample
        weights = snr[t].clamp(max=5.0) / snr[t]
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for avg, p in zip(averaged, unet.parameters(), strict=True):
                avg.lerp_(p, 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {ema:.4f}")
        if on_save(step + 1, averaged):
            break
    unet.eval()


def evaluate(model_dir: Path, per_prompt: int = 8, steps: int = 20, seed: int = 0) -> dict:
    """Generate `per_prompt` pictures for every caption of the world and read them back."""
    from trainer_core.inference import make_scheduler

    parts, _ = components.load_components(str(model_dir))
    pipe = components.assemble_pipeline(parts, scheduler=make_scheduler("dpm++", parts["scheduler"].config))
    results = {}
    for shape in tiny_shapes.SHAPES:
        for colour in [None, *tiny_shapes.COLOURS]:
            prompt = tiny_shapes.caption(shape, colour)
            gen = torch.Generator().manual_seed(seed)
            images = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=4.0,
                generator=gen,
                num_images_per_prompt=per_prompt,
            ).images
            results[prompt] = tiny_shapes.accuracy(images, [shape] * per_prompt, [colour] * per_prompt)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=tiny_shapes.MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--pictures", type=int, default=3000)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="Stop after this many UNet steps (of the --unet-steps schedule).",
    )
    parser.add_argument("--save-every", type=int, default=300, help="Write the model every N UNet steps.")
    parser.add_argument("--batch", type=int, default=48, help="UNet batch size.")
    parser.add_argument("--noise-offset", type=float, default=0.1, help="Offset noise of the UNet stage.")
    parser.add_argument(
        "--unet-from",
        type=Path,
        default=None,
        help="Start the UNet from an earlier run's (averaged) weights: a second round of --unet-steps.",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="Reuse the VAE of an earlier run (same seed, same --vae-steps).",
    )
    # One thread: on a busy 2-core machine two threads spend most of their time waiting on each other.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--evaluate", action="store_true", help="Then generate and read back 8 pictures per caption."
    )
    parser.add_argument("--evaluate-only", action="store_true", help="Only evaluate the model in --out.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.evaluate_only:
        print(json.dumps(evaluate(args.out, seed=args.seed), indent=1))
        return

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    tokenizer = build_tokenizer()
    for word in WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # <start> word <end>
    unet, vae, text_encoder = build_models(tokenizer, args.seed)
    scheduler = components._training_scheduler()
    if args.vae_from:
        # The VAE of an earlier run with the same seed and --vae-steps (the VAE stage is
        # deterministic), to retrain only the UNet.
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae")
        vae.register_to_config(scaling_factor=1.0)
        log(f"VAE from {args.vae_from}")
    else:
        train_vae(vae, args.vae_steps, args.seed, log)
    latents, captions = encode_dataset(vae, args.pictures, args.seed)
    scaling = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"encoded {len(latents)} pictures; latent scaling factor {scaling:.4f}")
    prompts = sorted(set(captions)) + [""]
    prompt_ids = torch.tensor([prompts.index(c) for c in captions])
    prompt_embeds = embed(tokenizer, text_encoder, prompts)
    vae_seconds = time.time() - start

    last = min(args.unet_steps, args.stop_after or args.unet_steps)

    def save(step: int, averaged: list[torch.Tensor]) -> bool:
        """Write the model (its averaged weights) every --save-every steps and at the end; True: stop here."""
        if step % args.save_every and step != last:
            return False
        import copy

        saved = copy.deepcopy(unet).eval()
        with torch.no_grad():
            for p, avg in zip(saved.parameters(), averaged, strict=True):
                p.copy_(avg)
        parts = dict(unet=saved, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        components.save_model(parts, args.out, tiny=False)
        info = dict(
            model=tiny_shapes.MODEL_ID,
            seed=args.seed,
            vae_steps=args.vae_steps,
            noise_offset=args.noise_offset,
            unet_from=str(args.unet_from) if args.unet_from else None,
            vae_from=str(args.vae_from) if args.vae_from else None,
            unet_steps=step,
            unet_schedule_steps=args.unet_steps,
            batch=args.batch,
            pictures=args.pictures,
            seconds=round(time.time() - start),
            vae_seconds=round(vae_seconds),
            torch=torch.__version__,
            threads=args.threads,
        )
        (args.out / "dreambooth_studio.json").write_text(json.dumps(info, indent=1) + "\n")
        log(f"saved {args.out} at unet step {step}")
        return step >= last

    if args.unet_from:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.unet_from / "unet")
        log(f"UNet from {args.unet_from}")
    train_unet(
        unet,
        latents * scaling,
        prompt_ids,
        prompt_embeds,
        scheduler,
        args.unet_steps,
        args.batch,
        args.seed,
        log,
        save,
        noise_offset=args.noise_offset,
        round_=1 if args.unet_from else 0,
    )
    log("done")
    if args.evaluate:
        report = evaluate(args.out, seed=args.seed)
        (args.out / "accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
        log(f"accuracy written to {args.out / 'accuracy.json'}")


if __name__ == "__main__":
    main()
