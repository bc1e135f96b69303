"""
VisionTrimLlavaForConditionalGeneration loaded from a saved folder with `trust_remote_code=True`: the tokens it
keeps (checked against the slow reference on eager attention maps), parity with stock LLaVA when compression is off,
batching, generation paths, dtypes and errors.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration

from visiontrim import VisionTrimLlavaForConditionalGeneration
from visiontrim.tools.build import (
    build_config,
    build_guidance_tokenizer,
    build_processor,
    stock_llava_with_same_weights,
    stock_processor,
)

from helpers import OTHER_PROMPT, QUESTION_PROMPT, load_remote, save_checkpoint
from reference import slow_global_local_scores, slow_received_attention_scores, slow_tgvc


def image_output(model, inputs):
    """The model's image encoding (VisionTrimEncoderOutput) for processor `inputs`."""
    return model.model.get_image_features(
        inputs["pixel_values"],
        guidance_input_ids=inputs.get("guidance_input_ids"),
        guidance_attention_mask=inputs.get("guidance_attention_mask"),
    )


def reference_image_tokens(model, inputs, image: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """
    One image's projected tokens, DVTS indices and TGVC seed indices, recomputed with the slow reference from the
    eager tower's `attentions` / `hidden_states` and the guidance row run alone (no padding).
    """
    config, inner = model.config, model.model
    tower = inner.vision_tower(
        inputs["pixel_values"][image : image + 1], output_attentions=True, output_hidden_states=True
    )
    hidden = tower.hidden_states[config.vision_feature_layer][0]
    attention = tower.attentions[config.vision_feature_layer][0].mean(dim=0)
    patches = hidden[1:]
    if config.dvts_score == "global_local":
        scores = slow_global_local_scores(patches, attention, 24)
    else:
        scores = slow_received_attention_scores(attention)
    dominant = sorted(torch.sort(scores, descending=True, stable=True).indices[: config.dominant_tokens].tolist())
    remaining = [index for index in range(576) if index not in dominant]
    valid = inputs["guidance_attention_mask"][image].bool()
    text_ids = inputs["guidance_input_ids"][image][valid].unsqueeze(0)
    text_hidden = inner.guidance_encoder.text_model(input_ids=text_ids).last_hidden_state
    text = F.normalize(inner.guidance_encoder.text_projection(text_hidden)[0], dim=-1)
    seeds, seed_positions = slow_tgvc(
        patches[remaining], text, inner.visual_projection, inner.logit_scale.exp(), config.complement_tokens, 3
    )
    tokens = inner.multi_modal_projector(torch.cat([patches[dominant], seeds]))
    return tokens, dominant, [remaining[position] for position in seed_positions]


@pytest.mark.parametrize("score", ["global_local", "received_attention"])
def test_kept_tokens_match_the_slow_reference_on_eager_attention(checkpoint, photos, score):
    model, processor = load_remote(checkpoint, attn_implementation="eager", dvts_score=score)
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's copy of the code
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    output = image_output(model, inputs)
    for image in range(2):
        tokens, dominant, seeds = reference_image_tokens(model, inputs, image)
        assert output.dominant_indices[image].tolist() == dominant
        assert output.complement_seed_indices[image].tolist() == seeds
        torch.testing.assert_close(output.pooler_output[image], tokens, rtol=1e-4, atol=1e-5)


def test_llm_sees_the_budget_and_processor_and_model_agree(checkpoint, photos):
    for tokens in (192, 128, 64):
        model, processor = load_remote(checkpoint, visual_tokens=tokens)
        assert model.config.visual_tokens == tokens and processor.visual_tokens == tokens
        inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == tokens
        output = model(**inputs)
        assert [len(features) for features in output.image_outputs.pooler_output] == [tokens]
        assert output.image_outputs.dominant_indices.shape == (1, model.config.dominant_tokens)
        assert output.image_outputs.complement_seed_indices.shape == (1, tokens - model.config.dominant_tokens)


def test_compression_off_gives_stock_llava_logits_and_generations(tmp_path, photos):
    model, processor = load_remote(save_checkpoint(tmp_path, reduction_ratio=0))
    stock = stock_llava_with_same_weights(model)
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    stock_inputs = stock_processor(processor)(
        images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 576
    torch.testing.assert_close(model(**inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, stock.generate(**stock_inputs, max_new_tokens=6, do_sample=False))


def test_llava_hf_checkpoint_loads_every_stock_weight_into_the_visiontrim_class(tmp_path, photos):
    tiny = build_config()
    stock_config = LlavaConfig(
        vision_config=tiny.vision_config, text_config=tiny.text_config, image_token_index=tiny.image_token_index
    )
    torch.manual_seed(1)
    LlavaForConditionalGeneration(stock_config).save_pretrained(tmp_path)
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    model = VisionTrimLlavaForConditionalGeneration.from_pretrained(
        tmp_path, reduction_ratio=0, guidance_config=tiny.guidance_config.to_dict(), projection_dim=16
    ).eval()
    model_weights = model.state_dict()
    for name, weight in stock.state_dict().items():
        assert torch.equal(model_weights[name], weight), name
    processor = build_processor(build_config(reduction_ratio=0))
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    stock_inputs = {key: value for key, value in inputs.items() if not key.startswith("guidance_")}
    torch.testing.assert_close(model(**inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)


def test_eager_and_sdpa_keep_the_same_tokens(checkpoint, photos):
    inputs = None
    outputs = []
    for implementation in ("eager", "sdpa"):
        model, processor = load_remote(checkpoint, attn_implementation=implementation)
        assert model.model.vision_tower.config._attn_implementation == implementation
        inputs = inputs or processor(
            images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt"
        )
        outputs.append(image_output(model, inputs))
    eager, sdpa = outputs
    assert torch.equal(eager.dominant_indices, sdpa.dominant_indices)
    assert torch.equal(eager.complement_seed_indices, sdpa.complement_seed_indices)
    for eager_tokens, sdpa_tokens in zip(eager.pooler_output, sdpa.pooler_output, strict=True):
        torch.testing.assert_close(eager_tokens, sdpa_tokens, rtol=1e-4, atol=1e-5)


def test_batch_with_different_questions_equals_single_runs(remote, photos):
    model, processor = remote
    prompts = [QUESTION_PROMPT, OTHER_PROMPT]
    batch = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # the first prompt is left-padded
    batch_output = model(**batch)
    batch_generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    for sample in range(2):
        single = processor(images=photos[sample], text=prompts[sample], return_tensors="pt")
        single_output = model(**single)
        assert torch.equal(
            batch_output.image_outputs.dominant_indices[sample], single_output.image_outputs.dominant_indices[0]
        )
        assert torch.equal(
            batch_output.image_outputs.complement_seed_indices[sample],
            single_output.image_outputs.complement_seed_indices[0],
        )
        torch.testing.assert_close(
            batch_output.image_outputs.pooler_output[sample], single_output.image_outputs.pooler_output[0]
        )
        torch.testing.assert_close(batch_output.logits[sample, -1], single_output.logits[0, -1], rtol=1e-4, atol=1e-4)
        single_generated = model.generate(**single, max_new_tokens=5, do_sample=False)
        assert torch.equal(batch_generated[sample, -5:], single_generated[0, -5:])
    # Different questions steer TGVC to different seeds on the same photo.
    same_photo = processor(images=[photos[0], photos[0]], text=prompts, padding=True, return_tensors="pt")
    seeds = image_output(model, same_photo).complement_seed_indices
    assert not torch.equal(seeds[0], seeds[1])


def test_encoding_depends_on_neither_the_random_state_nor_the_thread_count(remote, photos):
    model, processor = remote
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    threads = torch.get_num_threads()
    outputs = []
    try:
        for seed, thread_count in ((0, 1), (1, max(2, threads))):
            torch.manual_seed(seed)
            torch.set_num_threads(thread_count)
            outputs.append(image_output(model, inputs))
    finally:
        torch.set_num_threads(threads)
    first, second = outputs
    assert torch.equal(first.dominant_indices, second.dominant_indices)
    assert torch.equal(first.complement_seed_indices, second.complement_seed_indices)
    torch.testing.assert_close(first.pooler_output[0], second.pooler_output[0], rtol=1e-5, atol=1e-5)


def test_generate_with_cache_equals_without_and_supports_beams_and_dict_output(remote, photos):
    model, processor = remote
    inputs = processor(images=photos[1], text=OTHER_PROMPT, return_tensors="pt")
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    result = model.generate(
        **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(result.sequences, cached[:, : inputs["input_ids"].shape[1] + 4])
    assert len(result.scores) == 4
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_text_only_prompts_need_no_image_and_no_guidance(remote):
    model, processor = remote
    inputs = processor(
        text=["USER: Hello there! ASSISTANT:", "USER: Tell me a story. ASSISTANT:"], padding=True, return_tensors="pt"
    )
    assert "guidance_input_ids" not in inputs and "pixel_values" not in inputs
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 4)


def test_several_images_in_one_prompt_are_each_compressed_with_the_prompts_question(remote, photos):
    model, processor = remote
    prompt = "USER: <image>\n<image>\nWhat differs between the two pictures? ASSISTANT:"
    inputs = processor(images=photos, text=prompt, return_tensors="pt")
    assert inputs["guidance_input_ids"].shape[0] == 2
    assert torch.equal(inputs["guidance_input_ids"][0], inputs["guidance_input_ids"][1])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 128
    output = model(**inputs)
    for image in range(2):
        alone = processor(
            images=photos[image],
            text="USER: <image>\nWhat differs between the two pictures? ASSISTANT:",
            return_tensors="pt",
        )
        torch.testing.assert_close(
            output.image_outputs.pooler_output[image], image_output(model, alone).pooler_output[0]
        )
    assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


def test_labels_give_the_stock_causal_lm_loss(remote, photos):
    model, processor = remote
    inputs = processor(images=photos[0], text=QUESTION_PROMPT + " A cat.", return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    output = model(**inputs, labels=labels)
    expected = F.cross_entropy(output.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(output.loss, expected)


def test_loss_backpropagates_through_the_compressed_tokens(checkpoint, photos):
    model, processor = load_remote(checkpoint)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT + " A cat.", return_tensors="pt")
    with torch.enable_grad():
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    # The kept and merged tokens are gathered and summed vision features, so the tower gets gradients through them.
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dominant_ratio", [1.0, 0.0])
def test_dvts_only_and_tgvc_only_ablations(checkpoint, photos, dominant_ratio):
    model, processor = load_remote(checkpoint, dominant_ratio=dominant_ratio)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    if dominant_ratio == 1.0:
        inputs = {key: value for key, value in inputs.items() if not key.startswith("guidance_")}  # no text needed
    output = image_output(model, inputs)
    assert output.pooler_output[0].shape[0] == 64
    assert output.dominant_indices.shape[1] == (64 if dominant_ratio == 1.0 else 0)
    assert output.complement_seed_indices.shape[1] == (0 if dominant_ratio == 1.0 else 64)
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_keeps_the_fp32_tokens(remote, checkpoint, photos, dtype, tolerance):
    # Scores and merges run in float32 whatever the model dtype: the same grid cells are kept as in fp32, and the kept
    # tokens differ from fp32's only by the half-precision rounding of the towers.
    model, processor = remote
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    reference = model(**inputs)
    half_model, _ = load_remote(checkpoint, dtype=dtype)
    output = half_model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
    assert output.logits.dtype == dtype and torch.isfinite(output.logits).all()
    half, full = output.image_outputs, reference.image_outputs
    assert torch.equal(half.dominant_indices, full.dominant_indices)
    assert torch.equal(half.complement_seed_indices, full.complement_seed_indices)
    tokens, expected = half.pooler_output[0].float(), full.pooler_output[0]
    assert tokens.shape == (64, model.config.text_config.hidden_size)
    error = (tokens - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error[:48].max() < tolerance  # DVTS tokens: selected, not computed
    # A merged seed can take another member where two seeds tie within rounding; most take the same members.
    assert error[48:].median() < 2 * tolerance
    last, expected_last = output.logits[0, -1].float(), reference.logits[0, -1]
    assert (last - expected_last).norm() / expected_last.norm() < 2 * tolerance


def test_output_attentions_never_reach_the_vision_tower(remote, photos):
    # Only the scored layer's queries and keys are recorded: the tower keeps its fast attention and no attention map.
    model, processor = remote
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    output = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert output.image_outputs.attentions is None
    kept_layers = [index for index, state in enumerate(output.image_outputs.hidden_states) if state is not None]
    assert kept_layers == [len(output.image_outputs.hidden_states) + model.config.vision_feature_layer]


def test_image_only_prompts_work_by_default(remote, photos):
    model, processor = remote
    assert model.config.empty_guidance == "cls_similarity"
    for prompt in ("USER: <image>\n ASSISTANT:", "<image>"):
        inputs = processor(images=photos[0], text=prompt, return_tensors="pt")
        assert inputs["guidance_attention_mask"].sum() == 0
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 2


def test_placeholder_count_is_checked_with_inputs_embeds_too(checkpoint, photos):
    model, _ = load_remote(checkpoint)
    _, processor = load_remote(checkpoint, visual_tokens=128)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(ValueError, match=r"hold 128 image placeholder tokens but the images give 64 visual tokens"):
        model(**inputs, inputs_embeds=embeds)


def test_budget_mismatch_between_processor_and_model_names_both_numbers(checkpoint, photos):
    model, _ = load_remote(checkpoint)
    _, processor = load_remote(checkpoint, visual_tokens=128)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"hold 128 image placeholder tokens but the images give 64 visual tokens.*reduction_ratio"
    ):
        model(**inputs)
    with pytest.raises(ValueError, match=r"hold 128 image placeholder tokens but the images give 64"):
        model.generate(**inputs, max_new_tokens=2)


def test_missing_guidance_names_the_arguments(remote, photos):
    model, processor = remote
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    with pytest.raises(ValueError, match=r"pass `guidance_input_ids` and `guidance_attention_mask`"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])


def test_guidance_rows_must_match_images(remote, photos):
    model, processor = remote
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    inputs["guidance_input_ids"] = inputs["guidance_input_ids"][:1]
    inputs["guidance_attention_mask"] = inputs["guidance_attention_mask"][:1]
    with pytest.raises(ValueError, match=r"must both have one row per image \(2 images\)"):
        model(**inputs)


def test_empty_guidance_raises_or_falls_back_to_cls_similarity(checkpoint, photos):
    model, refusing_processor = load_remote(checkpoint, empty_guidance="error")
    arguments = {"images": photos, "text": [QUESTION_PROMPT, OTHER_PROMPT], "guidance_text": ["", "a cup"]}
    # The processor loaded with the same setting refuses the prompt before the model runs.
    with pytest.raises(ValueError, match=r"Image\(s\) \[0\] have no question .*empty_guidance='error'"):
        refusing_processor(**arguments, padding=True, return_tensors="pt")
    _, processor = load_remote(checkpoint)
    inputs = processor(**arguments, padding=True, return_tensors="pt")
    assert inputs["guidance_attention_mask"][0].sum() == 0 and inputs["guidance_attention_mask"][1].sum() > 0
    with pytest.raises(  # the model's own check, for inputs built otherwise
        ValueError, match=r"guidance text of image\(s\) \[0\] is empty.*empty_guidance='cls_similarity'"
    ):
        model(**inputs)

    fallback, _ = load_remote(checkpoint)  # the default
    output = image_output(fallback, inputs)
    # Image 0 is guided by its own CLS token: the seeds are the remaining tokens most similar to it.
    inner = fallback.model
    tower = inner.vision_tower(inputs["pixel_values"][:1], output_hidden_states=True)
    hidden = tower.hidden_states[fallback.config.vision_feature_layer][0]
    dominant = output.dominant_indices[0].tolist()
    remaining = [index for index in range(576) if index not in dominant]
    cls_embed = F.normalize(inner.visual_projection(hidden[0]), dim=-1)
    _, seed_positions = slow_tgvc(
        hidden[1:][remaining], cls_embed.unsqueeze(0), inner.visual_projection, inner.logit_scale.exp(), 16, 3
    )
    assert output.complement_seed_indices[0].tolist() == [remaining[position] for position in seed_positions]
    # Image 1 keeps its text guidance, exactly as without the fallback.
    text_only = processor(images=photos[1], text=OTHER_PROMPT, guidance_text="a cup", return_tensors="pt")
    assert torch.equal(output.complement_seed_indices[1], image_output(model, text_only).complement_seed_indices[0])


def test_the_guidance_encoder_visual_projection_and_logit_scale_follow_clip_names(remote):
    model, _ = remote
    names = set(model.state_dict())
    assert "model.logit_scale" in names and "model.visual_projection.weight" in names
    assert "model.guidance_encoder.text_projection.weight" in names
    assert any(name.startswith("model.guidance_encoder.text_model.encoder.layers.0.") for name in names)
    assert model.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.model.visual_projection.bias is None


def test_guidance_tokenizer_is_checked():
    with pytest.raises(ValueError, match=r"needs `guidance_tokenizer`: the CLIPTokenizer"):
        type(build_processor(build_config()))(
            image_processor=build_processor(build_config()).image_processor,
            tokenizer=build_processor(build_config()).tokenizer,
            guidance_tokenizer=build_processor(build_config()).tokenizer,
            patch_size=14,
        )
    assert build_guidance_tokenizer().model_max_length == 77


def count_text_tower_runs(model) -> list[int]:
    """A list that grows by the batch size of each run of the model's CLIP text tower."""
    runs = []
    model.model.guidance_encoder.text_model.register_forward_hook(lambda module, args, output: runs.append(1))
    return runs


def test_a_repeated_question_runs_no_text_tower_and_gives_the_same_tokens(checkpoint, photos):
    model, processor = load_remote(checkpoint)
    uncached, _ = load_remote(checkpoint, guidance_cache_size=0)
    runs, uncached_runs = count_text_tower_runs(model), count_text_tower_runs(uncached)
    questions = [QUESTION_PROMPT, OTHER_PROMPT]
    first = processor(images=photos, text=questions, padding=True, return_tensors="pt")
    again = processor(images=photos[::-1], text=questions[::-1], padding=True, return_tensors="pt")
    outputs = [image_output(model, first), image_output(model, again)]
    assert len(runs) == 1  # the second batch asks the same two questions
    assert len(model.model.guidance_cache.entries) == 2
    for inputs, output in zip((first, again), outputs, strict=True):
        expected = image_output(uncached, inputs)
        assert torch.equal(output.complement_seed_indices, expected.complement_seed_indices)
        for tokens, expected_tokens in zip(output.pooler_output, expected.pooler_output, strict=True):
            torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-6)
    assert len(uncached_runs) == 2 and not uncached.model.guidance_cache.entries


def test_the_question_cache_is_bounded_and_follows_the_weights(checkpoint, photos):
    model, processor = load_remote(checkpoint, guidance_cache_size=2)
    runs = count_text_tower_runs(model)
    for question in ("a cat?", "a cup?", "a dog?", "a cup?"):
        image_output(
            model, processor(images=photos[0], text=f"USER: <image>\n{question} ASSISTANT:", return_tensors="pt")
        )
    assert len(runs) == 3 and len(model.model.guidance_cache.entries) == 2  # "a cat?" went first
    with torch.no_grad():
        model.model.guidance_encoder.text_projection.weight.mul_(2)  # new weights: nothing cached is valid
    image_output(model, processor(images=photos[0], text="USER: <image>\na cup? ASSISTANT:", return_tensors="pt"))
    assert len(runs) == 4
