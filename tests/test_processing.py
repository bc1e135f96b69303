"""VisionTrimProcessor: placeholder counts, the guidance text it extracts and tokenises, errors, save and reload."""

import sys
from unittest import mock

import numpy
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from visiontrim import VisionTrimProcessor
from visiontrim.processing_visiontrim import guidance_from_prompt
from visiontrim.tools.build import build_config, build_processor

from helpers import QUESTION_PROMPT, working_directory


@pytest.mark.parametrize(
    ("prompt", "guidance"),
    [
        ("USER: <image>\nWhat is shown? ASSISTANT:", "What is shown?"),
        (
            "USER: <image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase."
            " ASSISTANT:",
            "Is there a dog in the image? Answer the question using a single word or phrase.",
        ),
        (
            "A chat between a curious human and an artificial intelligence assistant. "
            "USER: <image>\nCount the cups. ASSISTANT:",
            "Count the cups.",
        ),
        ("USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: What colour is it? ASSISTANT:", "What colour is it?"),
        ("[INST] <image>\nWhat is shown in this image? [/INST]", "What is shown in this image?"),
        ("<|im_start|>user\n<image>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n", "Describe it."),
        (
            "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhere is the car?<|eot_id|>"
            "<|start_header_id|>assistant",
            "Where is the car?",
        ),
        ("<image>\nWhat is on the table?", "What is on the table?"),
        ("USER: <image> ASSISTANT:", ""),
    ],
)
def test_guidance_is_the_last_user_turn_without_markers(prompt, guidance):
    assert guidance_from_prompt(prompt, "<image>") == guidance


@pytest.fixture(scope="module")
def processor() -> VisionTrimProcessor:
    return build_processor(build_config())


def test_each_image_becomes_the_kept_number_of_placeholders(photos):
    for tokens in (576, 192, 128, 64):
        config = build_config(reduction_ratio=0) if tokens == 576 else build_config(visual_tokens=tokens)
        processor = build_processor(config)
        inputs = processor(images=photos, text=[QUESTION_PROMPT, QUESTION_PROMPT], padding=True, return_tensors="pt")
        image_token_id = processor.image_token_id
        assert (inputs["input_ids"] == image_token_id).sum(dim=1).tolist() == [tokens, tokens]
        assert processor._get_num_multimodal_tokens(image_sizes=[(300, 451), (400, 600)]).num_image_tokens == [
            tokens,
            tokens,
        ]


def test_guidance_tensors_are_clip_tokens_of_the_question_right_padded(processor, photos):
    prompts = [QUESTION_PROMPT, "USER: <image>\nA much longer question about the cup on the table? ASSISTANT:"]
    inputs = processor(images=photos, text=prompts, padding=True, return_tensors="pt")
    assert inputs["guidance_input_ids"].dtype == torch.long and inputs["guidance_input_ids"].shape[0] == 2
    mask = inputs["guidance_attention_mask"]
    assert mask[1].all() and not mask[0].all()
    assert torch.equal(mask[0], torch.sort(mask[0], descending=True).values)  # padding on the right
    decoded = processor.guidance_tokenizer.decode(
        inputs["guidance_input_ids"][0][mask[0].bool()], skip_special_tokens=True
    )
    assert decoded == "what animal is in the picture ?"  # CLIP lower-cases and splits punctuation
    assert inputs["guidance_input_ids"].shape[1] == mask[1].sum()  # padded to the longest question, not to 77


