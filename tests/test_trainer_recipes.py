"""docs/LATENTS.md's recipes for kohya, SimpleTuner and diffusers' training scripts, run as written on a tiny
dataset, each feeding what it builds to a tiny model of the script's kind (issue 25)."""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from test_latents import encode, photo, save_model

from vaekit import LatentDataset

DOC = Path(__file__).parents[1] / "docs" / "LATENTS.md"


def recipe(name: str) -> str:
    blocks = dict(re.findall(r"```python (recipe-[\w-]+)\n(.*?)```", DOC.read_text(), re.S))
    return blocks[f"recipe-{name}"]


def captioned(tmp_path: Path, *options: str) -> Path:
    """Captioned photos of several shapes encoded (32 px, factor 4) with `options`: the latent dataset."""
    root = tmp_path / "photos"
    root.mkdir()
    for i, (h, w) in enumerate([(32, 32), (40, 24), (24, 40), (32, 48), (36, 36), (48, 32)]):
        Image.fromarray(photo(h, w, i)).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"photo number {i}")
    model = save_model(tmp_path / "vae", scaling_factor=0.13025)
    encode(model, root, tmp_path / "latents", "--resolution", "32", *options)
    return tmp_path / "latents"


class Tokenizer:
    """A stand-in for CLIPTokenizer: ids from the words' hashes, padded to model_max_length."""

    model_max_length = 8

    def __call__(self, texts, max_length, padding, truncation, return_tensors):
        ids = [[hash(w) % 100 for w in t.split()][:max_length] for t in texts]
        return SimpleNamespace(input_ids=torch.tensor([row + [0] * (max_length - len(row)) for row in ids]))


def common(latents_dir: Path) -> dict:
    args = SimpleNamespace(train_batch_size=2, dataloader_num_workers=2, num_train_epochs=2, seed=0, proportion_empty_prompts=0.0)
    return {"latents_dir": str(latents_dir), "args": args, "first_epoch": 0, "weight_dtype": torch.float32,
            "accelerator": SimpleNamespace(device=torch.device("cpu"))}  # fmt: skip


def tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, **extra,
    ).eval()  # fmt: skip


def test_sd1_recipe_feeds_captions_and_latents_to_a_unet(tmp_path):
    latents_dir = captioned(tmp_path)  # as the recipe says: one resolution, centre crops
    embed = torch.nn.Embedding(100, 16)
    ns = {**common(latents_dir), "tokenizer": Tokenizer(), "text_encoder": lambda ids, return_dict: (embed(ids),)}
    exec(recipe("sd1"), ns)
    data = LatentDataset(latents_dir)
    batch, latents = ns["batch"], ns["latents"]
    assert latents.shape[0] == 2 and latents.shape[1] == 4 and batch["input_ids"].shape == (2, 8)
    assert ns["train_dataset"].epoch == 1  # set_epoch reached the last epoch
    with torch.no_grad():
        out = tiny_unet()(latents, torch.tensor([10, 500]), ns["encoder_hidden_states"]).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # The captions that went in are the items' own: the tokens of "photo number i".
    words = {i: Tokenizer()([item["caption"]], 8, "max_length", True, "pt").input_ids[0] for i, item in enumerate(data.items)}
    assert all(any(torch.equal(row, w) for w in words.values()) for row in batch["input_ids"])


def test_sdxl_recipe_gives_the_unet_its_time_ids_per_item(tmp_path):
    latents_dir = captioned(tmp_path, "--buckets", "--flip")
    pooled = torch.nn.Embedding(100, 8)

    def encode_prompt(batch, text_encoders, tokenizers, proportion_empty_prompts, caption_column):
        ids = Tokenizer()(batch[caption_column], 8, "max_length", True, "pt").input_ids
        return torch.randn(len(ids), 8, 16), pooled(ids).mean(1)

    ns = {**common(latents_dir), "encode_prompt": encode_prompt, "text_encoders": None, "tokenizers": None}
    exec(recipe("sdxl"), ns)
    batch, time_ids, model_input = ns["batch"], ns["add_time_ids"], ns["model_input"]
    data = LatentDataset(latents_dir)
    # Every row is (original h, w, crop top, left, target h, w) of the item it came with, its bucket the latent's size.
    assert time_ids.shape == (len(model_input), 6)
    for row, source, flipped in zip(time_ids.long().tolist(), batch["source"], batch["flipped"].tolist()):
        item = next(i for i in data.items if i["source"] == source and i["flipped"] == flipped)
        assert row == item["original_size"] + item["crop_coords_top_left"] + item["target_size"]
        assert [4 * s for s in model_input.shape[-2:]] == item["target_size"]  # factor 4
    unet = tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    with torch.no_grad():
        out = unet(model_input, torch.tensor([10] * len(model_input)), ns["prompt_embeds"],
                   added_cond_kwargs=ns["unet_added_conditions"]).sample  # fmt: skip
    assert out.shape == model_input.shape and torch.isfinite(out).all()


