import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionModel

from one4d_train.model.image_encoder import CLIP_MEAN, CLIP_STD, CLIPImageEncoder, load_image_encoder, tiny_clip_vision
from one4d_train.model.text_encoder import (TEXT_LEN, TextConditioning, UMT5TextEncoder, apply_text_dropout,
                                            build_text_conditioning, clean_prompt, pad_text_embedding,
                                            tiny_tokenizer, tiny_umt5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("umt5")
    tiny_umt5(0).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module")
def encoder(folder):
    return UMT5TextEncoder.from_pretrained(str(folder / "model"), str(folder / "tokenizer"))


def test_zero_past_prompt_length_like_wan(encoder):
    prompts = ["a cat runs on the grass", "camera   moves  left", ""]
    emb = encoder.encode(prompts)
    assert emb.shape == (3, TEXT_LEN, 64)
    lengths = [6 + 1, 3 + 1, 1]  # words + the closing </s>
    for row, n in zip(emb, lengths):
        assert row[:n].abs().sum(-1).gt(0).all() and row[n:].eq(0).all()
    # Wan's path: encode with the mask, keep u[:seq_len], zero-pad to text_len
    tokens = encoder.tokenizer(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True,
                               return_tensors="pt")
    hidden = encoder.model(tokens.input_ids, tokens.attention_mask).last_hidden_state
    for row, u, n in zip(emb, hidden, tokens.attention_mask.sum(1).tolist()):
        assert torch.allclose(row, pad_text_embedding(u[:n]), atol=1e-6)
    assert clean_prompt(" camera &amp;\n moves ") == "camera & moves"


def test_empty_prompt_embedding_cached(encoder):
    first = encoder.empty_embedding
    assert first is encoder.empty_embedding
    assert torch.equal(first, encoder.encode([""])[0])
    assert first[0].abs().sum() > 0 and first[1:].eq(0).all()


def test_precomputed_embeddings_padded_and_truncated():
    short, long = torch.randn(5, 8), torch.randn(600, 8)
    assert torch.equal(pad_text_embedding(short)[:5], short) and pad_text_embedding(short)[5:].eq(0).all()
    assert torch.equal(pad_text_embedding(long), long[:TEXT_LEN])
    cond = TextConditioning(dim=8)
    batch = cond(["a cat", ""], [short, None])
    assert batch.shape == (2, TEXT_LEN, 8)
    assert torch.equal(batch[0], pad_text_embedding(short)) and batch[1].eq(0).all()
    empty = torch.randn(1, 8)
    assert torch.equal(TextConditioning(dim=8, empty=empty)([""], [None])[0], pad_text_embedding(empty))
    with pytest.raises(ValueError):
        cond(["x"], [torch.randn(3, 9)])


def test_conditioning_uses_encoder_for_missing_embeddings(encoder):
    cond = TextConditioning(encoder)
    pre = torch.randn(4, 64)
    batch = cond(["a dog", "the car moves right"], [pre, None])
    assert torch.equal(batch[0], pad_text_embedding(pre))
    assert torch.allclose(batch[1], encoder.encode(["the car moves right"])[0])


def test_empty_captions_reuse_the_cached_empty_prompt(encoder, monkeypatch):
    """Captions that clean to "" take the empty-prompt embedding (computed once), not another encoder pass: eval's
    benchmark samples have no captions, and a host-memory encoder would otherwise run on every one."""
    cond = TextConditioning(encoder)
    empty = encoder.empty_embedding
    calls = []
    encode, encode_rows = encoder.encode, encoder.encode_rows
    monkeypatch.setattr(encoder, "encode_rows", lambda prompts: calls.append(list(prompts)) or encode_rows(prompts))
    batch = cond(["", "  ", "a cat"], [None, None, None])
    assert calls == [["a cat"]]
    assert torch.equal(batch[0], empty) and torch.equal(batch[1], empty)
    assert torch.allclose(batch[0], encode([""])[0], atol=1e-6)


def test_batch_is_assembled_where_the_stored_embeddings_are():
    """Stored embeddings (on the training device) fix the batch's device; the empty prompt is copied there once."""
    cond = TextConditioning(dim=8)
    stored = torch.randn(5, 8, device="meta")
    batch = cond(["a", ""], [stored, None])
    assert batch.device.type == "meta" and cond.empty_on(torch.device("meta")) is cond.empty_on(torch.device("meta"))
    assert cond([""], [None]).device.type == "cpu"


def test_a_caption_without_an_embedding_or_an_encoder_is_a_config_error_naming_the_sample():
    """With no text encoder set (model.empty_prompt_embedding standing in), a captioned sample without a stored
    embedding trained as the empty prompt, silently; an empty caption is the empty prompt."""
    from one4d_train.config import ConfigError
    from one4d_train.model.config import ModelConfig
    from one4d_train.train.one4d_task import missing_text_warning

    cond = TextConditioning(dim=8, empty=torch.randn(1, 8))
    assert cond(["", "a cat"], [None, torch.randn(3, 8)]).shape == (2, TEXT_LEN, 8)
    with pytest.raises(ConfigError, match=r"key 'model.text_encoder': sample r000000004 has a caption \('a dog runs'\) "
                                          r"but no stored text embedding, and no text encoder is set"):
        cond(["a cat", "a dog runs"], [torch.randn(3, 8), None], keys=["r000000003", "r000000004"])
    stats = {"text_embeddings": {"samples": 7, "widths": [4096]}}
    offline = ModelConfig(preset="14b", text_encoder="", empty_prompt_embedding="empty.npy")
    assert missing_text_warning(offline, "/s", stats, 10).startswith("3 of the 10 samples of /s store no text")
    assert missing_text_warning(offline, "/s", stats, 7) is None
    assert missing_text_warning(ModelConfig(preset="14b", text_encoder="/umt5"), "/s", stats, 10) is None


def test_a_stored_embedding_of_another_width_is_named_by_its_sample():
    cond = TextConditioning(dim=8)
    with pytest.raises(ValueError, match="sample r000000007: its stored text embedding is 4096 wide, the backbone's "
                                         "text input 8"):
        cond(["a", "b"], [torch.zeros(5, 8), torch.zeros(5, 4096)], keys=["r000000003", "r000000007"])


def test_build_from_config_paths(folder, encoder, tmp_path):
    cond = build_text_conditioning(str(folder / "model"), str(folder / "tokenizer"), dim=64)
    assert torch.allclose(cond.empty, encoder.empty_embedding)
    with pytest.raises(ValueError):
        build_text_conditioning(str(folder / "model"), str(folder / "tokenizer"), dim=4096)
    np.save(tmp_path / "empty.npy", encoder.empty_embedding[:1].numpy().astype(np.float16))
    offline = build_text_conditioning(empty_prompt_embedding=str(tmp_path / "empty.npy"), dim=64)
    assert torch.allclose(offline.empty, encoder.empty_embedding, atol=1e-2) and offline.empty[1:].eq(0).all()
    assert build_text_conditioning(dim=16).empty.eq(0).all()


def test_text_dropout_rate_and_seed():
    n, p = 4000, 0.1
    emb = torch.randn(n, 4, 3)
    empty = torch.zeros(4, 3)
    out, dropped = apply_text_dropout(emb, p, torch.Generator().manual_seed(0), empty)
    assert abs(dropped.sum().item() - n * p) < 4 * math.sqrt(n * p * (1 - p))
    assert out[dropped].eq(0).all() and torch.equal(out[~dropped], emb[~dropped])
    again, dropped2 = apply_text_dropout(emb, p, torch.Generator().manual_seed(0), empty)
    assert torch.equal(dropped, dropped2) and torch.equal(out, again)
    assert not apply_text_dropout(emb, 0.0, None, empty)[1].any()


def test_clip_penultimate_layer_matches_transformers(tmp_path):
    tiny_clip_vision(0).save_pretrained(tmp_path / "clip")
    enc = load_image_encoder(str(tmp_path / "clip"))
    frames = torch.rand(2, 3, 40, 56) * 2 - 1
    out = enc.encode(frames)
    assert out.shape == (2, (28 // 14) ** 2 + 1, 32)
    pixels = torch.nn.functional.interpolate((frames + 1) / 2, size=(28, 28), mode="bicubic", align_corners=False)
    pixels = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    direct = CLIPVisionModel.from_pretrained(tmp_path / "clip")(pixel_values=pixels, output_hidden_states=True)
    assert torch.allclose(out, direct.hidden_states[-2], atol=1e-5)
    assert not torch.allclose(out, direct.last_hidden_state, atol=1e-3)
    tiny = load_image_encoder("", hidden=32)
    assert torch.equal(tiny.encode(frames), out) and isinstance(tiny, CLIPImageEncoder)


def test_text_encoder_device_setting():
    """`model.text_encoder_device`: auto = the training device (unless the shards store the embeddings:
    test_latents), cpu = host memory whatever the training device, device = the training device."""
    from one4d_train.model.config import ModelConfig
    from one4d_train.model.encoders import text_encoder_device
    assert text_encoder_device(ModelConfig(), torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert text_encoder_device(ModelConfig(text_encoder_device="cpu"), torch.device("cuda", 1)) == torch.device("cpu")
    assert text_encoder_device(ModelConfig(text_encoder_device="device"), torch.device("cuda", 1), True) == \
        torch.device("cuda", 1)
    assert [key for key, _ in ModelConfig(text_encoder_device="gpu").validate()] == ["text_encoder_device"]


def test_encoder_folders_missing_weights_are_refused_not_left_random(folder, tmp_path):
    """transformers initialises weights a folder lacks at random and only logs it: a UMT5 or CLIP folder missing a
    tensor (or a folder of another model) is refused naming the folder and the keys. A full checkpoint whose extra
    weights the tower does not use (the UMT5 decoder, CLIP's text tower) still loads."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPConfig, CLIPModel, UMT5Config, UMT5Model

    def without(src, dst, name, key):
        tensors = load_file(src / name)
        del tensors[key]
        dst.mkdir()
        (dst / "config.json").write_text((src / "config.json").read_text())
        save_file(tensors, dst / name, metadata={"format": "pt"})

    without(folder / "model", tmp_path / "umt5", "model.safetensors",
            "encoder.block.1.layer.1.DenseReluDense.wo.weight")
    with pytest.raises(ValueError, match=f"text encoder {tmp_path / 'umt5'}: 1 weight.* not in its files: "
                                         "encoder.block.1.layer.1.DenseReluDense.wo.weight .they would be left at random"):
        UMT5TextEncoder.from_pretrained(str(tmp_path / "umt5"), str(folder / "tokenizer"))
    weights = tmp_path / "umt5" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    with pytest.raises(ValueError, match=f"text encoder {tmp_path / 'umt5'}: cannot be loaded .*incomplete metadata"):
        UMT5TextEncoder.from_pretrained(str(tmp_path / "umt5"), str(folder / "tokenizer"))
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path}: no UMT5 tokenizer there"):
        UMT5TextEncoder.from_pretrained(str(folder / "model"), str(tmp_path))
    tiny_clip_vision(0).save_pretrained(tmp_path / "clip")
    without(tmp_path / "clip", tmp_path / "clip_part", "model.safetensors", "post_layernorm.bias")
    with pytest.raises(ValueError, match=f"image encoder {tmp_path / 'clip_part'}: 1 weight.*post_layernorm.bias"):
        load_image_encoder(str(tmp_path / "clip_part"))
    with pytest.raises(ValueError, match=f"image encoder {folder / 'model'}: .* weight"):  # the UMT5 folder
        load_image_encoder(str(folder / "model"))
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(tmp_path / "full")
    assert load_image_encoder(str(tmp_path / "full")).model.config.hidden_size == 32
    UMT5Model(UMT5Config(vocab_size=64, d_model=64, d_kv=8, d_ff=128, num_layers=1, num_heads=4,
                         relative_attention_num_buckets=8)).save_pretrained(tmp_path / "t5")
    assert UMT5TextEncoder.from_pretrained(str(tmp_path / "t5"), str(folder / "tokenizer")).dim == 64