def test_a_chat_whose_text_holds_the_image_marker_is_guided_by_its_question_alone(processor, photos):
    # lmms-eval's LLaVA path writes `<image>` into the message text; the chat's question must not keep it.
    messages = [{"role": "user", "content": [{"type": "text", "text": "<image>\nWhat animal is in the picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=photos[0], text=prompt, return_tensors="pt")
    decoded = processor.guidance_tokenizer.decode(inputs["guidance_input_ids"][0], skip_special_tokens=True)
    assert decoded == "what animal is in the picture ?"


def test_long_guidance_is_truncated_to_the_clip_context(processor, photos):
    question = "Is there " + "a very small red cup " * 30 + "on the table?"
    inputs = processor(images=photos[0], text=f"USER: <image>\n{question} ASSISTANT:", return_tensors="pt")
    assert inputs["guidance_input_ids"].shape == (1, 77)
    assert inputs["guidance_input_ids"][0, -1] == processor.guidance_tokenizer.eos_token_id


def test_explicit_guidance_text_wins_and_is_checked(processor, photos):
    inputs = processor(images=photos[0], text=QUESTION_PROMPT, guidance_text="a sleeping cat", return_tensors="pt")
    assert (
        processor.guidance_tokenizer.decode(inputs["guidance_input_ids"][0], skip_special_tokens=True)
        == "a sleeping cat"
    )
    with pytest.raises(
        ValueError, match=r"`guidance_text` has 1 entries but there are 2 prompts: give one per prompt"
    ):
        processor(images=photos, text=[QUESTION_PROMPT, QUESTION_PROMPT], guidance_text=["only one"], padding=True)


def test_empty_guidance_gives_an_all_zero_mask_row(processor, photos):
    inputs = processor(
        images=photos, text=["USER: <image> ASSISTANT:", QUESTION_PROMPT], padding=True, return_tensors="pt"
    )
    assert inputs["guidance_attention_mask"][0].sum() == 0 and inputs["guidance_attention_mask"][1].sum() > 0


def test_images_without_prompts_take_one_guidance_text_each(processor, photos):
    inputs = processor(images=photos, guidance_text=["a cat", "a cup"], return_tensors="pt")
    assert inputs["guidance_input_ids"].shape[0] == 2 and "input_ids" not in inputs
    with pytest.raises(ValueError, match=r"Pass `text` \(the prompts\) or `guidance_text=`"):
        processor(images=photos)


def test_text_only_input_has_no_guidance(processor):
    inputs = processor(text="USER: Hi ASSISTANT:", return_tensors="pt")
    assert set(inputs) == {"input_ids", "attention_mask"}


def test_model_input_names_include_the_guidance(processor):
    names = processor.model_input_names
    assert {"input_ids", "attention_mask", "pixel_values", "guidance_input_ids", "guidance_attention_mask"} <= set(
        names
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction_ratio": 1.0}, r"VisionTrimProcessor.reduction_ratio must be in \[0, 1\)"),
        ({"reduction_ratio": 0.9999}, r"VisionTrimProcessor.reduction_ratio=0.9999 keeps no token of the 576 patches"),
        ({"visual_tokens": 600}, r"VisionTrimProcessor.visual_tokens must be an integer in \[1, 576\]"),
    ],
)
def test_invalid_budget_is_refused(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        VisionTrimProcessor(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            guidance_tokenizer=processor.guidance_tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            **kwargs,
        )


def test_save_and_reload_keep_every_setting(tmp_path, photos):
    processor = build_processor(build_config(visual_tokens=128))
    processor.guidance_max_length = 32
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "guidance_tokenizer" / "tokenizer_config.json").is_file()
    assert (tmp_path / "chat_template.jinja").is_file()
    with working_directory(tmp_path.parent):
        reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(reloaded).__name__ == "VisionTrimProcessor" and type(reloaded).__module__.startswith(
        "transformers_modules."
    )
    assert type(reloaded.guidance_tokenizer).__name__ == "CLIPTokenizer"
    settings = (
        "reduction_ratio",
        "guidance_max_length",
        "patch_size",
        "vision_feature_select_strategy",
        "num_additional_image_tokens",
        "image_token",
        "chat_template",
    )
    for name in settings:
        assert getattr(reloaded, name) == getattr(processor, name), name
    assert reloaded.visual_tokens == 128
    prompt = "USER: <image>\nWhat is " + "in the cup " * 10 + "? ASSISTANT:"
    original = processor(images=photos[1], text=prompt, return_tensors="pt")
    again = reloaded(images=photos[1], text=prompt, return_tensors="pt")
    assert set(original) == set(again)
    for key in original:
        assert torch.equal(original[key], again[key]), key
    assert again["guidance_input_ids"].shape[1] == 32
    assert AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True, visual_tokens=64).visual_tokens == 64


def test_chat_messages_render_with_the_llava_template(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is shown? ASSISTANT:"
    assert guidance_from_prompt(prompt, processor.image_token) == "What is shown?"


def test_small_and_odd_sized_photos_are_cropped_to_the_tower_grid(processor):
    tiny, tall = Image.new("RGB", (40, 30), "red"), Image.new("RGB", (90, 700), "blue")
    inputs = processor(images=[tiny, tall], text=[QUESTION_PROMPT, QUESTION_PROMPT], padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 336, 336)
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [64, 64]


def test_16_bit_grayscale_images_keep_their_range(processor):
    # Pillow's own RGB conversion clips 16-bit values to white; the processor scales them to 8 bits first.
    values = numpy.linspace(0, 65535, 336 * 336).reshape(336, 336).astype(numpy.uint16)
    wide = Image.fromarray(values)
    assert wide.mode == "I;16"
    eight_bit = Image.fromarray((values // 257).astype(numpy.uint8))
    pixels = processor(images=wide, text=QUESTION_PROMPT, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        pixels, processor(images=eight_bit, text=QUESTION_PROMPT, return_tensors="pt")["pixel_values"]
    )
    assert pixels.std() > 0.5  # a gradient, not a white square
    with pytest.raises(ValueError, match=r"A F image with values in .*convert it to 8-bit RGB first"):
        processor(images=Image.fromarray(values.astype(numpy.float32)), text=QUESTION_PROMPT)


def test_a_guidance_text_cut_to_77_clip_tokens_is_warned_about(processor):
    logger = sys.modules[type(processor).tokenize_guidance.__module__].logger
    long_question = "USER: <image>\n" + "Is the cat on the left of the red sofa? " * 12 + "ASSISTANT:"
    image = Image.new("RGB", (336, 336))
    with mock.patch.object(logger, "warning_once") as warning:
        short = processor(images=image, text=QUESTION_PROMPT, return_tensors="pt")
        assert not warning.called
        long = processor(images=image, text=long_question, return_tensors="pt")
    assert warning.call_count == 1 and "longer than 77 CLIP tokens" in warning.call_args[0][0]
    assert long["guidance_input_ids"].shape[1] == 77 and short["guidance_input_ids"].shape[1] < 77


# A chat format no prompt parser knows: only the chat messages say where the question is.
UNKNOWN_TEMPLATE = (
    "{% for message in messages %}<<{{ message['role'] }}>> {% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} <<end>>\n"
    "{% endfor %}{% if add_generation_prompt %}<<assistant>> {% endif %}"
)


def clip_ids(processor, text: str) -> list[int]:
    return processor.guidance_tokenizer(text)["input_ids"]


def test_a_chat_is_guided_by_the_question_of_its_messages_whatever_the_template(photos):
    processor = build_processor(build_config())
    processor.chat_template = UNKNOWN_TEMPLATE
    question = "What animal is in the picture?"
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hello."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        {"role": "user", "content": [{"type": "text", "text": question}]},
    ]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert guidance_from_prompt(rendered, "<image>") != question  # parsing the prompt back would get it wrong
    inputs = processor(images=photos[0], text=rendered, return_tensors="pt")
    assert inputs["guidance_input_ids"][0].tolist() == clip_ids(processor, question)
    # tokenize=True (what the image-text-to-text pipeline calls) takes the same question.
    chat[0]["content"][0]["image"] = photos[0]
    tokenized = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert tokenized["guidance_input_ids"][0].tolist() == clip_ids(processor, question)
    # An image-only chat has no question (empty_guidance decides), whatever else the prompt holds.
    bare = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    assert not processor(images=photos[0], text=bare, return_tensors="pt")["guidance_attention_mask"].any()


def test_a_raw_prompt_in_an_unknown_format_is_logged_once_with_the_text_used(photos):
    processor = build_processor(build_config())
    logger = sys.modules[type(processor).tokenize_guidance.__module__].logger
    with mock.patch.object(logger, "warning") as warning:
        processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
        assert not warning.called  # a known format: its user turn is the question
        for question in ("Which animal?", "Which colour?"):
            inputs = processor(images=photos[0], text=f"<<user>> <image>\n{question} <<end>>", return_tensors="pt")
    assert warning.call_count == 1
    message = warning.call_args[0][0]
    assert "'<<user>> Which animal? <<end>>'" in message and "guidance_text=" in message
    assert inputs["guidance_input_ids"][0].tolist() == clip_ids(processor, "<<user>> Which colour? <<end>>")