def test_flux_recipe_packs_for_the_transformer_and_unpacks_back(tmp_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    root = tmp_path / "photos"
    root.mkdir()
    for i, (h, w) in enumerate([(32, 32), (40, 24), (24, 40), (36, 36)]):
        Image.fromarray(photo(h, w, i)).save(root / f"p{i}.png")
    model = save_model(tmp_path / "ae", scaling_factor=0.3611, shift_factor=0.1159)
    encode(model, root, tmp_path / "latents", "--resolution", "32")  # 8x8 latents: even sides
    ns = common(tmp_path / "latents")
    exec(recipe("flux"), ns)
    b, c, h, w = ns["model_input"].shape
    packed, ids = ns["packed_noisy_model_input"], ns["latent_image_ids"]
    assert packed.shape == (b, h // 2 * w // 2, 4 * c) and ids.shape == (h // 2 * w // 2, 3)
    assert torch.equal(FluxPipeline._unpack_latents(packed, h * 4, w * 4, 4), ns["noisy_model_input"])  # factor 4
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * c, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                         axes_dims_rope=(4, 6, 6)).eval()  # fmt: skip
    with torch.no_grad():
        pred = transformer(hidden_states=packed, encoder_hidden_states=torch.randn(b, 5, 16), pooled_projections=torch.randn(b, 8),
                           timestep=torch.full((b,), 0.5), img_ids=ids, txt_ids=torch.zeros(5, 3), return_dict=False)[0]  # fmt: skip
    target = ns["noise"] - ns["model_input"]
    assert FluxPipeline._unpack_latents(pred, h * 4, w * 4, 4).shape == target.shape


def test_kohya_recipe_writes_the_cache_files_kohya_reads(tmp_path):
    root = tmp_path / "train_images"
    root.mkdir()
    for i, (h, w) in enumerate([(32, 32), (40, 24), (24, 40)]):
        Image.fromarray(photo(h, w, i)).save(root / f"p{i}.png")
    (root / "p2_0040x0024_sdxl.npz").write_bytes(b"the user's own file")
    model = save_model(tmp_path / "vae", scaling_factor=0.13025)
    encode(model, root, tmp_path / "latents", "--resolution", "32", "--flip")
    ns = {**common(tmp_path / "latents"), "train_data_dir": str(root)}
    exec(recipe("kohya"), ns)
    data = LatentDataset(tmp_path / "latents")
    for i in (0, 1):
        # kohya's strategy_sd.py: os.path.splitext(absolute_path)[0] + f"_{image_size[0]:04d}x{image_size[1]:04d}" + "_sdxl.npz",
        # image_size = (W, H) of the file; its loader reads these keys.
        path = str(root / f"p{i}.png")
        w, h = Image.open(path).size
        npz = np.load(path[: -len(".png")] + f"_{w:04d}x{h:04d}_sdxl.npz")
        j = [k for k, item in enumerate(data.items) if item["source"] == f"p{i}.png" and not item["flipped"]][0]
        assert npz["latents"].shape == (4, 8, 8) and npz["latents"].dtype == np.float32
        assert np.allclose(npz["latents"] * 0.13025, data[j]["latent"].numpy(), atol=1e-6)  # kohya scales them itself
        assert np.allclose(npz["latents_flipped"] * 0.13025, data[j + 1]["latent"].numpy(), atol=1e-6)
        assert npz["original_size"].tolist() == [w, h] and npz["crop_ltrb"].tolist()[2:] == [npz["crop_ltrb"][0] + 32, npz["crop_ltrb"][1] + 32]
    assert (root / "p2_0040x0024_sdxl.npz").read_bytes() == b"the user's own file"  # never over a file


def test_simpletuner_recipe_writes_normalised_latents_where_it_looks(tmp_path):
    root = tmp_path / "instance_data"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photo(32, 40, 1)).save(root / "a.png")
    Image.fromarray(photo(40, 32, 2)).save(root / "sub" / "b.png")
    model = save_model(tmp_path / "vae", scaling_factor=0.13025)
    encode(model, root, tmp_path / "latents", "--resolution", "32")
    ns = {**common(tmp_path / "latents"), "cache_dir_vae": str(tmp_path / "cache")}
    exec(recipe("simpletuner"), ns)
    data = LatentDataset(tmp_path / "latents")
    for i, name in enumerate(["a", "sub/b"]):
        cached = torch.load(tmp_path / "cache" / f"{name}.pt")
        assert torch.equal(cached, data[i]["latent"]) and cached.shape == (4, 8, 8)
