"""
The LLM stage (text-guided rerank inside the decoder): ranking, selection and merging on hand-built inputs with known
answers, then on tiny models: cached generation equal to a no-cache recompute of the same pruned prefix, batching,
per-layer cache lengths, parity when off, save/load, errors.
"""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, MistralConfig, MistralModel

from visiontrim import VisionTrimLlavaConfig
from visiontrim.llm_stage_visiontrim import (
    causal_attention_probabilities,
    keep_per_image,
    llm_stage_scores,
    merge_into_kept,
    pruned_order,
    visual_unit_index,
)
from visiontrim.tools.build import Shapes, stock_llava_with_same_weights

from helpers import OTHER_PROMPT, QUESTION_PROMPT, load_remote, save_checkpoint


# Positions: 0 text before the image, 1-3 visual, 4-5 text after the image.
VISUAL = torch.tensor([[False, True, True, True, False, False]])


def hand_attention() -> torch.Tensor:
    probabilities = torch.full((1, 6, 6), 0.01)
    probabilities[0, 4:, 2] = 0.6  # the text after the image looks at token 2
    probabilities[0, 4:, 3] = 0.2
    probabilities[0, 1, 0] = 0.9  # token 1 looks at the text before the image
    probabilities[0, 3, 0] = 0.5
    return probabilities


def test_llm_stage_scores_by_direction():
    everything = torch.ones(1, 6, dtype=torch.bool)
    text_to_image = llm_stage_scores(hand_attention(), VISUAL, everything, "text_to_image")
    assert text_to_image[0, 1:4].tolist() == pytest.approx([0.01, 0.6, 0.2])
    image_to_text = llm_stage_scores(hand_attention(), VISUAL, everything, "image_to_text")
    assert image_to_text[0, 1:4].tolist() == pytest.approx([0.9, 0.01, 0.5])
    both = llm_stage_scores(hand_attention(), VISUAL, everything, "both")
    assert both[0, 1:4].tolist() == pytest.approx([0.455, 0.305, 0.35])
    assert torch.isinf(both[0, [0, 4, 5]]).all()
    padded = everything.clone()
    padded[0, 5] = False  # a padding position is no text
    probabilities = hand_attention()
    probabilities[0, 5, 3] = 5.0
    assert llm_stage_scores(probabilities, VISUAL, padded, "text_to_image")[0, 3] == pytest.approx(0.2)


def test_keep_per_image_keeps_the_best_of_each_image_with_ties_to_the_earlier():
    visual = torch.tensor([[False, True, True, True, False, True, True, False]])
    assert visual_unit_index(visual).tolist() == [[-1, 0, 0, 0, -1, 1, 1, -1]]
    scores = torch.tensor([[0.0, 0.2, 0.9, 0.9, 0.0, 0.1, 0.3, 0.0]]).masked_fill(~visual, float("-inf"))
    keep = keep_per_image(scores, visual, 1)
    assert keep.tolist() == [[True, False, True, False, True, False, True, True]]
    assert keep_per_image(scores, visual, 2).tolist() == [[True, False, True, True, True, True, True, True]]


def test_merge_adds_dropped_tokens_to_their_most_similar_kept_token_of_the_same_image():
    visual = torch.tensor([[False, True, True, True, True, False, True, True]])
    keep = torch.tensor([[True, True, True, False, False, True, True, False]])
    hidden = torch.tensor(
        [[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0], [9.0, 9.0], [1.0, 1.0], [5.0, 0.0]]]
    )
    merged = merge_into_kept(hidden, keep, visual, iterations=1, update="add")
    # image 0: token 3 -> token 1 (2.0 > 0.1), token 4 -> token 2 (3.0 > 0.1); image 1: token 7 -> token 6 only.
    assert merged[0, 1].tolist() == pytest.approx([3.0, 0.1])
    assert merged[0, 2].tolist() == pytest.approx([0.1, 4.0])
    assert merged[0, 6].tolist() == pytest.approx([6.0, 1.0])
    assert torch.equal(merged[0, [0, 3, 4, 5, 7]], hidden[0, [0, 3, 4, 5, 7]])
    mean = merge_into_kept(hidden, keep, visual, iterations=2, update="mean")
    assert mean[0, 1].tolist() == pytest.approx([1.5, 0.05])


def test_pruned_order_left_pads_shorter_rows():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = pruned_order(keep)
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]] and valid.tolist() == [[True, True, True], [False, False, True]]


def test_attention_probabilities_equal_eager():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    model = LlamaModel(config).eval()
    input_ids = torch.randint(0, 50, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0
    recorded = {}

    def hook(module, args, kwargs):
        recorded["probabilities"] = causal_attention_probabilities(
            module, kwargs["hidden_states"], kwargs["position_embeddings"], attention_mask.bool()
        )

    handle = model.layers[1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        eager = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions[1]
    handle.remove()
    torch.testing.assert_close(recorded["probabilities"][0], eager[0].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recorded["probabilities"][1, 3:, 3:], eager[1].mean(0)[3:, 3:], rtol=1e-5, atol=1e-6)


def test_attention_probabilities_follow_a_mistral_sliding_window():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=3, attn_implementation="eager",
    )  # fmt: skip
    model = MistralModel(config).eval()
    input_ids = torch.randint(0, 50, (1, 9))
    recorded = {}

    def hook(module, args, kwargs):
        recorded["probabilities"] = causal_attention_probabilities(
            module, kwargs["hidden_states"], kwargs["position_embeddings"], torch.ones(1, 9, dtype=torch.bool), 3
        )

    handle = model.layers[1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        eager = model(input_ids=input_ids, output_attentions=True).attentions[1]
    handle.remove()
    assert bool((eager[0, :, 8, :6] == 0).all())  # the window: the last query sees its last 3 keys only
    torch.testing.assert_close(recorded["probabilities"][0], eager[0].mean(0), rtol=1e-5, atol=1e-6)


# ---- on models


@pytest.fixture(scope="module")
def stage_checkpoint(tmp_path_factory):
    return save_checkpoint(
        tmp_path_factory.mktemp("stage"), shapes=Shapes(llm_layers=3), llm_stage_layer=2, llm_stage_tokens=16
    )


def recompute_logits(model, inputs, sequences, pruning, generated: int) -> torch.Tensor:
    """A no-cache forward over the prompt and the generated tokens, on the cached run's kept prefix."""
    prompt = inputs["input_ids"].shape[1]
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool).scatter(1, pruning.index, pruning.valid)
    extra = sequences.shape[1] - 1 - prompt
    ones = torch.ones(sequences.shape[0], extra, dtype=torch.long)
    output = model(
        input_ids=sequences[:, :-1],
        attention_mask=torch.cat([inputs["attention_mask"], ones], dim=1),
        pixel_values=inputs["pixel_values"],
        guidance_input_ids=inputs["guidance_input_ids"],
        guidance_attention_mask=inputs["guidance_attention_mask"],
        visual_keep_mask=torch.cat([keep, ones.bool()], dim=1),
        use_cache=False,
    )
    return output.logits[:, -generated:]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_generation_equals_a_no_cache_recompute_of_the_pruned_prefix(
    stage_checkpoint, photos, implementation, batch
):
    model, processor = load_remote(stage_checkpoint, attn_implementation=implementation)
    prompts = [QUESTION_PROMPT, "USER: Have a look: <image>\nIs there a cup of coffee on the table? ASSISTANT:"][
        :batch
    ]
    inputs = processor(images=photos[:batch], text=prompts, padding=True, return_tensors="pt")
    generated = model.generate(
        **inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    pruning = model(**inputs, use_cache=True, logits_to_keep=1).cache.visiontrim_pruning
    steps = torch.stack(generated.logits, dim=1)
    torch.testing.assert_close(
        recompute_logits(model, inputs, generated.sequences, pruning, 5), steps, rtol=1e-5, atol=1e-5
    )


def test_cache_lengths_per_layer_and_kept_tokens(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    cache = model(**inputs, use_cache=True).cache
    assert [cache.get_seq_length(layer) for layer in range(3)] == [prompt, prompt, prompt - (64 - 16)]
    pruning = cache.visiontrim_pruning
    visual = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    kept_visual = [position for position in pruning.index[0].tolist() if position in visual.tolist()]
    assert len(kept_visual) == 16 and pruning.valid.all()
    assert [p for p in pruning.index[0].tolist() if p not in visual.tolist()] == [
        p for p in range(prompt) if p not in visual.tolist()
    ]


def test_batch_with_different_image_positions_equals_single_runs(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    prompts = [QUESTION_PROMPT, "USER: Here is a photo taken in a cafe: <image>\nIs there a cup? ASSISTANT:"]
    batch = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    batch_generated = model.generate(
        **batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    for sample in range(2):
        single = processor(images=photos[sample], text=prompts[sample], return_tensors="pt")
        single_generated = model.generate(
            **single, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        assert torch.equal(batch_generated.sequences[sample, -4:], single_generated.sequences[0, -4:])
        torch.testing.assert_close(
            batch_generated.logits[0][sample], single_generated.logits[0][0], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("score", ["text_to_image", "both"])
def test_generation_without_a_cache_equals_cached_generation(stage_checkpoint, photos, score):
    # Without a cache every step recomputes the whole sequence: the generated tokens must not re-rank the visual
    # tokens, so each step keeps what the prompt kept, as the cached decode steps do.
    model, processor = load_remote(stage_checkpoint, llm_stage_score=score)
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    settings = {"max_new_tokens": 8, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    cached = model.generate(**inputs, use_cache=True, **settings)
    uncached = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (with_cache, without_cache) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(without_cache, with_cache, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_generation_modes_work_with_the_stage(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    inputs = processor(images=photos[1], text=OTHER_PROMPT, return_tensors="pt")
    prompt = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape == (2, prompt + 3)
    result = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert len(result.scores) == 3
    text_only = processor(text="USER: Hello ASSISTANT:", return_tensors="pt")
    assert model.generate(**text_only, max_new_tokens=2).shape[1] == text_only["input_ids"].shape[1] + 2


def test_off_gives_the_models_logits_without_the_stage(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint, llm_stage_layer=None)  # the switch alone turns the stage off
    assert type(model.model.language_model).__name__ == "VisionTrimLlamaModel"  # the same decoder, stage off
    stock = stock_llava_with_same_weights(model)
    stock.model.language_model = LlamaModel(model.config.text_config).eval()
    stock.model.language_model.load_state_dict(model.model.language_model.state_dict())
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    features = model.model.get_image_features(
        inputs["pixel_values"],
        guidance_input_ids=inputs["guidance_input_ids"],
        guidance_attention_mask=inputs["guidance_attention_mask"],
    )
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    torch.testing.assert_close(
        model(**text, mm_encoder_outputs={"image": features}).logits,
        stock(**text, mm_encoder_outputs={"image": features}).logits,
        rtol=0,
        atol=1e-6,
    )
    on, _ = load_remote(stage_checkpoint)
    # With the stage on, the logits cover the kept positions: each row drops 64 - 16 visual tokens (and its padding),
    # and the batch is as long as its longest row (the unpadded one).
    assert on(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - (64 - 16)


def test_setting_survives_save_and_load_and_labels_are_refused(stage_checkpoint, tmp_path, photos):
    model, processor = load_remote(stage_checkpoint)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, _ = load_remote(tmp_path)
    assert (again.config.llm_stage_layer, again.config.llm_stage_tokens, again.config.llm_stage_score) == (
        2,
        16,
        "both",
    )
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    with pytest.raises(
        ValueError, match=r"logits do not line up with `labels`: compute the loss with `config.llm_stage_layer=None`"
    ):
        again(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match=r"llm_stage_layer must be an integer in \[1, 2\]"):
        load_remote(stage_checkpoint, llm_stage_layer=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"llm_stage_layer": 2, "llm_stage_tokens": 64}, r"llm_stage_tokens must be an integer in \[1, 63\]"),
        ({"llm_stage_layer": 32, "llm_stage_tokens": 8}, r"llm_stage_layer must be an integer in \[1, 31\]"),
        ({"llm_stage_layer": 2, "llm_stage_tokens": 8, "llm_stage_score": "max"}, r"llm_stage_score must be one of"),
        (
            {"llm_stage_layer": 2, "llm_stage_tokens": 8, "text_config": {"model_type": "qwen2"}},
            r"needs a llama or mistral LLM",
        ),
    ],
)
def test_invalid_llm_stage_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionTrimLlavaConfig(**kwargs)


def test_llava_next_with_the_stage(tmp_path, photos):
    model, processor = load_remote(
        save_checkpoint(
            tmp_path, arch="llava-next", shapes=Shapes(llm_layers=3), llm_stage_layer=1, llm_stage_tokens=100
        )
    )
    inputs = processor(images=photos, text=[QUESTION_PROMPT, OTHER_PROMPT], padding=True, return_tensors="pt")
    output = model(**inputs, use_cache=True)
    pruning = output.cache.visiontrim_pruning
    kept = torch.zeros_like(inputs["input_ids"], dtype=torch.bool).scatter(1, pruning.index, pruning.valid)
    is_image = inputs["input_ids"] == model.config.image_token_id
    features = torch.cat(output.image_outputs.pooler_output)
    is_newline = (features == model.model.image_newline).all(dim=-1)
    newline = torch.zeros_like(is_image).masked_scatter(is_image, is_newline)
    # The image_newline after each crop is layout: every one is kept, and the 100 kept per image are content.
    crops = sum(model.model.media_crops("image", inputs["pixel_values"], inputs["image_sizes"])[1])
    assert newline.sum() == crops and bool(kept[newline].all())
    assert ((kept & is_image & ~newline).sum(dim=1) == 100).all()  # per image, whatever its crops
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, inputs["input_ids"].shape[1] + 3)


def test_a_prompt_continued_on_a_filled_cache_is_not_pruned(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    first = processor(text="USER: Hello! ASSISTANT: Hi. ", return_tensors="pt")
    cache = model(**first, use_cache=True).cache
    second = processor(images=photos[0], text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    mask = torch.cat([first["attention_mask"], second["attention_mask"]], dim=1)
    output = model(**{**second, "attention_mask": mask}, cache=cache, use_cache=True)
    total = first["input_ids"].shape[1] + second["input_ids"].shape[1]
    assert getattr(output.cache, "visiontrim_pruning", None) is None
    assert [output.cache.get_seq_length(layer) for layer in range(3)] == [total] * 3


def test_what_the_stage_kept_lives_on_its_own_cache(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert type(generated.cache).__name__ == "LlmStageCache"
    assert generated.cache.visiontrim_pruning.prompt_length == inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"keeps what it pruned on its cache, an `LlmStageCache`; got a DynamicCache"):
        model(**inputs, cache=DynamicCache(), use_cache=True)


def test_inputs_embeds_without_input_ids_are_refused_while_the_stage_is_on(stage_checkpoint, photos):
    model, processor = load_remote(stage_checkpoint)
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with pytest.raises(ValueError, match=r"finds the visual tokens from `input_ids`.*llm_stage_layer=None"):
        model(**inputs, inputs_embeds=embeds)
